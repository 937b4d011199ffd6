"""The slot decoder's attention adapters (`rollouts/decoder.py`): one per decoder layer, each owning that layer's
share of the KV cache (allocated once, one slot per sequence) and running the layer's attention through the
model's own projection weights in three forms: `prefill` (right-padded prompts, each written to its slots),
`decode` (one token per slot, written in place at its position) and `extend` (a few new tokens per slot after
what its cache already holds: a multi-turn episode's next turn).

- `_MLA`: DeepseekV3's multi-head latent attention (Kimi K2's; the built-in policy). The cache holds the
  compressed latent and the shared rotary key per position; decode and extend attend in the latent space.
- `_GQA`: grouped-query attention with RoPE (Llama, Mistral, Qwen2, Qwen3); the cache holds the KV heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rollouts.projections import _projection, _rms_norm, _weight


def _rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek's interleaved RoPE (pairs (x0, x1), (x2, x3), ... each rotated by one angle; output de-interleaved),
    the arithmetic of transformers' `apply_rotary_pos_emb_interleave`, applied to one tensor so that the query
    and key parts go through it together."""
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half].unsqueeze(1), sin[..., :half].unsqueeze(1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class _MLA:
    """DeepseekV3 multi-head latent attention over a latent cache [slots, max_len, kv_lora_rank + rope]."""

    def __init__(
        self, attn: nn.Module, config, slots: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb

        self.attn = attn
        self.heads = config.num_attention_heads
        self.nope, self.rope, self.v_dim, self.lora = (
            config.qk_nope_head_dim,
            config.qk_rope_head_dim,
            config.v_head_dim,
            config.kv_lora_rank,
        )
        self.scaling = attn.scaling
        self.rotary = apply_rotary_pos_emb  # the non-interleaved layout; interleaved: `_rotate_interleaved`
        self.interleaved = bool(config.rope_interleave)
        self.cache = torch.zeros(slots, max_len, self.lora + self.rope, device=device, dtype=dtype)

    def refresh(self, dtype: torch.dtype | None = None) -> None:
        """The projections as matmuls on the current weights (called when a batch opens; `dtype`: their matmul
        dtype, see `_projection`): the query and the key/value down-projection, which both read the layer's input,
        as one (with query LoRA: the LoRA's down projection and the key/value one)."""
        a = self.attn
        self.q_kv = _projection(a.q_proj if a.q_proj is not None else a.q_a_proj, a.kv_a_proj_with_mqa, dtype=dtype)
        self.q_b = None if a.q_proj is not None else _projection(a.q_b_proj, dtype=dtype)
        self.kv_b, self.out = _projection(a.kv_b_proj, dtype=dtype), _projection(a.o_proj, dtype=dtype)
        # kv_b's key and value halves per head, for attention in the latent space (absorbed; contiguous, and an INT4
        # kv_b dequantized once per batch rather than every step)
        w = _weight(a.kv_b_proj).view(self.heads, self.nope + self.v_dim, self.lora)
        self.absorb_k = w[:, : self.nope].contiguous()  # [H, nope, lora]
        self.absorb_v = w[:, self.nope :].transpose(1, 2).contiguous()  # [H, lora, v_dim]

    def _project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [n, t, hidden] → q_pass, q_rot [n, H, t, ·], latent [n, t, lora], k_rot [n, 1, t, rope]."""
        a = self.attn
        n, t, _ = x.shape
        q_kv = self.q_kv(x)
        q, kv = q_kv[..., : -(self.lora + self.rope)], q_kv[..., -(self.lora + self.rope) :]
        if self.q_b is not None:
            q = self.q_b(_rms_norm(a.q_a_layernorm, q))
        q_pass, q_rot = torch.split(
            q.view(n, t, self.heads, self.nope + self.rope).transpose(1, 2), [self.nope, self.rope], dim=-1
        )
        kv_nope, k_rot = torch.split(kv, [self.lora, self.rope], dim=-1)
        k_rot = k_rot.view(n, 1, t, self.rope)
        if self.interleaved:  # query heads and the shared key rotated in one pass
            rotated = _rotate_interleaved(torch.cat([q_rot, k_rot], dim=1), cos, sin)
            q_rot, k_rot = rotated[:, : self.heads], rotated[:, self.heads :]
        else:
            q_rot, k_rot = self.rotary(q_rot, k_rot, cos, sin)
        return q_pass, q_rot, _rms_norm(a.kv_a_layernorm, kv_nope), k_rot

    def prefill(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dest: torch.Tensor, src: torch.Tensor
    ) -> torch.Tensor:
        n, t, _ = x.shape
        q_pass, q_rot, latent, k_rot = self._project(x, cos, sin)
        self.cache[dest, :t] = torch.cat([latent, k_rot[:, 0]], dim=-1)[src]
        kv = self.kv_b(latent).view(n, t, self.heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = torch.split(kv, [self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(-1, self.heads, -1, -1)], dim=-1)
        # right padding: causal attention keeps every real token's view free of the pads after it
        o = F.scaled_dot_product_attention(torch.cat([q_pass, q_rot], dim=-1), k, v, is_causal=True, scale=self.scaling)
        return o.transpose(1, 2).reshape(n, t, -1)

    def decode(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        rows: torch.Tensor,
        positions: torch.Tensor,
        span: int,
        mask: torch.Tensor,
        read: slice | torch.Tensor,
    ) -> torch.Tensor:
        n = x.shape[0]
        q_pass, q_rot, latent, k_rot = self._project(x, cos, sin)
        self.cache[rows, positions] = torch.cat([latent[:, 0], k_rot[:, 0, 0]], dim=-1)
        q_latent = torch.bmm(q_pass[:, :, 0].transpose(0, 1), self.absorb_k).transpose(0, 1)  # [n, H, lora]
        query = torch.cat([q_latent, q_rot[:, :, 0]], dim=-1)  # [n, H, lora + rope]
        keys = self.cache[read, :span]  # [n, span, lora + rope]
        probs = torch.softmax(
            torch.baddbmm(mask, query, keys.transpose(1, 2), alpha=self.scaling), dim=-1
        )  # [n, H, span]
        context = torch.bmm(probs, keys[..., : self.lora])  # [n, H, lora]
        o = torch.bmm(context.transpose(0, 1), self.absorb_v).transpose(0, 1)  # [n, H, v_dim]
        return o.reshape(n, 1, -1)

    def extend(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        rows: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor,
        span: int,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """`decode` for t tokens per slot: x [e, t, hidden] at `positions` [e, t] of slots `rows` [e] (the `valid`
        ones written to the cache), each attending in the latent space to its slot's positions up to its own."""
        e, t, _ = x.shape
        q_pass, q_rot, latent, k_rot = self._project(x, cos, sin)
        self.cache[rows[:, None].expand(-1, t)[valid], positions[valid]] = torch.cat([latent, k_rot[:, 0]], dim=-1)[
            valid
        ]
        query = torch.cat([torch.matmul(q_pass, self.absorb_k), q_rot], dim=-1)  # [e, H, t, lora + rope]
        keys = self.cache[rows, :span][:, None].expand(
            -1, self.heads, -1, -1
        )  # [e, H, span, lora + rope]: one latent "head" every query head reads
        context = F.scaled_dot_product_attention(query, keys, keys, attn_mask=mask[:, None], scale=self.scaling)[
            ..., : self.lora
        ]
        o = torch.matmul(context, self.absorb_v)  # [e, H, t, v_dim]
        return o.transpose(1, 2).reshape(e, t, -1)


class _GQA:
    """Grouped-query attention with RoPE (Llama, Mistral, Qwen2, Qwen3) over a cache [slots, kv heads, max_len, d]."""

    def __init__(
        self, attn: nn.Module, config, slots: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.attn = attn
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = attn.scaling
        self.rotary = apply_rotary_pos_emb
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.k_cache = torch.zeros(slots, self.kv_heads, max_len, self.dim, device=device, dtype=dtype)
        self.v_cache = torch.zeros_like(self.k_cache)

    def _qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, t, _ = x.shape
        q, k, v = torch.split(
            self.qkv(x), [self.heads * self.dim, self.kv_heads * self.dim, self.kv_heads * self.dim], dim=-1
        )
        q, k = q.reshape(n, t, self.heads, self.dim), k.reshape(n, t, self.kv_heads, self.dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q, k, v.reshape(n, t, self.kv_heads, self.dim).transpose(1, 2)

    def refresh(self, dtype: torch.dtype | None = None) -> None:
        """The projections as matmuls on the current weights (called when a batch opens; `dtype`: their matmul
        dtype, see `_projection`); q, k, v as one."""
        a = self.attn
        self.qkv = _projection(a.q_proj, a.k_proj, a.v_proj, dtype=dtype)
        self.out = _projection(a.o_proj, dtype=dtype)

    def prefill(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dest: torch.Tensor, src: torch.Tensor
    ) -> torch.Tensor:
        n, t, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        self.k_cache[dest, :, :t], self.v_cache[dest, :, :t] = k[src], v[src]
        o = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.scaling, enable_gqa=self.kv_heads != self.heads
        )
        return o.transpose(1, 2).reshape(n, t, -1)

    def decode(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        rows: torch.Tensor,
        positions: torch.Tensor,
        span: int,
        mask: torch.Tensor,
        read: slice | torch.Tensor,
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self._qkv(x, cos, sin)
        self.k_cache[rows, :, positions], self.v_cache[rows, :, positions] = k[:, :, 0], v[:, :, 0]
        keys, values = self.k_cache[read, :, :span], self.v_cache[read, :, :span]
        o = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask[:, None], scale=self.scaling, enable_gqa=self.kv_heads != self.heads
        )
        return o.transpose(1, 2).reshape(n, 1, -1)

    def extend(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        rows: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor,
        span: int,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """`decode` for t tokens per slot (see `_MLA.extend`)."""
        e, t, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        at_rows, at = rows[:, None].expand(-1, t)[valid], positions[valid]
        self.k_cache[at_rows, :, at], self.v_cache[at_rows, :, at] = k.transpose(1, 2)[valid], v.transpose(1, 2)[valid]
        keys, values = self.k_cache[rows, :, :span], self.v_cache[rows, :, :span]
        o = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask[:, None], scale=self.scaling, enable_gqa=self.kv_heads != self.heads
        )
        return o.transpose(1, 2).reshape(e, t, -1)
