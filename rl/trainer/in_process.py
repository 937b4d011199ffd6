"""The learner in the controller's own process (`cluster.backend: in_process`): `LearnerGroup`'s interface over one
`Learner` object, no Ray. With `rollouts.backend.InProcessBackend` it runs a whole job in one process, which is
what tests of the loop's logic use (seconds instead of an actor start per test)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rl.config import JobConfig
from rl.trainer.batch import TrainBatch
from rl.trainer.learner import Learner
from rl.trainer.learner_group import CHECKPOINT_PARTS
from rl.trainer.trace import TokenTrace
from rollouts.delta import PushInfo
from rollouts.shipping import read_tree, write_tree


class InProcessLearner:
    def __init__(self, policy_dir: str, cfg: JobConfig) -> None:
        if cfg.trainer.num_learners != 1:
            raise ValueError(
                f"cluster.backend: in_process trains with one learner; got "
                f"trainer.num_learners={cfg.trainer.num_learners}"
            )
        self.learner = Learner(policy_dir, cfg.learner_spec())

    @property
    def size(self) -> int:
        return 1

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        return self.learner.train_step(batch)

    def token_traces(self) -> list[TokenTrace]:
        return self.learner.token_traces()

    def get_weights(self) -> Any:
        return self.learner.get_weights()

    def weight_update(self, base_id: str | None, delta: bool) -> tuple[PushInfo, Any, Any]:
        return self.learner.weight_update(base_id, delta)

    def get_version(self) -> int:
        return self.learner.get_version()

    def weight_sync_bytes(self) -> dict[str, int]:
        return self.learner.weight_sync_bytes()

    def reference_kl(self, batch: TrainBatch) -> Any:
        return self.learner.reference_kl(batch)

    def parameters_digests(self) -> list[str]:
        return [self.learner.parameters_digest()]

    def save(self, path: str) -> None:
        write_tree(self.learner.checkpoint_files(), Path(path))

    def load(self, path: str) -> int:
        return self.learner.load_files(read_tree(Path(path), only=CHECKPOINT_PARTS))

    def kill(self) -> None:
        """Nothing to stop: the learner is an object of this process."""
