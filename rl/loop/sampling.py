"""A step's scored batch: the rollouts the pipeline started for the step, scored, and with DAPO's dynamic sampling
the rounds that replace groups without signal."""

from __future__ import annotations

from collections import Counter

from rewards.models import fetch_model_scores
from rewards.records import ScoredTrajectory
from rewards.scoring import RewardScorer, ScoringResult
from rl.config import JobConfig
from rl.loop.actors import Actors
from rl.loop.data import PromptSampler
from rl.loop.metrics import StageTimer
from rl.loop.pipeline import RolloutPipeline
from rollouts.records import Trajectory


def collect_batch(
    cfg: JobConfig,
    step: int,
    pipeline: RolloutPipeline,
    sampler: PromptSampler,
    actors: Actors,
    scorer: RewardScorer,
    timer: StageTimer,
) -> tuple[ScoringResult, dict[str, float]]:
    """Collect (the pipeline started them, up to `rollout.max_staleness` steps ago) and score one step's batch;
    returns it with the sampling metrics.

    With `algorithm.dynamic_sampling` (DAPO), groups whose samples all got the same reward (no learning signal)
    are dropped and new prompts are drawn to replace them, for at most `dynamic_sampling_max_rounds` extra rounds
    (generated at once, with the current weights); the batch keeps at most `trainer.prompts_per_step` groups.
    """
    want, rounds = (
        cfg.trainer.prompts_per_step,
        cfg.algorithm.dynamic_sampling_max_rounds if cfg.algorithm.dynamic_sampling else 0,
    )
    kept: list[ScoredTrajectory] = []
    left_out: list[tuple[Trajectory, str]] = []
    failed, dropped, counts = 0, 0, Counter()
    for round_ in range(rounds + 1):
        missing = want - len({s.trajectory.group_id for s in kept})
        if missing <= 0:
            break
        with timer("generate"):
            if round_ == 0:
                trajectories = pipeline.take(step)
            else:
                r = cfg.rollout
                rows = sampler.next(missing)
                trajectories = actors.workers.generate_step(
                    rows,
                    first_group_id(cfg, step, round_),
                    r.samples_per_prompt,
                    r.partial_rollout_budget,
                    rollout_temperature(cfg, step),
                )
        with timer("score"):
            fetch_model_scores(trajectories, actors.reward_models, cfg.reward.models_async)
            result = scorer.score(trajectories, step)
        if cfg.data.sampling == "prioritized":
            sampler.update(_accuracy_by_row(result.scored))
        failed += result.failed
        left_out += result.left_out
        counts.update(result.metrics)
        groups: dict[int, list[ScoredTrajectory]] = {}
        for s in result.scored:
            groups.setdefault(s.trajectory.group_id, []).append(s)
        for members in groups.values():
            if cfg.algorithm.dynamic_sampling and len({s.reward for s in members}) == 1:
                dropped += 1
            else:
                kept.extend(members)
        if not cfg.algorithm.dynamic_sampling:
            break
    keep_ids = set(list(dict.fromkeys(s.trajectory.group_id for s in kept))[:want])
    kept = [s for s in kept if s.trajectory.group_id in keep_ids]
    extra = (
        {"dropped_groups": float(dropped), "sampling_rounds": float(round_ + 1)}
        if cfg.algorithm.dynamic_sampling
        else {}
    )
    return ScoringResult(scored=kept, failed=failed, metrics=dict(counts), left_out=left_out), extra


def first_group_id(cfg: JobConfig, step: int, round_: int = 0) -> int:
    """Group id of the first prompt of RL step `step` (1-based), dynamic-sampling round `round_`: unique across
    steps and rounds."""
    rounds = cfg.algorithm.dynamic_sampling_max_rounds + 1 if cfg.algorithm.dynamic_sampling else 1
    return ((step - 1) * rounds + round_) * cfg.trainer.prompts_per_step


def rollout_temperature(cfg: JobConfig, step: int) -> float:
    """The sampling temperature of RL step `step` (1-based): constant, or the linear decay of the schedule."""
    r = cfg.rollout
    if r.temperature_final is None:
        return r.temperature
    progress = min(1.0, (step - 1) / r.temperature_decay_steps)
    return r.temperature + (r.temperature_final - r.temperature) * progress


def _accuracy_by_row(scored: list[ScoredTrajectory]) -> dict[int, float]:
    """Share of each prompt's scored samples judged correct (prompts by their row index)."""
    hits: dict[int, list[bool]] = {}
    for s in scored:
        hits.setdefault(s.trajectory.row.index, []).append(s.correct)
    return {i: sum(h) / len(h) for i, h in hits.items()}
