"""The async pipeline: each step's rollouts are started up to `rollout.max_staleness` steps ahead, so the workers
generate step k+1 while the learner trains on step k.

Timeline with staleness 1 (the default): step k collects the rollouts started one step earlier, starts step k+1's
with the weights the workers hold now (version k-1), scores and trains step k (version k), and pushes version k,
which each worker loads once it has finished step k+1's generation (calls on an actor run in order; the push does
not wait for the loads). Step k+1
then trains on samples one version old: `policy_lag_mean` says how old, and the loss sees the rollout logprobs,
so PPO's clipping (or `algorithm.rollout_correction`'s truncated importance weights) accounts for the gap.
Staleness 0 is the synchronous loop: start, wait, train, push.

Exactness across checkpoints: the rows of in-flight steps were drawn from the data cursor and their samples from
the workers' RNG before the checkpoint was written, so a checkpoint waits for them and keeps their trajectories
(`state()`); a resumed job trains on them first, as the uninterrupted job would have.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from rl.config import JobConfig
from rl.loop.data import PromptSampler
from rollouts.backend import RolloutBackend
from rollouts.records import Trajectory


@dataclass
class _Ahead:
    step: int
    handle: object | None
    """The backend's handle of the step's rollouts; None once collected."""
    trajectories: list[Trajectory] | None = None


class RolloutPipeline:
    def __init__(
        self, cfg: JobConfig, workers: RolloutBackend, sampler: PromptSampler, first_group_id, temperature
    ) -> None:
        """`first_group_id(step)`: the group id of the step's first prompt; `temperature(step)`: its sampling
        temperature."""
        self.cfg, self.workers, self.sampler = cfg, workers, sampler
        self.first_group_id, self.temperature = first_group_id, temperature
        self.ahead: deque[_Ahead] = deque()

    def take(self, step: int) -> list[Trajectory]:
        """Step `step`'s first-round trajectories; starts the steps up to `step + max_staleness` first."""
        last = min(step + self.cfg.rollout.max_staleness, self.cfg.trainer.steps)
        following = self.ahead[-1].step + 1 if self.ahead else step
        for k in range(following, last + 1):
            self.ahead.append(_Ahead(k, self._submit(k)))
        item = self.ahead.popleft()
        if item.step != step:
            raise RuntimeError(f"rollout pipeline out of order: step {step} asked, step {item.step} ready")
        return item.trajectories if item.trajectories is not None else self.workers.collect(item.handle)  # type: ignore[arg-type]

    def _submit(self, step: int) -> object:
        rows = self.sampler.next(self.cfg.trainer.prompts_per_step)
        r = self.cfg.rollout
        return self.workers.submit_step(
            rows, self.first_group_id(step), r.samples_per_prompt, r.partial_rollout_budget, self.temperature(step)
        )

    @property
    def in_flight(self) -> int:
        return len(self.ahead)

    def state(self) -> list[tuple[int, list[Trajectory]]]:
        """Wait for the steps in flight and return their trajectories (for a checkpoint; they stay queued)."""
        for item in self.ahead:
            if item.trajectories is None:
                item.trajectories, item.handle = self.workers.collect(item.handle), None  # type: ignore[arg-type]
        return [(item.step, item.trajectories) for item in self.ahead]  # type: ignore[misc]

    def load_state(self, state: list[tuple[int, list[Trajectory]]]) -> None:
        """Queue the collected steps of a checkpoint (dropping whatever was in flight)."""
        self.ahead = deque(_Ahead(step, None, trajectories) for step, trajectories in state)
