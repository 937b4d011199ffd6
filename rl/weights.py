"""Versioned weight transport from the learner to the rollout workers.

`publish(weights, version)` puts the state dict in the Ray object store once and has every worker load it, so
each trajectory they generate afterwards carries `version`. The learner's state dict can be passed as an
ObjectRef straight from `learner.get_weights.remote()`, so the weights never pass through the driver.
"""

from __future__ import annotations

from typing import Any

import ray


class WeightSync:
    def __init__(self, workers: list[Any]) -> None:
        self.workers = workers
        self.version: int | None = None

    def publish(self, weights: Any, version: int) -> None:
        """`weights`: a state dict or an ObjectRef to one."""
        ref = weights if isinstance(weights, ray.ObjectRef) else ray.put(weights)
        loaded = ray.get([w.load_weights.remote(ref, version) for w in self.workers])
        if any(v != version for v in loaded):
            raise RuntimeError(f"weight sync: workers report versions {loaded}, expected {version}")
        self.version = version
