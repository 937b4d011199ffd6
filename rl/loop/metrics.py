"""Step metrics: `metrics.jsonl` (one flat JSON object per step) in the run dir and the trackers (rl.loop.trackers)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rewards.records import ScoredTrajectory
from rl.loop.trackers import Tracker
from rollouts.records import TrajectoryStatus


def rollout_metrics(scored: list[ScoredTrajectory], prefix: str = "") -> dict[str, float]:
    """Reward, accuracy, lengths and tool use over a step's (or an eval's) scored trajectories."""
    n = max(1, len(scored))
    trajs = [s.trajectory for s in scored]
    out = {
        "reward_mean": sum(s.reward for s in scored) / n,
        "accuracy": sum(s.correct for s in scored) / n,
        "response_length": sum(t.response_length for t in trajs) / n,
        "tool_calls_per_sample": sum(t.num_tool_calls for t in trajs) / n,
        "tool_errors_per_sample": sum(t.num_tool_errors for t in trajs) / n,
        "truncated_fraction": sum(t.status is TrajectoryStatus.TRUNCATED for t in trajs) / n,
        "num_samples": float(len(scored)),
    }
    for reason in sorted({t.truncation for t in trajs if t.truncation}):
        out[f"truncated/{reason}"] = sum(t.truncation == reason for t in trajs) / n
    names = {k for s in scored for k in s.reward_breakdown}
    for name in sorted(names):
        out[f"reward/{name}"] = sum(s.reward_breakdown.get(name, 0.0) for s in scored) / n
    return {prefix + k: v for k, v in out.items()}


class StageTimer:
    """`with timer("generate"): ...` records `time_generate_s`."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[f"time_{stage}_s"] = time.perf_counter() - start


class MetricsLogger:
    """A step's metrics into `metrics.jsonl` and the trackers (`rl.loop.trackers`), its kept samples and the held-out
    evaluations into the trackers."""

    def __init__(self, run_dir: Path, trackers: list[Tracker]) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.trackers = trackers

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append the step's metrics, with `wall_time` (Unix seconds when the step was logged: samples/s over
        any span of steps, resumes and restarts included, is the samples between two rows over their wall_time gap)."""
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "wall_time": time.time(), **metrics}) + "\n")
        numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float)}  # not `failures`' reasons
        for tracker in self.trackers:
            tracker.log_metrics(step, numbers)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        for tracker in self.trackers:
            tracker.log_samples(step, rows)

    def log_eval(self, step: int, result: dict[str, float]) -> None:
        """A held-out evaluation (eval.json has it too) as `eval/<metric>` at `step` (0: before RL)."""
        for tracker in self.trackers:
            tracker.log_metrics(step, {f"eval/{k}": v for k, v in result.items() if isinstance(v, int | float)})

    def rewind(self, step: int) -> None:
        """Forget the steps after `step` (a resume or a restore goes back to a checkpoint and logs them again)."""
        if not self.path.is_file():
            return
        kept = [
            line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step
        ]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
