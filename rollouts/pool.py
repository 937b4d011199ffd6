"""The Ray implementation of the rollout backend (`rollouts.backend.RolloutBackend`): `RolloutWorker` actors,
weight pushes, a step's rollouts spread over the workers, and recovery when a worker dies.

The pool remembers which prompt groups each worker has in flight (this step's, and with partial rollouts the
ones paused from earlier steps). When a worker dies (its process killed, its node lost), the pool starts a new
one in the same placement bundle, gives it the current weights and reward models, and re-issues every group the
dead one had in flight, from scratch under the same group ids and with the step it was submitted with: the dead
worker's samples never reached the controller, so none is counted twice, every group comes back whole, so none
is lost, and every step keeps its own groups, so its sample count is exact whichever call the death was met in.

Ray's own actor restarts (`max_restarts`) would rerun the constructor with the starting weights and fail the
in-flight call anyway; recovery needs the job's state (weights version, groups in flight), so it lives here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.exceptions

from envs.base import PromptRow
from rollouts.actors import ACTOR_LOST
from rollouts.agent_loop import GenerationProgress
from rollouts.backend import spread_paused, spread_rows
from rollouts.delta import PushInfo
from rollouts.records import Trajectory

log = logging.getLogger("tiderl")


class WorkerLostError(RuntimeError):
    """Rollout workers kept dying: more restarts than `cluster.max_worker_restarts` in one call."""


@dataclass
class StepHandle:
    """One step's rollout calls in flight: a result ref per worker and the group ids the step gave each worker (a
    restart replaces both: the re-issued call and the groups it generates)."""

    samples_per_prompt: int
    iteration_budget: int
    temperature: float | None
    refs: dict[int, ray.ObjectRef] = field(default_factory=dict)
    groups: dict[int, list[int]] = field(default_factory=dict)


class RolloutPool:
    def __init__(self, start: Callable[[int], Any], size: int, max_restarts: int = 3) -> None:
        """`start(i)` creates worker `i` (an actor handle); `max_restarts` bounds restarts per call."""
        self.start = start
        self.max_restarts = max_restarts
        self.workers = [start(i) for i in range(size)]
        self.outstanding: list[StepHandle] = []  # submitted, not yet collected (oldest first)
        self.in_flight: list[dict[int, PromptRow]] = [{} for _ in range(size)]
        self.samples_per_prompt: int | None = None
        self.weights: tuple[Any, int, str | None] | None = None  # the full payload of the last push, version, sync id
        self.held: list[str | None] = [None] * size  # the push each worker holds (sent: calls on a worker run in order)
        self.reward_models: dict[str, Any] = {}
        self.reward_model_item: Callable[[Any], Any] | None = None
        self.progress_sink: Callable[[int, GenerationProgress], None] | None = None
        self.restarts = 0  # over the job
        self.version: int | None = None
        self.source: Any = None  # collective weight sync: the learner actor the weights come from
        self.group_source: Any = None  # ... and the one the current broadcast group was formed with
        self.group_stale = False
        self.loading: list[
            tuple[int, ray.ObjectRef, int]
        ] = []  # weight loads sent, answer not yet checked: (worker, ref, version)

    # -- weights and reward models -------------------------------------------------------------------------------
    def publish(self, weights: Any, version: int, info: PushInfo | None = None, full: Any = None) -> int:
        """Have every worker load `weights` (a payload or an ObjectRef to one, put in the object store once) as
        policy `version`; kept, so a restarted worker starts from them. With delta sync (`info.base_id` set),
        `weights` is a delta against that push and `full` the whole payload: a worker that does not hold the base
        (it missed a push, or is new) gets `full` instead. Returns how many workers got `full` that way.

        Returns without waiting for the loads: calls on an actor run in order, so every later call to a worker
        (the next step's rollouts, an evaluation, a checkpoint's state) runs on the new weights, and the
        controller scores and batches the next step while the learner packs and the workers load them. Each
        load's answer is checked once it is in (`_check_loads`); a worker that dies meanwhile is met, restarted
        with these weights and its groups re-issued by the next call that needs it."""
        ref = weights if isinstance(weights, ray.ObjectRef) else ray.put(weights)
        base_id, sync_id = (info.base_id, info.sync_id) if info is not None else (None, None)
        if base_id is not None and full is None:
            raise ValueError("weight sync: a delta push needs the full payload too (for workers without its base)")
        full_ref = ref if base_id is None else full if isinstance(full, ray.ObjectRef) else ray.put(full)
        self._check_loads()
        self.weights, self.source = (full_ref, version, sync_id), None
        fallbacks = 0
        for i, w in enumerate(self.workers):
            send = ref if base_id is None or self.held[i] == base_id else full_ref
            fallbacks += base_id is not None and send is full_ref
            self.loading.append((i, w.load_weights.remote(send, version, sync_id), version))
            self.held[i] = sync_id
        self.version = version
        return fallbacks

    def delta_base(self, common: bool = False) -> str | None:
        """The push most workers hold (with `common`, the one all hold, else None): what a delta is taken against."""
        held = [h for h in self.held if h is not None]
        if not held or (common and len(set(self.held)) > 1):
            return None
        return max(set(held), key=held.count)

    def _check_loads(self, wait: bool = False) -> None:
        """Check the answers of the weight loads that are in (all of them with `wait`): each names the version it
        was sent. A load lost with its worker is left to the next call on that worker, which restarts it."""
        if not self.loading:
            return
        refs = [ref for _, ref, _ in self.loading]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=None if wait else 0)
        done = set(ready)
        for i, ref, version in [entry for entry in self.loading if entry[1] in done]:
            try:
                loaded = ray.get(ref)
            except ACTOR_LOST:
                continue
            if loaded != version:
                raise RuntimeError(f"weight sync: rollout worker {i} reports version {loaded}, expected {version}")
        self.loading = [entry for entry in self.loading if entry[1] not in done]

    def broadcast_from(self, source: Any, version: int, backend: str, delta: bool = False) -> PushInfo:
        """Collective weight sync (`cluster.weight_sync: collective`): `source` (learner rank 0) broadcasts its
        push to every worker in one collective: with `delta`, a delta when every worker holds the push it is taken
        against, else the full payload. The group is formed on first use and formed again when a member was
        replaced; if a worker dies during the broadcast it is restarted with the weights through the object store
        and the group is formed again at the next push."""
        self._check_loads(wait=True)
        if self.group_source is not source or self.group_stale:
            self._form_group(source, backend)
        manifest, info = ray.get(source.prepare_broadcast.remote(self.delta_base(common=True), delta))
        refs = [source.send_broadcast.remote()] + [
            w.receive_weights.remote(manifest, version, info.sync_id) for w in self.workers
        ]
        self.source, self.weights, self.version = source, None, version
        self.held = [info.sync_id] * len(self.workers)
        try:
            ray.get(refs[0])
        except ray.exceptions.RayTaskError:
            # the send failed because a receiver died mid-broadcast (found below); a dead learner raises ActorDiedError
            pass
        try:
            loaded = ray.get(refs[1:])
        except ACTOR_LOST:
            self.group_stale = True
            self._on_all(lambda w: w.load_weights.remote(source.get_weights.remote(), version))  # restarts the dead
            self.held = [None] * len(self.workers)  # reloaded whole, outside any push: the next one is full
            return info
        if any(v != version for v in loaded):
            raise RuntimeError(f"weight broadcast: workers report versions {loaded}, expected {version}")
        return info

    def _form_group(self, source: Any, backend: str) -> None:
        members = [source, *self.workers]
        if self.group_source is not None:
            for member in [self.group_source, *self.workers]:
                try:
                    ray.get(member.leave_broadcast.remote())
                except ray.exceptions.RayError:  # a dead member has nothing to leave
                    pass
        address, port = ray.get(source.address.remote())
        ray.get([m.join_broadcast.remote(rank, len(members), address, port, backend) for rank, m in enumerate(members)])
        self.group_source, self.group_stale = source, False

    def set_reward_models(self, handles: dict[str, Any], make_item: Callable[[Any], Any]) -> None:
        """Reward model actors the workers send finished groups to (`reward.models_async`), and the reward layer's
        function that turns an episode into what they score."""
        self.reward_models = dict(handles)
        self.reward_model_item = make_item
        self._on_all(lambda w: w.set_reward_models.remote(self.reward_models, make_item))

    def set_progress_sink(self, sink: Callable[[int, GenerationProgress], None] | None) -> None:
        """Every worker reports its running generation's progress to `sink` (a callable that reaches the controller
        from the worker's process, e.g. through an actor); kept, so a restarted worker reports too."""
        self.progress_sink = sink
        self._on_all(lambda w: w.set_progress_sink.remote(sink))

    # -- rollouts -------------------------------------------------------------------------------------------------
    def submit_step(
        self,
        rows: list[PromptRow],
        first_group_id: int,
        samples_per_prompt: int,
        iteration_budget: int,
        temperature: float | None = None,
    ) -> StepHandle:
        """Start a training step's rollouts without waiting: row i becomes group `first_group_id + i` on worker
        i mod n. Calls queue on each worker behind the ones before them (and a weight push submitted later waits
        for them), so several steps can be in flight: the async pipeline."""
        self.samples_per_prompt = samples_per_prompt
        handle = StepHandle(samples_per_prompt, iteration_budget, temperature)
        for i, (rows_i, ids_i) in enumerate(spread_rows(rows, first_group_id, len(self.workers))):
            self.in_flight[i].update(zip(ids_i, rows_i, strict=True))
            handle.refs[i] = self.workers[i].generate_step.remote(
                rows_i, ids_i, samples_per_prompt, iteration_budget, temperature
            )
            handle.groups[i] = ids_i
        self.outstanding.append(handle)
        return handle

    def collect(self, handle: StepHandle) -> list[Trajectory]:
        """The trajectories of every group that finished in `handle`'s calls (in worker order). A worker that died
        is restarted and every group it had in flight is generated again, once, with the step it was submitted
        with (see `_restart`)."""
        results = self._run(
            lambda i, reissue: handle.refs[i]
        )  # after a restart, `handle.refs[i]` is the re-issued call
        self.outstanding.remove(handle)
        self._check_loads()
        out: list[Trajectory] = []
        for i in sorted(results):
            for gid in {t.group_id for t in results[i]}:
                self.in_flight[i].pop(gid, None)
            out.extend(results[i])
        return out

    def generate_step(
        self,
        rows: list[PromptRow],
        first_group_id: int,
        samples_per_prompt: int,
        iteration_budget: int,
        temperature: float | None = None,
    ) -> list[Trajectory]:
        """`submit_step` and `collect` in one: a synchronous step's rollouts."""
        return self.collect(self.submit_step(rows, first_group_id, samples_per_prompt, iteration_budget, temperature))

    def generate(
        self, rows: list[PromptRow], samples_per_prompt: int, greedy: bool = False, seed: int | None = None
    ) -> list[Trajectory]:
        """Every sample to its end (evaluation): rows spread over the workers, all samples of a prompt on one;
        with `seed`, worker i samples from seed + i, so a re-run on a restarted worker gives the same samples."""
        chunks = [rows[i :: len(self.workers)] for i in range(len(self.workers))]

        def call(i: int, reissue: bool) -> ray.ObjectRef | None:
            if not chunks[i]:
                return None
            return self.workers[i].generate.remote(
                chunks[i], samples_per_prompt, greedy, None if seed is None else seed + i
            )

        results = self._run(call)
        return [t for i in range(len(self.workers)) for t in results[i]]

    def _run(self, call: Callable[[int, bool], ray.ObjectRef | None]) -> dict[int, list]:
        """Call every worker (`call(i, reissue)`), restarting and re-calling (reissue=True) the ones that die."""
        pending = {ref: i for i in range(len(self.workers)) if (ref := call(i, False)) is not None}
        results: dict[int, list] = {i: [] for i in range(len(self.workers))}
        restarts = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            try:
                results[i] = ray.get(ready[0])
            except ACTOR_LOST as e:
                restarts += 1
                if restarts > self.max_restarts:
                    raise WorkerLostError(
                        f"rollout workers died {restarts} times in one step (cluster.max_worker_restarts = "
                        f"{self.max_restarts}); last: {_reason(e)}"
                    ) from e
                self._restart(i, e)
                ref = call(i, True)
                if ref is not None:
                    pending[ref] = i
        return results

    def _restart(self, i: int, cause: BaseException) -> None:
        groups = len(self.in_flight[i])
        log.warning(
            "rollout worker %d died (%s); restarting it and re-issuing its %d prompt groups", i, _reason(cause), groups
        )
        try:
            ray.kill(self.workers[i], no_restart=True)
        except Exception:  # already gone
            pass
        worker = self.start(i)
        self.held[i] = None
        if self.weights is not None:  # the last push's full payload, as a full push would have given it
            ray.get(worker.load_weights.remote(*self.weights))
            self.held[i] = self.weights[2]
        elif (
            self.source is not None
        ):  # collective sync: the new worker is not in the group; fetch through the object store
            ray.get(worker.load_weights.remote(self.source.get_weights.remote(), self.version))
            self.group_stale = True
        if self.reward_models:
            ray.get(worker.set_reward_models.remote(self.reward_models, self.reward_model_item))
        if self.progress_sink is not None:
            ray.get(worker.set_progress_sink.remote(self.progress_sink))
        self.workers[i] = worker
        self.restarts += 1
        self._reissue(i)

    def _reissue(self, i: int) -> None:
        """Give restarted worker `i` every group its predecessor had in flight, each with the step (still to be
        collected) it was submitted with, oldest step first, so the calls queue in the old order; groups paused by
        steps already collected (partial rollouts) go with the oldest. No step in flight: see `_requeue_lost`."""
        steps = [h for h in self.outstanding if i in h.refs]
        if not steps:
            return
        owned = {gid for h in steps for gid in h.groups[i]}
        carried = [gid for gid in self.in_flight[i] if gid not in owned]
        for h in steps:
            ids = carried + [gid for gid in h.groups[i] if gid in self.in_flight[i]]
            rows = [self.in_flight[i][gid] for gid in ids]
            h.refs[i] = self.workers[i].generate_step.remote(
                rows, ids, h.samples_per_prompt, h.iteration_budget, h.temperature
            )
            h.groups[i], carried = ids, []

    def _on_all(self, method: Callable[[Any], ray.ObjectRef]) -> list:
        """Call `method` on every worker, restarting dead ones (their in-flight groups stay for the next step)."""
        out = []
        for i in range(len(self.workers)):
            for attempt in range(self.max_restarts + 1):
                try:
                    out.append(ray.get(method(self.workers[i])))
                    break
                except ACTOR_LOST as e:
                    if attempt == self.max_restarts:
                        raise WorkerLostError(f"rollout worker {i} keeps dying: {_reason(e)}") from e
                    self._restart(i, e)
                    self._requeue_lost(i)
        return out

    def _requeue_lost(self, i: int) -> None:
        """After a restart with no step in flight, the new worker has none of the old one's paused groups: start
        them again there (fresh episodes), so the next step resumes them as usual."""
        if any(i in h.refs for h in self.outstanding):
            return  # `_restart` re-issued them with the oldest step in flight
        if self.in_flight[i] and self.samples_per_prompt:
            ray.get(
                self.workers[i].adopt_groups.remote(
                    list(self.in_flight[i].values()), list(self.in_flight[i]), self.samples_per_prompt, []
                )
            )

    # -- state ----------------------------------------------------------------------------------------------------
    def drop_in_flight(self) -> None:
        """Forget every group and step in flight (going back to a checkpoint, which holds its own)."""
        self.outstanding = []
        self._on_all(lambda w: w.drop_open_groups.remote())
        self.in_flight = [{} for _ in self.workers]

    def num_paused(self) -> int:
        return sum(self._on_all(lambda w: w.num_paused.remote()))

    def pad_token_id(self) -> int:
        return ray.get(self.workers[0].pad_token_id.remote())

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the workers: sampling RNG states and the paused groups (with their
        episodes when they pickle, environment included; else their prompt, to start again on resume)."""
        return {
            "rng": self._on_all(lambda w: w.get_rng_state.remote()),
            "paused": self._on_all(lambda w: w.export_paused.remote()),
            "samples_per_prompt": self.samples_per_prompt,
        }

    def load_state(self, state: dict[str, Any]) -> int:
        """Restore `state()`: RNG states when the worker count matches (otherwise the old sampling streams
        cannot be reproduced anyway), paused groups spread over the workers. Returns the groups restored."""
        if len(state["rng"]) == len(self.workers):
            for w, rng in zip(self.workers, state["rng"], strict=True):
                ray.get(w.set_rng_state.remote(rng))
        per_worker = spread_paused(state, len(self.workers))
        self.samples_per_prompt = state.get("samples_per_prompt") or self.samples_per_prompt
        self.in_flight = [{gid: row for gid, row, _ in groups} for groups in per_worker]
        for w, groups in zip(self.workers, per_worker, strict=True):
            if groups:
                ray.get(
                    w.adopt_groups.remote(
                        [g[1] for g in groups], [g[0] for g in groups], self.samples_per_prompt, [g[2] for g in groups]
                    )
                )
        return sum(len(groups) for groups in per_worker)

    def kill(self) -> None:
        for w in self.workers:
            ray.kill(w)


def _reason(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"
