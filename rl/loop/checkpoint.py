"""Checkpoints: `RUN_DIR/checkpoints/step_NNNNNN/` holds the policy (an HF directory), the learner's optimizer and
RNG states, the rollout workers' sampling RNG states and paused partial rollouts, the trajectories of steps the
async pipeline already generated, and the controller's state (step, data cursor).

A checkpoint is written into `.tmp_step_NNNNNN/`, flushed to disk, and renamed: a directory named `step_*` is
complete or does not exist, so a job killed while writing (preempted, OOM, Ctrl-C) leaves the previous
checkpoint as the latest one, and the next save clears the half-written directory. Only the newest `keep` are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "controller_state.json"
WORKERS_FILE = "rollout_workers.pt"
PENDING_FILE = "pending_rollouts.pt"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(
    run_dir: Path,
    step: int,
    learner: Any,
    workers: Any,
    controller_state: dict[str, Any],
    keep: int,
    pending: list | None = None,
) -> Path:
    """`learner`: a LearnerGroup (or the in-process learner); `workers`: a rollout backend; `pending`: the
    trajectories of steps the async pipeline
    already generated ((step, trajectories) pairs)."""
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    for stale in [*root.glob(".tmp_step_*"), *root.glob(".old_step_*")]:  # left by a job killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    learner.save(str(tmp))
    torch.save(workers.state(), tmp / WORKERS_FILE)
    torch.save(pending or [], tmp / PENDING_FILE)
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, **controller_state}, indent=2))
    _sync_tree(tmp)
    if final.exists():  # the same step saved again: move the old one out of the `step_*` names first, then delete it
        old = root / f".old_step_{step:06d}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        shutil.rmtree(old)
    tmp.rename(final)
    _sync_dir(root)
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    complete = [p for p in sorted(checkpoint_dir(run_dir).glob("step_*")) if (p / STATE_FILE).is_file()]
    return complete[-1] if complete else None


def restore_checkpoint(path: Path, learner: Any, workers: Any) -> dict[str, Any]:
    """Load the learners and the rollout workers' state from `path`; returns the controller state."""
    learner.load(str(path))
    workers.load_state(torch.load(path / WORKERS_FILE, weights_only=False))
    pending = torch.load(path / PENDING_FILE, weights_only=False) if (path / PENDING_FILE).is_file() else []
    return {**json.loads((path / STATE_FILE).read_text()), "pending_rollouts": pending}


def _sync_tree(root: Path) -> None:
    """fsync every file under `root` and the directories: the rename must not land before the data does."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _sync_dir(Path(dirpath))


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
