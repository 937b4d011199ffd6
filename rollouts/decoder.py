"""The rollout engine's forward passes: prefill and one-token decode over a preallocated, slot-indexed KV cache.

Why not the model's own `forward`: on a CPU (and at small sizes on a GPU) a decode step of the HF forward is
dominated by per-op overhead that does not depend on the batch (mask construction, a cache that grows by
concatenation, MLA latents re-expanded through `kv_b_proj` over the whole history every step, a MoE block that
loops over experts). vLLM and SGLang solve this with their own model code but run only on CUDA. So the decoder
keeps the model's modules and weights (projections, the MLP or MoE block, INT4 modules included) and replaces the
glue: each sequence owns a slot of a cache allocated once, its keys/values are written in place at its position,
and attention reads the slots under one padding mask. Numerics match the HF forward to float rounding (a test
pins the logits to 1e-4 and greedy tokens to identity).

Architectures (the decoder-layer layout these HF families share: embed → [norm → attention → residual → norm →
MLP/MoE → residual] × N → norm → lm_head):
- `deepseek_v3` (Kimi K2's; the built-in policy): multi-head latent attention. The cache holds the compressed
  latent and the shared rotary key per position (MLA's point: one small vector per token, not per head); decode
  runs attention in the latent space (query absorbed through `kv_b_proj`'s key half, output through its value
  half), as DeepSeek's inference code does. Small MoE blocks (all experts ≤ `FUSE_MOE_MAX_ELEMENTS`) run on
  dense (INT4: dequantized) expert weights: a few tokens as two matmuls over every expert at once, scaled by
  the router's weights (zero for experts a token was not routed to), more tokens sorted by expert.
- `llama`, `mistral`, `qwen2`, `qwen3` (SmolLM2 is `llama`): grouped-query attention with RoPE (and Qwen3's
  per-head q/k norms); the cache holds the KV heads.

This module holds the `Decoder` (the layer loop, masks, rotary tables, logits); each layer's attention and its
cache are an adapter in `rollouts/attention.py` (`_MLA`, `_GQA`), its MLP or MoE block one in `rollouts/mlp.py`,
and the fused projections and norm they share sit in `rollouts/projections.py`.
"""

from __future__ import annotations

import torch
from torch import nn

from rollouts.attention import _GQA, _MLA
from rollouts.mlp import _FusedMoE, _GatedMLP
from rollouts.projections import _projection, _rms_norm
from rollouts.routing import RoutingRecorder

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "llama", "mistral", "qwen2", "qwen3")


class Decoder:
    """Prefill and decode for one HF causal LM over `slots` cache slots of up to `max_len` positions each."""

    def __init__(
        self,
        model: nn.Module,
        slots: int,
        max_len: int,
        record_routing: bool = False,
        matmul_dtype: torch.dtype | None = None,
    ) -> None:
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"the rollout engine runs {', '.join(SUPPORTED_MODEL_TYPES)} models; model.path is a "
                f"{config.model_type!r} model (its decoder layers would need an attention adapter in "
                "rollouts/attention.py)"
            )
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True) and window < max_len:
            raise ValueError(
                f"sliding-window attention ({window} < {max_len} positions) is not supported by the rollout engine"
            )
        if max_len > config.max_position_embeddings:
            raise ValueError(
                f"sequences of {max_len} tokens exceed the model's max_position_embeddings "
                f"({config.max_position_embeddings})"
            )
        self.model, self.body = model, model.model
        self.layers = list(self.body.layers)
        device, dtype = model.device, next(model.parameters()).dtype
        adapter = _MLA if config.model_type == "deepseek_v3" else _GQA
        self.attn = [adapter(layer.self_attn, config, slots, max_len, device, dtype) for layer in self.layers]
        self.mlps = [
            _FusedMoE(layer.mlp, config) if _FusedMoE.applies(layer.mlp, config) else _GatedMLP.wrap(layer.mlp)
            for layer in self.layers
        ]
        self.slots, self.max_len, self.device = slots, max_len, device
        self.matmul_dtype = matmul_dtype
        """The projections' and the head's matmul dtype when it is not the model's (mixed precision,
        `rollouts/projections.py`); None = the model's."""
        fused = [m for m in self.mlps if isinstance(m, _FusedMoE)]
        self.routes = RoutingRecorder(model, fused) if record_routing else None
        """With `record_routing`: reads the experts each MoE layer chose in the latest prefill, decode or extend."""
        # cos/sin of every position, computed once by the model's own rotary module (the values it computes per call)
        cos, sin = self.body.rotary_emb(
            torch.zeros(1, device=device, dtype=dtype), torch.arange(max_len, device=device)[None]
        )
        self.cos, self.sin = cos[0], sin[0]  # [max_len, rotary dim]
        self.refresh()

    def refresh(self) -> None:
        """Pick up weights loaded into the model since the last batch (called when a batch opens)."""
        for part in [*self.attn, *self.mlps]:
            if hasattr(part, "refresh"):
                part.refresh(self.matmul_dtype)
        self.lm_head = _projection(self.model.lm_head, dtype=self.matmul_dtype)

    def _run(self, ids: torch.Tensor, attend) -> torch.Tensor:
        h = self.body.embed_tokens(ids)
        for layer, attn, mlp in zip(self.layers, self.attn, self.mlps, strict=True):
            h = h + attn.out(attend(attn, _rms_norm(layer.input_layernorm, h)))
            h = h + mlp(_rms_norm(layer.post_attention_layernorm, h))
        return h

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(_rms_norm(self.body.norm, h)).float()

    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, slots: list[list[int]]) -> torch.Tensor:
        """Run right-padded prompts `ids` [u, L] (row i has `lengths[i]` real tokens), write each prompt's cache
        entries into every slot of `slots[i]` (a group's samples share one prefill), and return the logits at
        each prompt's last token [u, vocab]."""
        u, width = ids.shape
        cos, sin = self.cos[:width][None].expand(u, -1, -1), self.sin[:width][None].expand(u, -1, -1)
        dest = torch.tensor([s for group in slots for s in group], device=self.device)
        src = torch.tensor([i for i, group in enumerate(slots) for _ in group], device=self.device)
        h = self._run(ids, lambda attn, x: attn.prefill(x, cos, sin, dest, src))
        return self._logits(h[torch.arange(u, device=self.device), lengths - 1])

    def _mask(self, positions: torch.Tensor, span: int) -> torch.Tensor:
        """Additive attention mask [..., t, span] for queries at `positions` [..., t]: a query sees its slot's
        positions up to its own."""
        visible = torch.arange(span, device=self.device) <= positions[..., None]
        return torch.zeros(visible.shape, device=self.device, dtype=self.cos.dtype).masked_fill_(
            ~visible, float("-inf")
        )

    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, span: int, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One token for each of slots 0..n-1, or of slots `rows` [n] (`tokens`, `positions` [n]): write its cache
        entry at its position, attend over the slot's positions ≤ its own (`span` > every position bounds the
        read); logits [n, vocab]. Slots 0..n-1 read their caches as a view; other rows gather theirs (a copy)."""
        n = tokens.shape[0]
        read = slice(0, n) if rows is None else rows
        rows = torch.arange(n, device=self.device) if rows is None else rows
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        mask = self._mask(positions[:, None], span)  # [n, 1, span]
        h = self._run(tokens[:, None], lambda attn, x: attn.decode(x, cos, sin, rows, positions, span, mask, read))
        return self._logits(h[:, 0])

    def extend(
        self, ids: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """Continue slots `rows` [e] whose caches hold their first `starts[i]` positions: run the right-padded
        tokens `ids` [e, t] (row i has `lengths[i]` real ones) at positions starts[i].., write their cache entries,
        and return the logits at each row's last token [e, vocab]. A multi-turn episode's next turn prefills only
        its new tokens (the tool's result) this way instead of its whole history."""
        e, t = ids.shape
        offsets = torch.arange(t, device=self.device)
        valid = offsets[None] < lengths[:, None]
        positions = (starts[:, None] + offsets).clamp(max=self.max_len - 1)  # pads' positions only bound their reads
        span = int((starts + lengths).max())
        cos, sin = self.cos[positions], self.sin[positions]  # [e, t, rotary dim]
        mask = self._mask(positions, span)  # [e, t, span]
        h = self._run(ids, lambda attn, x: attn.extend(x, cos, sin, rows, positions, valid, span, mask))
        return self._logits(h[torch.arange(e, device=self.device), lengths - 1])
