"""What every Ray actor of a job shares: the errors that mean an actor is gone, and the environment its process
runs with."""

from __future__ import annotations

import ray.exceptions

# What a call to a Ray actor raises when the actor is gone (its process killed or crashed, its node lost):
# the errors the job recovers from by restarting the actor (any other error is the actor's own bug).
ACTOR_LOST = (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError)

# Rollout workers receive whole state dicts every step; read-only zero-copy tensors make that ~30x faster.
RAY_ENV = {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1", "TOKENIZERS_PARALLELISM": "false"}
