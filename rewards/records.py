"""The record reward scoring produces: a trajectory with its reward (`ScoredTrajectory`), what advantages are
computed from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rollouts.records import Trajectory


@dataclass
class ScoredTrajectory:
    """A trajectory with its reward."""

    trajectory: Trajectory
    reward: float
    """Weighted sum of the reward functions' scores: what advantages are computed from."""
    reward_breakdown: dict[str, float]
    """Each reward function's own score, by name, for metrics and saved trajectories."""
    correct: bool
    """Whether the task's verifier judged the answer correct (what `accuracy` averages)."""
    reward_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    """What verl-style functions returned besides `score`/`acc`, by function name (e.g. code_tests' `reason`)."""
