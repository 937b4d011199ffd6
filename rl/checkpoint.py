"""Checkpoints: `RUN_DIR/checkpoints/step_NNNNNN/` holds the policy (an HF directory), the learner's optimizer and
RNG states, and the controller's state (step, data cursor). Written into a temporary directory and renamed, so
a checkpoint directory either is complete or does not exist; only the newest `keep` are kept."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import ray

STATE_FILE = "controller_state.json"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, learner: Any, controller_state: dict[str, Any], keep: int) -> Path:
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ray.get(learner.save.remote(str(tmp)))
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, **controller_state}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    complete = [p for p in sorted(checkpoint_dir(run_dir).glob("step_*")) if (p / STATE_FILE).is_file()]
    return complete[-1] if complete else None


def load_controller_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE_FILE).read_text())
