"""Step metrics: `metrics.jsonl` (one flat JSON object per step) and TensorBoard event files in the run dir."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rewards.records import ScoredTrajectory
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


def save_trajectories(path: Path, scored: list[ScoredTrajectory]) -> None:
    """One JSON object per scored sample: what it saw and said, and how each reward judged it (as verl's
    `rollout_data_dir` and TRL's completion logs keep them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for s in scored:
            t = s.trajectory
            record = {
                "sample_id": t.sample_id,
                "group_id": t.group_id,
                "data_source": t.row.data_source,
                "ground_truth": t.row.ground_truth,
                "messages": t.messages,
                "reward": s.reward,
                "reward_breakdown": s.reward_breakdown,
                "correct": s.correct,
                "status": t.status.value,
                "truncation": t.truncation,
                "response_length": t.response_length,
                "num_turns": t.num_turns,
                "num_tool_calls": t.num_tool_calls,
                "policy_versions": sorted({v for *_, v in t.segments}),
            }
            f.write(json.dumps(record, default=str) + "\n")


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
    def __init__(self, run_dir: Path, tensorboard: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append the step's metrics, with `wall_time` (Unix seconds when the step was logged: samples/s over
        any span of steps, resumes and restarts included, is the samples between two rows over their wall_time gap)."""
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "wall_time": time.time(), **metrics}) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()

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
        if self.writer is not None:
            self.writer.close()
