"""Failures reported as failures: a step or an evaluation whose samples failed says how many and why (not a
reward or an accuracy of 0), and a job whose every step failed ends with `JobFailed`, a summary of what failed and
where to look (`tiderl train` exits 1 with it).

A sample fails when its rollout ended in `error` (the environment raised, ...) or its reward could not be computed
(`rewards.scoring`: a function raised, timed out or returned garbage, none scored it); the scorer leaves it out
with its reason. Reasons are counted as they are written; the most frequent few are kept.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rollouts.records import Trajectory

TOP_REASONS = 3


class JobFailed(RuntimeError):
    """Every RL step of the job failed; the message says what failed and where to look."""


def reasons(left_out: list[tuple[Trajectory, str]]) -> dict[str, int]:
    """The most frequent reasons samples were left out, with their counts (the rest as one entry)."""
    counts = Counter(reason for _, reason in left_out)
    top = dict(counts.most_common(TOP_REASONS))
    rest = sum(counts.values()) - sum(top.values())
    if rest:
        top[f"({len(counts) - len(top)} other reasons)"] = rest
    return top


def describe(failures: dict[str, int]) -> str:
    """`8x reward function 'f' raised ValueError: ...; 2x rollout error: ...`"""
    return "; ".join(f"{n}x {reason}" for reason, n in failures.items())


@dataclass
class FailureLog:
    """What failed over a job's steps (this run of it: a resume counts its own steps)."""

    steps: int = 0
    failed_steps: list[int] = field(default_factory=list)
    """Steps whose every sample failed (nothing trained)."""
    samples: int = 0
    counts: Counter[str] = field(default_factory=Counter)

    def add(self, step: int, metrics: dict) -> None:
        self.steps += 1
        failures = metrics.get("failures") or {}
        if metrics.get("skipped_step") and metrics.get("failed_samples"):
            self.failed_steps.append(step)
        self.samples += int(metrics.get("failed_samples", 0))
        self.counts.update(failures)

    def check(self, run_dir: Path) -> None:
        """Raise JobFailed when every step of the run failed."""
        if not self.steps or len(self.failed_steps) < self.steps:
            return
        why = describe(dict(self.counts.most_common(TOP_REASONS)))
        raise JobFailed(
            f"every one of the {self.steps} RL steps failed: all their samples ({self.samples}) were left out and "
            f"nothing was trained. Why: {why}. Where to look: {run_dir / 'trajectories'} (each failed sample with "
            f"its reason, `failed: true`), {run_dir / 'metrics.jsonl'} (`failures` per step), "
            f"{run_dir / 'eval.json'}; fix what the reasons name (a reward function, the environment) and run again"
        )


def step_status(metrics: dict) -> str | None:
    """The terminal's line for a step whose samples all failed (None otherwise)."""
    if not (metrics.get("skipped_step") and metrics.get("failed_samples")):
        return None
    return f"all {metrics['failed_samples']:.0f} samples failed, nothing trained: {describe(metrics['failures'])}"


def eval_status(result: dict, prefix: str = "") -> str:
    """`0.250` for an evaluation part whose samples were scored, the failures when some or all failed."""
    failed = int(result.get(f"{prefix}failed_samples", 0))
    key = "accuracy_sampled" if prefix else "accuracy"
    if key not in result:
        return f"all {failed} samples failed ({describe(result.get(f'{prefix}failures', {}))})"
    text = f"{result[key]:.3f}"
    return text + (f" ({failed} samples failed: {describe(result.get(f'{prefix}failures', {}))})" if failed else "")
