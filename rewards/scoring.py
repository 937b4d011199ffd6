"""Score trajectories with the configured reward functions (`rewards.api`), combine them, count what failed.

Each sample's reward is the weighted sum of the functions that scored it; the environment's own reward (if it gave
one) and `reward.truncation_penalty` (on truncated samples) are added and logged in the breakdown as `env` and
`truncation_penalty`. The first function is the task's verifier: its `acc` (or score >= 1) is what `accuracy`
reports, and later TRL-style functions receive its verdicts as `correct`. A sample is left out of training, counted
and logged with its id, when its rollout ended in `error`, when any function failed on it, or when no function
scored it (all returned None). Reward models' scores (`rewards.models`, fetched into `Trajectory.model_scores`) are
weighted and added like functions; a model that failed on a sample (`Trajectory.model_score_failures`) fails it.
Per-function counts go to the step's metrics: `reward_failed/<name>` and `reward_none/<name>`.

An agent function's reward (`envs.agent`, `rollouts.agents`) is the environment's: with no reward functions
configured it is the whole reward (and a sample is correct when it is >= 1); a dict's components are logged as
`env/<name>`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, field

from rewards.api import Failure, RewardFunction, RewardInput, Scores
from rewards.config import RewardConfig
from rewards.records import ScoredTrajectory
from rewards.registry import get_reward
from rollouts.records import Trajectory, TrajectoryStatus, completion_messages

log = logging.getLogger(__name__)


@dataclass
class ScoringResult:
    scored: list[ScoredTrajectory]
    failed: int
    """Samples left out: the rollout ended in `error`, a reward function failed on it, or nothing scored it."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Per-function counts: `reward_failed/<name>`, `reward_none/<name>`, and `unscored_samples`."""
    left_out: list[tuple[Trajectory, str]] = field(default_factory=list)
    """The samples left out, each with why (what the run's saved samples show)."""


class RewardScorer:
    def __init__(self, cfg: RewardConfig) -> None:
        self.functions = [
            (RewardFunction(f.name, get_reward(f.name), f.timeout_s, f.kwargs), f.weight) for f in cfg.functions
        ]
        self.models = [(m.name, m.weight) for m in cfg.models]
        self.truncation_penalty = cfg.truncation_penalty

    def score(self, trajectories: list[Trajectory], step: int = 0) -> ScoringResult:
        """Score a batch; `step` reaches TRL-style functions as `trainer_state.global_step`."""
        out: list[ScoringResult] = []

        async def main() -> None:
            # The result travels in `out`, not as the task's result: on Python 3.11, asyncio.run's SIGINT-handler
            # check formats the finished main task with repr(result), and a batch of trajectories takes ~0.2 s to repr.
            out.append(await self._score(trajectories, step))

        asyncio.run(main())
        return out[0]

    async def _score(self, trajectories: list[Trajectory], step: int) -> ScoringResult:
        counts: Counter[str] = Counter()
        live, left_out = [], []
        for traj in trajectories:
            if traj.status is TrajectoryStatus.ERROR:
                counts["rollout_errors"] += 1
                log.warning("sample %s left out: %s", traj.sample_id, traj.error)
                left_out.append((traj, f"rollout error: {traj.error}"))
            else:
                live.append(traj)
        inputs = [_input(t) for t in live]
        results: list[Scores] = []
        if inputs and self.functions:
            first, _ = self.functions[0]
            results.append(await first.score(inputs, step, None))
            verdicts = [
                _correct(v, a) for v, a in zip(results[0].values, results[0].acc or [None] * len(inputs), strict=True)
            ]
            results += await asyncio.gather(*(fn.score(inputs, step, verdicts) for fn, _ in self.functions[1:]))
        scored = []
        for i, traj in enumerate(live):
            item = self._combine(
                traj, [r.values[i] for r in results], results[0].acc[i] if results and results[0].acc else None, counts
            )
            if isinstance(item, str):
                left_out.append((traj, item))
            else:
                item.reward_info = {
                    fn.name: r.info[i]
                    for (fn, _), r in zip(self.functions, results, strict=True)
                    if r.info and r.info[i]
                }
                scored.append(item)
        failed = len(trajectories) - len(scored)
        metrics = {k: float(v) for k, v in sorted(counts.items())}
        return ScoringResult(scored=scored, failed=failed, metrics=metrics, left_out=left_out)

    def _combine(
        self, traj: Trajectory, values: list[float | None | Failure], acc: bool | None, counts: Counter[str]
    ) -> ScoredTrajectory | str:
        """The scored sample, or why it is left out."""
        # (how the log names it, metric name, score | None | why it failed) for every function and reward model
        verdicts: list[tuple[str, str, float | None | Failure]] = [
            (f"reward function {fn.name!r} ", fn.name, v) for (fn, _), v in zip(self.functions, values, strict=True)
        ]
        if traj.model_scores is not None:  # reward models' scores, fetched by the controller (rewards.models)
            verdicts += [(f"reward model {name!r}: ", name, _model_verdict(traj, name)) for name, _ in self.models]
        breakdown: dict[str, float] = {}
        failures = []
        for label, name, value in verdicts:
            if isinstance(value, Failure):
                counts[f"reward_failed/{name}"] += 1
                failures.append(label + value.reason)
            elif value is None:
                counts[f"reward_none/{name}"] += 1
            else:
                breakdown[name] = float(value)
        if failures:
            log.warning("sample %s left out: %s", traj.sample_id, "; ".join(failures))
            return "; ".join(failures)
        if not breakdown and traj.env_reward is None:
            counts["unscored_samples"] += 1
            log.warning("sample %s left out: every reward function returned None for it", traj.sample_id)
            return "every reward function returned None for it"
        weights = {fn.name: weight for fn, weight in self.functions} | dict(self.models)
        total = sum(weights[name] * value for name, value in breakdown.items())
        if traj.env_reward is not None:  # the environment's own score, unweighted
            breakdown["env"] = traj.env_reward
            breakdown |= {f"env/{name}": part for name, part in traj.sample.env_reward_parts.items()}
            total += traj.env_reward
        if traj.status is TrajectoryStatus.TRUNCATED and self.truncation_penalty:
            breakdown["truncation_penalty"] = self.truncation_penalty
            total += self.truncation_penalty
        first = values[0] if values else None
        correct = _correct(first, acc) if isinstance(first, float) else False
        if not self.functions and traj.env_reward is not None:  # an agent's reward alone: 1 (or more) is right
            correct = traj.env_reward >= 1.0
        return ScoredTrajectory(trajectory=traj, reward=total, reward_breakdown=breakdown, correct=correct)


def _model_verdict(traj: Trajectory, name: str) -> float | None | Failure:
    """Reward model `name`'s score of a fetched trajectory: the score, None (the model gave no verdict), or why there
    is none (`Trajectory.model_score_failures`; a model missing from both was never fetched for it)."""
    assert traj.model_scores is not None
    if name in traj.model_score_failures:
        return Failure(traj.model_score_failures[name])
    if name in traj.model_scores:
        return traj.model_scores[name]
    return Failure("no score was fetched")


def _correct(value: float | None | Failure, acc: bool | None) -> bool:
    if acc is not None:
        return acc
    return isinstance(value, float) and value >= 1.0


def _input(traj: Trajectory) -> RewardInput:
    """What reward functions see of a trajectory: the completion is everything from the first assistant turn."""
    prompt, completion = completion_messages(traj.messages, traj.row.messages)
    return RewardInput(
        sample_id=traj.sample_id,
        group_id=traj.group_id,
        prompt=prompt,
        completion=completion,
        response_text=traj.response_text,
        data_source=traj.row.data_source,
        ground_truth=traj.row.ground_truth,
        extra_info=traj.row.extra_info,
        completion_ids=traj.token_ids[traj.loss_mask.bool()].tolist(),
    )
