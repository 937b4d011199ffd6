"""The learner's training state beside its weights in a checkpoint: optimizer, policy version and every RNG, so
that a resumed job continues exactly where the saved one stopped."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "learner_state.pt"


def save_state(out: Path, optimizer: torch.optim.Optimizer | None, version: int, device: torch.device) -> None:
    """Write optimizer, version and RNG states to `out / STATE_FILE` (no optimizer: a sharded learner's is saved
    apart, rl/trainer/sharding.py)."""
    torch.save(
        {
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "version": version,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
            "numpy_rng": np.random.get_state(),
            "python_rng": random.getstate(),
        },
        out / STATE_FILE,
    )


def load_state(path: Path, optimizer: torch.optim.Optimizer | None, device: torch.device) -> int:
    """Restore what `save_state` wrote into `optimizer` and the RNGs; returns the policy version."""
    state: dict[str, Any] = torch.load(path / STATE_FILE, weights_only=False)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and device.type == "cuda":
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    np.random.set_state(state["numpy_rng"])
    random.setstate(state["python_rng"])
    return int(state["version"])
