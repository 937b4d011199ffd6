"""Held-out evaluation through the rollout workers: greedy accuracy, and sampled accuracy at the rollout temperature.

Accuracy is over the samples that could be scored; samples that failed (the rollout errored, the reward could not be
computed) are counted apart with their reasons (`failed_samples`, `failures`), and a part whose samples all failed
has no accuracy at all: it is reported as failed, not as 0.000 (`rl.loop.failures`).
"""

from __future__ import annotations

from typing import Any

from envs.base import PromptRow
from rewards.scoring import RewardScorer, ScoringResult
from rl.config import JobConfig
from rl.loop.failures import reasons
from rl.loop.metrics import rollout_metrics
from rollouts.backend import RolloutBackend


def evaluate(workers: RolloutBackend, scorer: RewardScorer, rows: list[PromptRow], cfg: JobConfig) -> dict[str, Any]:
    """One greedy sample per prompt (`accuracy`, ...) and, if enabled, one sampled one (`accuracy_sampled`, ...)."""
    greedy = scorer.score(workers.generate(rows, 1, greedy=True, seed=cfg.seed))
    out = {**_part(greedy, ""), "num_prompts": float(len(rows))}
    if cfg.eval.sampled:
        sampled = scorer.score(workers.generate(rows, 1, greedy=False, seed=cfg.seed))
        out |= _part(sampled, "sampled_")
        if "sampled_accuracy" in out:
            out["accuracy_sampled"] = out.pop("sampled_accuracy")
    return out


def _part(result: ScoringResult, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = rollout_metrics(result.scored, prefix) if result.scored else {}
    out[f"{prefix}failed_samples"] = float(result.failed)
    if result.left_out:
        out[f"{prefix}failures"] = reasons(result.left_out)
    return out
