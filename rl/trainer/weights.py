"""The learner's side of weight sync: the payload it pushes to the rollout workers (the state dict with the quantization
targets packed as INT4; with LoRA the adapters alone), whole or as a delta against its last push
(`rollouts.delta`, `cluster.weight_sync_delta`), through the object store or one collective broadcast
(`rollouts.collective`). A mixin of `Learner`, kept apart so the learner's file holds the update."""

from __future__ import annotations

from typing import Any

import torch

from rollouts.collective import BroadcastMember, Manifest, flatten
from rollouts.delta import DeltaSender, PushInfo, WeightDelta
from rollouts.quant import QuantSpec, WeightPayload, pack_state_dict, payload_nbytes


class WeightSource(BroadcastMember):
    """What `Learner` pushes. It reads the learner's `model`, `lora`, `quant`, `quant_targets` and `version`."""

    model: torch.nn.Module
    lora: Any
    quant: QuantSpec | None
    quant_targets: list[str]
    version: int
    full_state_dict: Any  # () -> the whole weights on the CPU (a sharded learner's gather: rl/trainer/sharding.py)
    _sender: DeltaSender | None = None
    _outgoing: torch.Tensor | None = None

    @property
    def sender(self) -> DeltaSender:
        if self._sender is None:
            self._sender = DeltaSender()
        return self._sender

    def get_weights(self) -> WeightPayload:
        """The weight-sync payload: the state dict, with the quantization targets packed as INT4 when enabled."""
        if self.lora is not None:  # the adapters alone: the workers hold the frozen base
            return self.lora.payload()
        state = self.full_state_dict()  # on the CPU: the object store carries CPU tensors
        if self.quant is None:
            return {k: v.clone() for k, v in state.items()}
        return pack_state_dict(state, self.quant, self.quant_targets)

    def weight_update(
        self, base_id: str | None, delta: bool
    ) -> tuple[PushInfo, WeightPayload | WeightDelta, WeightPayload | None]:
        """One push: (what it carries, the update: a delta against push `base_id` when `delta` is on and this
        learner made that push, else the full payload; the full payload when the update is a delta). LoRA pushes
        are adapters only and always whole."""
        return self.sender.push(self.get_weights(), self.version, base_id, delta and self.lora is None)

    def pushed_weights(self) -> tuple[str | None, WeightPayload]:
        """(sync id, full payload) of the last push when kept (delta sync), else (None, the current weights): what a
        restarted rollout worker loads."""
        return self.sender.last_payload() or (None, self.get_weights())

    def prepare_broadcast(self, base_id: str | None = None, delta: bool = False) -> tuple[Manifest, PushInfo]:
        """Collective weight sync, part 1: pack the push (`weight_update`) into one buffer; returns its manifest (the
        receivers allocate from it) and what it carries."""
        info, update, _ = self.weight_update(base_id, delta)
        manifest, self._outgoing = flatten(update, self.broadcast_group.device if self.broadcast_group else "cpu")
        return manifest, info

    def send_broadcast(self) -> int:
        """Collective weight sync, part 2: broadcast the buffer (blocks until every worker received it)."""
        if self.broadcast_group is None or self._outgoing is None:
            raise RuntimeError("send_broadcast before join_broadcast and prepare_broadcast")
        self.broadcast_group.broadcast(self._outgoing)
        n, self._outgoing = int(self._outgoing.numel()), None
        return n

    def weight_sync_bytes(self) -> dict[str, int]:
        """Bytes of one full weight-sync payload (INT4 part, the bf16 size of the same weights, the dense rest)."""
        return payload_nbytes(self.get_weights()) | (self.lora.sync_bytes() if self.lora is not None else {})
