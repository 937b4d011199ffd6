"""The job's actors as the loop sees them: the learner(s), the rollout backend and the reward models, started
together (Ray actors in one placement group, or objects of this process with `cluster.backend: in_process`),
synced, restarted and stopped together."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rewards.models import RewardModelPool, reward_model_item
from rl.config import JobConfig
from rl.launch.cluster import ray_session
from rl.launch.placement import Placement, place
from rl.trainer.in_process import InProcessLearner
from rl.trainer.learner_group import LearnerGroup
from rollouts.backend import InProcessBackend, RolloutBackend
from rollouts.pool import RolloutPool
from rollouts.shipping import ShippedDir, ship_dir
from rollouts.worker import RolloutWorkerActor


@contextmanager
def runtime(cfg: JobConfig) -> Iterator[None]:
    """Where the job's actors live: a Ray session (local or a cluster), or this process alone."""
    if cfg.cluster.backend == "in_process":
        yield
        return
    with ray_session(cfg.cluster):
        yield


@dataclass
class Actors:
    """The job's learner, rollout backend and reward models."""

    learner: LearnerGroup | InProcessLearner
    workers: RolloutBackend
    reward_models: RewardModelPool | None
    placement: Placement | None
    """The Ray placement group the actors are in (None in process)."""
    policy: ShippedDir | str
    """The starting policy as the actors open it (a restarted learner starts from it too)."""

    @staticmethod
    def start(cfg: JobConfig, policy_dir: Path) -> Actors:
        if cfg.cluster.backend == "in_process":
            backend = InProcessBackend(str(policy_dir), cfg.worker_spec(), cfg.rollout.num_workers)
            return Actors(InProcessLearner(str(policy_dir), cfg), backend, None, None, str(policy_dir))
        placement = place(cfg)
        policy = ship_dir(policy_dir, int(cfg.cluster.ship_max_mb * 2**20))  # actors on nodes without the driver's disk
        learner = LearnerGroup(policy, cfg, placement)
        spec = cfg.worker_spec()
        workers = RolloutPool(
            lambda i: RolloutWorkerActor.options(**placement.options("rollout", i)).remote(policy, spec, i),
            cfg.rollout.num_workers,
            cfg.cluster.max_worker_restarts,
        )
        reward_models = RewardModelPool(
            cfg.reward.models, lambda i: placement.options("reward_model", i), cfg.cluster.max_worker_restarts
        )
        if reward_models.actors and cfg.reward.models_async:
            workers.set_reward_models(reward_models.actors, reward_model_item)
        return Actors(learner, workers, reward_models, placement, policy)

    def sync_weights(self, cfg: JobConfig, version: int) -> dict[str, float]:
        """Push the learners' weights (rank 0's) to every rollout worker as policy `version`: with
        `cluster.weight_sync_delta`, only what changed since the push the workers hold (`rollouts.delta`). Returns the
        push's metrics (bytes sent to a worker, of a full push, whether it was a delta)."""
        delta = cfg.cluster.weight_sync_delta
        if cfg.cluster.weight_sync == "collective":
            assert isinstance(self.workers, RolloutPool) and isinstance(
                self.learner, LearnerGroup
            )  # the config requires ray
            backend = "nccl" if cfg.trainer.learner_gpus > 0 and cfg.rollout.gpus_per_worker > 0 else "gloo"
            return self.workers.broadcast_from(self.learner.actors[0], version, backend, delta).metrics()
        info, update, full = self.learner.weight_update(self.workers.delta_base() if delta else None, delta)
        fallbacks = self.workers.publish(update, version, info, full)
        return {**info.metrics(), **({"sync_full_fallbacks": float(fallbacks)} if info.base_id is not None else {})}

    def restart_learner(self, cfg: JobConfig) -> None:
        """A new learner (group) from the starting policy; the caller restores a checkpoint into it."""
        self.learner.kill()
        if self.placement is None:
            self.learner = InProcessLearner(str(self.policy), cfg)
        else:
            self.learner = LearnerGroup(self.policy, cfg, self.placement)

    def restarts(self) -> dict[str, float]:
        """Rollout workers and reward models restarted so far (metrics)."""
        models = self.reward_models.restarts if self.reward_models is not None else 0
        return {"worker_restarts": float(self.workers.restarts), "reward_model_restarts": float(models)}

    def kill(self) -> None:
        self.learner.kill()
        self.workers.kill()
        if self.reward_models is not None:
            self.reward_models.kill()
        if self.placement is not None:
            self.placement.remove()
