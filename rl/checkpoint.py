"""Checkpoints: `RUN_DIR/checkpoints/step_NNNNNN/` holds the policy (an HF directory), the learner's optimizer and
RNG states, the rollout workers' sampling RNG states, and the controller's state (step, data cursor). Written into a temporary directory and renamed, so
a checkpoint directory either is complete or does not exist; only the newest `keep` are kept."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import ray

import torch

STATE_FILE = "controller_state.json"
WORKER_RNG_FILE = "worker_rng.pt"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, learner: Any, workers: list[Any], controller_state: dict[str, Any], keep: int) -> Path:
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ray.get(learner.save.remote(str(tmp)))
    torch.save(ray.get([w.get_rng_state.remote() for w in workers]), tmp / WORKER_RNG_FILE)
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


def restore_checkpoint(path: Path, learner: Any, workers: list[Any]) -> dict[str, Any]:
    """Load the learner and the workers' RNG states from `path`; returns the controller state."""
    ray.get(learner.load.remote(str(path)))
    states = torch.load(path / WORKER_RNG_FILE)
    if len(states) == len(workers):  # a different worker count cannot reproduce the old sampling streams anyway
        ray.get([w.set_rng_state.remote(s) for w, s in zip(workers, states, strict=True)])
    return json.loads((path / STATE_FILE).read_text())
