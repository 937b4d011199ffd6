"""Generation progress in the terminal during a step: samples done / in flight / paused, and tokens generated.

A step's rollouts run inside one call per rollout worker, which can take minutes with a real model; the RL-step bar
moves only when the step ends. Each worker's agent loop reports its running call's counts every half second
(`rollouts.agent_loop.GenerationProgress`) to a `ProgressBoard`: an object of this process with the in-process
backend, a small Ray actor otherwise (the workers are busy in their call, so the board is what the controller asks).
`GenerationDisplay` polls the board from a thread and keeps a second row of the job's progress display current.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import ray
from rich.progress import Progress, TaskID

from rollouts.agent_loop import GenerationProgress


class ProgressBoard:
    """The latest progress each rollout worker reported."""

    def __init__(self) -> None:
        self.workers: dict[int, GenerationProgress] = {}

    def report(self, worker: int, progress: GenerationProgress) -> None:
        self.workers[worker] = progress

    def total(self) -> GenerationProgress:
        return sum(self.workers.values(), GenerationProgress())


ProgressBoardActor = ray.remote(num_cpus=0)(ProgressBoard)


def progress_sink(in_process: bool) -> tuple[Callable[[int, GenerationProgress], None], Callable[[], Any]]:
    """A board: (the sink the workers report to, a function that reads the board's total)."""
    if in_process:
        board = ProgressBoard()
        return board.report, board.total
    actor = ProgressBoardActor.remote()
    return (lambda worker, progress: actor.report.remote(worker, progress)), (
        lambda: ray.get(actor.total.remote(), timeout=5)
    )


class GenerationDisplay:
    """A 'rollouts' row in `progress` (done of the samples the workers hold, in flight, paused, tokens), updated
    from `read` (a board's total) every `every_s` seconds by a daemon thread until `stop`."""

    def __init__(self, progress: Progress, read: Callable[[], GenerationProgress], every_s: float = 0.5) -> None:
        self.progress, self.read, self.every_s = progress, read, every_s
        self.task: TaskID | None = None  # added on the first report, so the row sits under the RL-step bar
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tiderl-generation-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.show(self.read())
            except Exception:  # a board that cannot answer this once (the job is ending): keep the last counts
                continue

    def show(self, p: GenerationProgress) -> None:
        total = p.done + p.running + p.paused
        status = f"{p.running} in flight · {p.paused} paused · {p.tokens:,} tokens generated"
        if self.task is None:
            self.task = self.progress.add_task("rollouts", total=None, status="")
        self.progress.update(self.task, completed=p.done, total=max(total, 1), status=status)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def __enter__(self) -> GenerationDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
