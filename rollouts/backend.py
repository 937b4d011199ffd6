"""The rollout-backend seam: how the controller talks to generation, whatever generates.

The controller (`rl.loop`) sees one typed protocol, `RolloutBackend`: submit a step's prompt groups and collect
their trajectories later (several steps may be in flight: the async pipeline), generate whole samples for an
evaluation, push weights with a version, pause and resume partial rollouts across steps, and save or restore
what a checkpoint keeps. Two implementations:

- `rollouts.pool.RolloutPool`: `RolloutWorker` Ray actors, on one machine or a cluster, with worker restarts.
- `InProcessBackend` (here): the same `RolloutWorker` objects in the caller's process, no Ray. Calls run when
  they are made, in the order they are made, which is the order a Ray actor runs its queued calls in; so a step
  submitted before a weight push is generated with the old weights, as on Ray. Tests of the loop's logic run on
  it in seconds, and `cluster.backend: in_process` runs a whole job without Ray (for debugging).

A later backend (a remote OpenAI-compatible server, vLLM on GPUs) implements the protocol and plugs into the loop
without touching it. Both implementations spread a step's prompts the same way (`spread_rows`) and keep
checkpoint state in the same format (`spread_paused`), so a checkpoint moves between them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from envs.base import PromptRow
from rollouts.agent_loop import GenerationProgress
from rollouts.delta import PushInfo
from rollouts.records import Trajectory
from rollouts.shipping import ShippedDir
from rollouts.worker import RolloutWorker, WorkerSpec

PausedGroup = tuple[int, PromptRow, bytes | None]
"""A paused group in a checkpoint: (group id, prompt row, its pickled episodes or None to start it again)."""


@runtime_checkable
class RolloutBackend(Protocol):
    """Generation as the controller sees it (see the module docstring)."""

    restarts: int
    """Workers restarted over the job (a backend that never restarts one keeps 0)."""

    def submit_step(
        self,
        rows: list[PromptRow],
        first_group_id: int,
        samples_per_prompt: int,
        iteration_budget: int,
        temperature: float | None = None,
    ) -> Any:
        """Start a training step's rollouts: row i becomes group `first_group_id + i`; returns a handle for `collect`.
        `iteration_budget` > 0 pauses samples after that many tokens (partial rollouts, resumed by the next step)."""
        ...

    def collect(self, handle: Any) -> list[Trajectory]:
        """The trajectories of every group that finished in the step `handle` names (only whole groups)."""
        ...

    def generate_step(
        self,
        rows: list[PromptRow],
        first_group_id: int,
        samples_per_prompt: int,
        iteration_budget: int,
        temperature: float | None = None,
    ) -> list[Trajectory]:
        """`submit_step` and `collect` in one."""
        ...

    def generate(
        self, rows: list[PromptRow], samples_per_prompt: int, greedy: bool = False, seed: int | None = None
    ) -> list[Trajectory]:
        """Every sample to its end (evaluation); with `seed`, repeatable and without touching the training stream."""
        ...

    def publish(self, weights: Any, version: int, info: PushInfo | None = None, full: Any = None) -> int:
        """Every later call generates with `weights` (a weight-sync payload) as policy `version`. With `info` naming a
        base push (`rollouts.delta`), `weights` is a delta against it and `full` the whole payload, which workers
        not holding the base get instead; returns how many did."""
        ...

    def delta_base(self, common: bool = False) -> str | None:
        """The push most workers hold (with `common`: the one all hold), what the next delta is taken against."""
        ...

    def set_reward_models(self, handles: dict[str, Any], make_item: Callable[[Any], Any]) -> None:
        """Reward-model actors to send each finished group to, and the function that makes their input."""
        ...

    def set_progress_sink(self, sink: Callable[[int, GenerationProgress], None] | None) -> None:
        """Every worker reports its running generation's progress to `sink(worker_index, progress)`."""
        ...

    def num_paused(self) -> int:
        """Samples paused mid-rollout, waiting for the next step."""
        ...

    def drop_in_flight(self) -> None:
        """Forget every step and group in flight (going back to a checkpoint, which holds its own)."""
        ...

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: `{"rng": [per worker], "paused": [per worker: [PausedGroup]],
        "samples_per_prompt"}`."""
        ...

    def load_state(self, state: dict[str, Any]) -> int:
        """Restore `state()`; returns the paused groups restored."""
        ...

    def pad_token_id(self) -> int: ...

    def kill(self) -> None: ...


def spread_rows(rows: list[PromptRow], first_group_id: int, n: int) -> list[tuple[list[PromptRow], list[int]]]:
    """Worker i's share of a step: rows i, i+n, ... and their group ids (row j is group `first_group_id + j`)."""
    group_ids = list(range(first_group_id, first_group_id + len(rows)))
    return [(rows[i::n], group_ids[i::n]) for i in range(n)]


def spread_paused(state: dict[str, Any], n: int) -> list[list[PausedGroup]]:
    """A checkpoint's paused groups for `n` workers: each worker's own when the count matches, else dealt round."""
    paused = state["paused"]
    if len(paused) == n:
        return paused
    flat = [group for per_worker in paused for group in per_worker]
    return [flat[i::n] for i in range(n)]


@dataclass
class _Step:
    """A submitted step in `InProcessBackend`: its trajectories, generated when it was submitted."""

    trajectories: list[Trajectory] = field(default_factory=list)


class InProcessBackend:
    """`RolloutWorker`s in this process: the `RolloutBackend` without Ray (see the module docstring)."""

    def __init__(self, policy_dir: str | ShippedDir, spec: WorkerSpec, size: int) -> None:
        self.workers = [RolloutWorker(policy_dir, spec, i) for i in range(size)]
        self.restarts = 0
        self.samples_per_prompt: int | None = None

    def submit_step(
        self,
        rows: list[PromptRow],
        first_group_id: int,
        samples_per_prompt: int,
        iteration_budget: int,
        temperature: float | None = None,
    ) -> _Step:
        self.samples_per_prompt = samples_per_prompt
        step = _Step()
        for worker, (rows_i, ids_i) in zip(
            self.workers, spread_rows(rows, first_group_id, len(self.workers)), strict=True
        ):
            step.trajectories += worker.generate_step(rows_i, ids_i, samples_per_prompt, iteration_budget, temperature)
        return step

    def collect(self, handle: _Step) -> list[Trajectory]:
        return handle.trajectories

    def generate_step(
        self,
        rows: list[PromptRow],
        first_group_id: int,
        samples_per_prompt: int,
        iteration_budget: int,
        temperature: float | None = None,
    ) -> list[Trajectory]:
        return self.collect(self.submit_step(rows, first_group_id, samples_per_prompt, iteration_budget, temperature))

    def generate(
        self, rows: list[PromptRow], samples_per_prompt: int, greedy: bool = False, seed: int | None = None
    ) -> list[Trajectory]:
        n = len(self.workers)
        return [
            t
            for i, worker in enumerate(self.workers)
            if rows[i::n]
            for t in worker.generate(rows[i::n], samples_per_prompt, greedy, None if seed is None else seed + i)
        ]

    def publish(self, weights: Any, version: int, info: PushInfo | None = None, full: Any = None) -> int:
        base_id, sync_id = (info.base_id, info.sync_id) if info is not None else (None, None)
        fallbacks = 0
        for worker in self.workers:
            lagging = base_id is not None and worker.sync_id != base_id
            worker.load_weights(full if lagging else weights, version, sync_id)
            fallbacks += lagging
        return fallbacks

    def delta_base(self, common: bool = False) -> str | None:
        held = [w.sync_id for w in self.workers]
        if common and len(set(held)) > 1:
            return None
        return max(set(held), key=held.count, default=None)

    def set_reward_models(self, handles: dict[str, Any], make_item: Callable[[Any], Any]) -> None:
        for worker in self.workers:
            worker.set_reward_models(handles, make_item)

    def set_progress_sink(self, sink: Callable[[int, GenerationProgress], None] | None) -> None:
        for worker in self.workers:
            worker.set_progress_sink(sink)

    def num_paused(self) -> int:
        return sum(worker.num_paused() for worker in self.workers)

    def drop_in_flight(self) -> None:
        for worker in self.workers:
            worker.drop_open_groups()

    def state(self) -> dict[str, Any]:
        return {
            "rng": [worker.get_rng_state() for worker in self.workers],
            "paused": [worker.export_paused() for worker in self.workers],
            "samples_per_prompt": self.samples_per_prompt,
        }

    def load_state(self, state: dict[str, Any]) -> int:
        if len(state["rng"]) == len(self.workers):
            for worker, rng in zip(self.workers, state["rng"], strict=True):
                worker.set_rng_state(torch.as_tensor(rng))
        self.samples_per_prompt = state.get("samples_per_prompt") or self.samples_per_prompt
        per_worker = spread_paused(state, len(self.workers))
        for worker, groups in zip(self.workers, per_worker, strict=True):
            if groups:
                assert self.samples_per_prompt is not None  # a checkpoint with paused groups recorded it
                worker.adopt_groups(
                    [g[1] for g in groups], [g[0] for g in groups], self.samples_per_prompt, [g[2] for g in groups]
                )
        return sum(len(groups) for groups in per_worker)

    def pad_token_id(self) -> int:
        return self.workers[0].pad_token_id()

    def kill(self) -> None:
        for worker in self.workers:
            worker.drop_open_groups()  # closes their environments (sandboxes, files)
