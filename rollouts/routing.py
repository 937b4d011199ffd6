"""Which experts each token was routed to: found and read in a model's MoE blocks, for routing replay (R3).

Rollout Routing Replay (arXiv 2510.11370): a MoE router picks its top-k experts from scores that differ by float
rounding (and by INT4 experts upstream) between the rollout engine and the learner, so the two often route a token
differently and the learner's logprob is of another network. The engine records each position's routed experts per
MoE layer (`RoutingRecorder`, one byte per expert id), the trajectory carries them, and the learner can replay them
(`rl.trainer.routing`).

The blocks tiderl can read and replay are DeepSeek-V3-style ones (Kimi K2's, the built-in policy's): a module with
`experts` and a `gate` router holding `weight`, `top_k`, `e_score_correction_bias`, `norm_topk_prob` and
`routed_scaling_factor`, whose forward returns (router logits, top-k weights, top-k indices). Any other MoE block
(Mixtral's, Qwen-MoE's routers) is refused by name rather than silently left out.
"""

from __future__ import annotations

import torch
from torch import nn

ROUTER_FIELDS = ("weight", "top_k", "e_score_correction_bias", "norm_topk_prob", "routed_scaling_factor")


def moe_blocks(model: nn.Module, what: str) -> list[nn.Module]:
    """The model's MoE blocks, in layer order; an error naming `what` needs them when there are none, or when a
    block's router is not one tiderl can read and replay."""
    blocks = [m for m in model.modules() if hasattr(m, "experts") and hasattr(m, "gate")]
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if not blocks:
        raise ValueError(
            f"{what} needs a mixture-of-experts model; model.path is a {model_type!r} model without MoE blocks "
            "(set algorithm.routing_replay=off)"
        )
    for block in blocks:
        missing = [f for f in ROUTER_FIELDS if not hasattr(block.gate, f)]
        if missing:
            raise ValueError(
                f"{what}: the {model_type!r} model's MoE router {type(block.gate).__name__} lacks {missing}; tiderl "
                "records and replays DeepSeek-V3-style routers (Kimi K2's, the built-in policy's) only (set "
                "algorithm.routing_replay=off)"
            )
    return blocks


def routing_dtype(num_experts: int) -> torch.dtype:
    """One byte per expert id up to 256 experts (DeepSeek V3's), two bytes beyond (Kimi K2's 384)."""
    return torch.uint8 if num_experts <= 256 else torch.int16


class RoutingRecorder:
    """Reads the experts every MoE block of a model routed the tokens of its latest forward to.

    The engine's fused blocks (`rollouts.mlp._FusedMoE`) keep their choice as `chosen`; a block the engine runs as
    the model wrote it is read through a forward hook on its router. `read()` returns [tokens, layers, top_k] in
    the order the blocks saw the tokens (the forward's rows flattened)."""

    def __init__(self, model: nn.Module, fused: list) -> None:
        blocks = moe_blocks(model, "routing replay")
        self.num_layers, self.top_k = len(blocks), int(blocks[0].gate.top_k)
        self.dtype = routing_dtype(int(blocks[0].gate.weight.shape[0]))
        by_block = {id(f.moe): f for f in fused}
        self._sources: list = []
        for block in blocks:
            if id(block) in by_block:
                self._sources.append(by_block[id(block)])
            else:
                holder = _Holder()
                block.gate.register_forward_hook(holder.hook)
                self._sources.append(holder)

    def read(self) -> torch.Tensor:
        """[tokens, layers, top_k]: the latest forward's routed experts, sorted per (token, layer)."""
        chosen = torch.stack([s.chosen for s in self._sources], 1)
        return chosen.sort(-1).values.to(self.dtype)


class _Holder:
    """Keeps the top-k indices of the router it hooks, as a fused block keeps its own."""

    chosen: torch.Tensor

    def hook(self, module: nn.Module, inputs: tuple, output: tuple) -> None:
        self.chosen = output[2]
