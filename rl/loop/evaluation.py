"""Held-out evaluation through the rollout workers: greedy accuracy, and sampled accuracy at the rollout temperature."""

from __future__ import annotations

from envs.base import PromptRow
from rewards.scoring import RewardScorer
from rl.config import JobConfig
from rl.loop.metrics import rollout_metrics
from rollouts.backend import RolloutBackend


def evaluate(workers: RolloutBackend, scorer: RewardScorer, rows: list[PromptRow], cfg: JobConfig) -> dict[str, float]:
    """One greedy sample per prompt (`accuracy`, ...) and, if enabled, one sampled one (`accuracy_sampled`, ...)."""
    greedy = scorer.score(workers.generate(rows, 1, greedy=True, seed=cfg.seed))
    out = {**rollout_metrics(greedy.scored), "failed_samples": float(greedy.failed), "num_prompts": float(len(rows))}
    if cfg.eval.sampled:
        sampled = scorer.score(workers.generate(rows, 1, greedy=False, seed=cfg.seed))
        out.update(rollout_metrics(sampled.scored, prefix="sampled_"))
        out["accuracy_sampled"] = out.pop("sampled_accuracy")
    return out
