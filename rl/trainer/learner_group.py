"""The learner as the controller sees it: one or several data-parallel learner actors behind one interface.

With `trainer.num_learners` > 1 the actors form a torch.distributed group (gloo on CPU, NCCL on GPU; rank 0
hosts the rendezvous); each step the batch is cut into token-balanced shards, one per learner, the gradients
are summed over the group (`rl.trainer.distributed`), and every learner takes the same optimizer step. Rank 0 is the
source of weights and checkpoints; every rank loads a checkpoint. With `trainer.sharding: fsdp` each learner holds a
shard of the parameters, gradients and optimizer state (rl/trainer/sharding.py): rank 0 still publishes the weights
(every rank joins their gather at the end of each update), and every rank writes its optimizer shards into a
checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray
import ray.exceptions

from rl.config import JobConfig
from rl.launch.placement import Placement
from rl.trainer.batch import TrainBatch
from rl.trainer.learner import Learner
from rl.trainer.sharding import SHARDS_DIR
from rl.trainer.trace import TokenTrace
from rollouts.actors import ACTOR_LOST
from rollouts.delta import PushInfo
from rollouts.shipping import ShippedDir, read_tree, write_tree

CHECKPOINT_PARTS = ("policy", "adapter", "learner_state.pt", SHARDS_DIR)  # what learners write (LoRA: adapter)
LearnerActor = ray.remote(Learner)
"""The learner as a Ray actor (made here, so that rl.trainer.learner imports no Ray: a machine without Ray runs it)."""


class LearnerGroup:
    def __init__(self, policy_dir: str | ShippedDir, cfg: JobConfig, placement: Placement) -> None:
        n = cfg.trainer.num_learners
        self.sharded = cfg.trainer.sharding == "fsdp"
        spec = cfg.learner_spec()
        self.actors = [
            LearnerActor.options(**placement.options("learner", i)).remote(policy_dir, spec) for i in range(n)
        ]
        if n > 1:
            address, port = ray.get(self.actors[0].address.remote())
            ray.get([a.init_distributed.remote(rank, n, address, port) for rank, a in enumerate(self.actors)])

    @property
    def size(self) -> int:
        return len(self.actors)

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One update over all learners; the metrics (already reduced over the group) come from rank 0."""
        shards = batch.shard(self.size) if self.size > 1 else [batch]
        results = self._get_all([a.train_step.remote(shard) for a, shard in zip(self.actors, shards, strict=True)])
        return {**results[0], **({"learner_shard_tokens_max_share": _max_share(shards)} if self.size > 1 else {})}

    def token_traces(self) -> list[TokenTrace]:
        """The per-token values the last update recorded (each learner's, for the traced rows of its shard)."""
        return [t for traces in self._get_all([a.token_traces.remote() for a in self.actors]) for t in traces]

    def get_weights(self) -> ray.ObjectRef:
        """The weight-sync payload of rank 0, left in the object store (it never passes through the driver)."""
        return self.actors[0].get_weights.remote()

    def weight_update(self, base_id: str | None, delta: bool) -> tuple[PushInfo, ray.ObjectRef, ray.ObjectRef | None]:
        """Rank 0's push (`Learner.weight_update`): what it carries, and refs to the update and (for a delta) the
        full payload, left in the object store."""
        info, update, full = self.actors[0].weight_update.options(num_returns=3).remote(base_id, delta)
        info = ray.get(info)
        return info, update, full if info.base_id is not None else None

    def get_version(self) -> int:
        return ray.get(self.actors[0].get_version.remote())

    def weight_sync_bytes(self) -> dict[str, int]:
        return ray.get(self.actors[0].weight_sync_bytes.remote())

    def reference_kl(self, batch: TrainBatch) -> Any:
        return ray.get(self.actors[0].reference_kl.remote(batch))

    def parameters_digests(self) -> list[str]:
        """One hash of all parameters per learner (equal after every step); sharded: rank 0's, of the whole weights."""
        return ray.get([a.parameters_digest.remote() for a in self.actors[: 1 if self.sharded else None]])

    def save(self, path: str) -> None:
        """Rank 0's policy, optimizer and RNG states into `path`, written here (on the driver's node); sharded: with
        every rank's optimizer shards (each rank's files have their own names)."""
        files: dict[str, bytes] = {}
        for part in self._get_all([a.checkpoint_files.remote() for a in self.actors[: None if self.sharded else 1]]):
            files.update(part)
        write_tree(files, Path(path))

    def load(self, path: str) -> int:
        """Every learner from the checkpoint at `path` (read here, sent through the object store)."""
        files = ray.put(read_tree(Path(path), only=CHECKPOINT_PARTS))
        versions = self._get_all([a.load_files.remote(files) for a in self.actors])
        return versions[0]

    def _get_all(self, refs: list[ray.ObjectRef]) -> list:
        """Results of one call per learner, failing as soon as one fails; when a learner died, the others'
        collectives fail too, so the error raised is the death (what the controller recovers from)."""
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(ready[0])
            except ACTOR_LOST:
                raise
            except ray.exceptions.RayTaskError:
                if self.size > 1:
                    for a in self.actors:  # a dead peer explains a failed collective
                        try:
                            ray.get(a.get_version.remote(), timeout=30)
                        except ACTOR_LOST:
                            raise
                        except ray.exceptions.GetTimeoutError:
                            pass
                raise
        return ray.get(refs)

    def kill(self) -> None:
        for a in self.actors:
            ray.kill(a)


def _max_share(shards: list[TrainBatch]) -> float:
    """The largest shard's share of the batch's tokens (1/num_learners when perfectly balanced)."""
    tokens = [float(s.attention_mask.sum()) for s in shards]
    return max(tokens) / max(sum(tokens), 1.0)
