"""Score trajectories with the configured reward functions and validate what they return.

Each function is called verl-style, `fn(data_source, solution_str, ground_truth, extra_info)`, per sample. Its
return must be a finite number or a dict with a finite `score` (and optionally `acc`); anything else is a
`RewardError` naming the function and the sample, since it is a bug in the function, not in the sample. An
exception raised inside a function marks that one sample as failed: it is counted, logged with its id, and left
out of training. The first function is the task's verifier: its `acc` (or score >= 1) is what `accuracy` reports.
The environment's own reward (if it gave one) and `reward.truncation_penalty` (on truncated samples) are added
to the sum and logged in the breakdown as `env` and `truncation_penalty`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from rl.config import RewardConfig
from rl.records import ScoredTrajectory, Trajectory, TrajectoryStatus
from rewards.registry import get_reward

log = logging.getLogger(__name__)


class RewardError(ValueError):
    """A reward function returned something that is not a valid score."""


@dataclass
class ScoringResult:
    scored: list[ScoredTrajectory]
    failed: int
    """Samples left out: a reward function raised, or the rollout itself ended in `error`."""


class RewardScorer:
    def __init__(self, cfg: RewardConfig) -> None:
        self.functions = [(f.name, get_reward(f.name), f.weight) for f in cfg.functions]
        self.truncation_penalty = cfg.truncation_penalty

    def score(self, trajectories: list[Trajectory]) -> ScoringResult:
        scored, failed = [], 0
        for traj in trajectories:
            if traj.status is TrajectoryStatus.ERROR:
                failed += 1
                log.warning("sample %s left out: %s", traj.sample_id, traj.error)
                continue
            try:
                scored.append(self._score_one(traj))
            except RewardError:
                raise
            except Exception as e:  # a reward function that raises fails only this sample
                failed += 1
                log.warning("sample %s left out: reward function raised %s: %s", traj.sample_id, type(e).__name__, e)
        return ScoringResult(scored=scored, failed=failed)

    def _score_one(self, traj: Trajectory) -> ScoredTrajectory:
        breakdown: dict[str, float] = {}
        correct = False
        total = 0.0
        for i, (name, fn, weight) in enumerate(self.functions):
            raw = fn(traj.row.data_source, traj.response_text, traj.row.ground_truth, traj.row.extra_info)
            value, acc = _validate(name, traj.sample_id, raw)
            breakdown[name] = value
            total += weight * value
            if i == 0:
                correct = acc if acc is not None else value >= 1.0
        if traj.env_reward is not None:  # the environment's own score, unweighted
            breakdown["env"] = traj.env_reward
            total += traj.env_reward
        if traj.status is TrajectoryStatus.TRUNCATED and self.truncation_penalty:
            breakdown["truncation_penalty"] = self.truncation_penalty
            total += self.truncation_penalty
        return ScoredTrajectory(trajectory=traj, reward=total, reward_breakdown=breakdown, correct=correct)


def _validate(name: str, sample_id: str, raw: object) -> tuple[float, bool | None]:
    acc = None
    if isinstance(raw, dict):
        if "score" not in raw:
            raise RewardError(f"reward function {name!r} returned a dict without 'score' for sample {sample_id}: {raw!r}")
        acc = raw.get("acc")
        raw = raw["score"]
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise RewardError(f"reward function {name!r} returned {type(raw).__name__} {raw!r} for sample {sample_id}; expected a number")
    if not math.isfinite(raw):
        raise RewardError(f"reward function {name!r} returned {raw} for sample {sample_id}; scores must be finite")
    return float(raw), (bool(acc) if acc is not None else None)
