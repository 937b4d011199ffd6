"""The slot decoder's feed-forward blocks (`rollouts/decoder.py`): each decoder layer's MLP or MoE block, run on
the model's own weights with fewer, larger matmuls than the HF module's forward.

- `_FusedMoE`: a small DeepseekV3 MoE block (all experts ≤ `FUSE_MOE_MAX_ELEMENTS`) on dense (INT4: dequantized)
  expert weights: a few tokens as two matmuls over every expert at once, scaled by the router's weights, more
  tokens (`SPARSE_MOE_MIN_TOKENS`) sorted by expert.
- `_GatedMLP`: a dense gated MLP (Llama's, Qwen's) with gate and up as one matmul.

Any other block runs as the model wrote it.
"""

from __future__ import annotations

import torch
from torch import nn

from rollouts.projections import _Matmul, _projection, _weight

FUSE_MOE_MAX_ELEMENTS = 1 << 22
"""Routed + shared expert weights (elements) up to which a MoE block runs on dense weights (`_FusedMoE`)."""
SPARSE_MOE_MIN_TOKENS = 48
"""Tokens from which `_FusedMoE` runs each expert on its own tokens instead of every expert on all of them
(measured on the built-in policy, one CPU thread: equal at 16 tokens, 1.6x faster at 128)."""


class _FusedMoE:
    """A DeepseekV3 MoE block (router + routed experts + shared experts) on dense expert weights.

    Few tokens (a decode step of a small batch): two matmuls over every expert at once, shared experts included,
    each expert's hidden units scaled by the token's router weight (0 where it was not routed); one matmul beats
    one call per expert there. More tokens (`SPARSE_MOE_MIN_TOKENS`: a batch of 128, a prefill): the tokens sorted
    by expert and each expert run on its own tokens only, a quarter of the work at top-2 of 8. The expert weights
    are gathered (INT4 experts dequantized to exactly the values the learner's fake-quant uses) by `refresh` when
    a batch opens (a few MB at most, so a weight sync needs no hook).
    """

    def __init__(self, moe: nn.Module, config) -> None:
        self.moe = moe
        self.gate, self.experts, self.shared = moe.gate, moe.experts, moe.shared_experts
        self.top_k, self.num_experts = config.num_experts_per_tok, config.n_routed_experts
        self.inter = config.moe_intermediate_size
        self.shared_units = config.n_shared_experts  # the shared MLP's width in units of one expert's
        self.act = self.experts.act_fn

    @staticmethod
    def applies(moe: nn.Module, config) -> bool:
        if type(moe).__name__ != "DeepseekV3MoE" or config.n_group != 1:
            return False
        shared = config.moe_intermediate_size * config.n_shared_experts
        return (
            3 * config.hidden_size * (config.n_routed_experts * config.moe_intermediate_size + shared)
            <= FUSE_MOE_MAX_ELEMENTS
        )

    def _expert(self, name: str) -> torch.Tensor:
        packed = getattr(self.experts, "int4", {})
        if name in packed:
            return torch.stack([m.weight.dequantize(torch.float32) for m in packed[name]])
        return getattr(self.experts, name).detach()

    def refresh(self, matmul_dtype: torch.dtype | None = None) -> None:
        """The experts' weights as matmuls (called when a batch opens; `matmul_dtype`: see `_projection`)."""
        gate_up, down = self._expert("gate_up_proj"), self._expert("down_proj")  # [E, 2I, H], [E, H, I]
        e, i = self.num_experts, self.inter
        dtype = self.gate.weight.dtype  # the model's (shared experts may be INT4 modules: `_weight` dequantizes them)
        shared_gate, shared_up, shared_down = (
            _weight(m).detach().to(dtype) for m in (self.shared.gate_proj, self.shared.up_proj, self.shared.down_proj)
        )
        self.router = _Matmul(self.gate.weight.float())
        self.experts_in = [_Matmul(w, dtype=matmul_dtype) for w in gate_up.to(dtype)]  # per expert (sparse)
        self.experts_out = [_Matmul(w, dtype=matmul_dtype) for w in down.to(dtype)]
        self.shared_in = _projection(self.shared.gate_proj, self.shared.up_proj, dtype=matmul_dtype)
        self.shared_out = _projection(self.shared.down_proj, dtype=matmul_dtype)
        gate = torch.cat([gate_up[:, :i].reshape(e * i, -1).to(dtype), shared_gate])
        up = torch.cat([gate_up[:, i:].reshape(e * i, -1).to(dtype), shared_up])
        self.w_in = _Matmul(torch.cat([gate, up]), dtype=matmul_dtype)  # [2 (E I + I_shared), H]
        self.w_out = _Matmul(
            torch.cat(
                [down.permute(1, 0, 2).reshape(down.shape[1], e * i).to(dtype), shared_down],
                dim=1,
            ),
            dtype=matmul_dtype,
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        scores = self.router(x.float()).sigmoid()
        chosen = torch.topk(scores + self.gate.e_score_correction_bias, self.top_k, dim=-1, sorted=False)[1]
        self.chosen = chosen  # [tokens, top_k]: what routing replay records (`rollouts.routing`)
        weights = scores.gather(1, chosen)
        if self.gate.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if self.gate.routed_scaling_factor != 1.0:
            weights = weights * self.gate.routed_scaling_factor
        if x.shape[0] >= SPARSE_MOE_MIN_TOKENS:
            return self._sparse(x, chosen, weights).view(shape)
        # each routed expert's hidden units scaled by the token's weight for it (0: not routed), shared ones by 1
        scale = torch.cat(
            [
                torch.zeros_like(scores).scatter_(1, chosen, weights),
                scores.new_ones(1).expand(x.shape[0], self.shared_units),
            ],
            dim=1,
        )
        gate, up = self.w_in(x).chunk(2, dim=-1)
        hidden = (self.act(gate) * up).view(x.shape[0], -1, self.inter) * scale.to(x.dtype)[:, :, None]
        return self.w_out(hidden.view(x.shape[0], -1)).view(shape)

    def _sparse(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each expert on the tokens routed to it ([n, H] -> [n, H]), added onto the shared experts' output."""
        flat = chosen.reshape(-1)  # [n * top_k]: token t's j-th expert at t * top_k + j
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token = order // self.top_k
        routed = x[token]  # [n * top_k, H], grouped by expert
        parts, start = [], 0
        for e, count in enumerate(counts):
            if count:
                gate, up = self.experts_in[e](routed[start : start + count]).chunk(2, dim=-1)
                parts.append(self.experts_out[e](self.act(gate) * up))
                start += count
        out = torch.cat(parts) * weights.reshape(-1)[order].to(x.dtype)[:, None]
        gate, up = self.shared_in(x).chunk(2, dim=-1)
        return self.shared_out(self.act(gate) * up).index_add_(0, token, out)


class _GatedMLP:
    """A dense gated MLP (Llama's, Qwen's: down(act(gate(x)) * up(x))) with gate and up as one matmul."""

    def __init__(self, mlp: nn.Module) -> None:
        self.mlp, self.act = mlp, mlp.act_fn

    @staticmethod
    def wrap(mlp: nn.Module) -> nn.Module | _GatedMLP:
        """The fast form for a gated MLP, else the module itself (any other block runs as the model wrote it)."""
        return (
            _GatedMLP(mlp)
            if all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))
            else mlp
        )

    def refresh(self, dtype: torch.dtype | None = None) -> None:
        self.gate_up = _projection(self.mlp.gate_proj, self.mlp.up_proj, dtype=dtype)
        self.down = _projection(self.mlp.down_proj, dtype=dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * up)
