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
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "llama", "mistral", "qwen2", "qwen3")
FUSE_MOE_MAX_ELEMENTS = 1 << 22
"""Routed + shared expert weights (elements) up to which a MoE block runs on dense weights (`_FusedMoE`)."""
SPARSE_MOE_MIN_TOKENS = 48
"""Tokens from which `_FusedMoE` runs each expert on its own tokens instead of every expert on all of them
(measured on the built-in policy, one CPU thread: equal at 16 tokens, 1.6x faster at 128)."""


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm (weight * x / rms(x), computed in fp32) through torch's `rms_norm`."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), norm.weight, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), norm.weight.float(), eps).to(x.dtype)


class _Matmul:
    """x @ W^T (+ b) for a weight W [out, in] fixed until the next `refresh`. On a CPU the weight is stored
    transposed ([in, out], contiguous) and multiplied by `torch.matmul`: MKL's small-batch GEMM runs 1.3-2x faster
    from that layout than from the transposed view `F.linear` hands it (one thread, batch 16: 2304x128 71 vs
    103 us, 128x1152 33 vs 68 us). Elsewhere `F.linear` as it is."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.cpu, self.bias = weight.device.type == "cpu", None if bias is None else bias.detach()
        self.weight = weight.detach().t().contiguous() if self.cpu else weight.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cpu:
            return F.linear(x, self.weight, self.bias)
        out = torch.matmul(x, self.weight)
        return out if self.bias is None else out.add_(self.bias)


def _projection(*modules: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The projections `modules` (all reading the same input) as one call, outputs side by side: plain
    `nn.Linear`s as one `_Matmul` on their stacked weights (a decode step makes dozens of these calls; each call's
    own overhead is a visible share of it), anything else (INT4 modules: their own kernels) through the modules."""
    if all(type(m) is nn.Linear for m in modules):
        biases = [m.bias for m in modules]
        bias = None if all(b is None for b in biases) else torch.cat([b if b is not None else m.weight.new_zeros(m.out_features) for m, b in zip(modules, biases, strict=True)])
        return _Matmul(torch.cat([m.weight for m in modules]), bias)
    if len(modules) == 1:
        return modules[0]
    return lambda x: torch.cat([m(x) for m in modules], dim=-1)


def _weight(module: nn.Module) -> torch.Tensor:
    """A projection's [out, in] weight as a dense tensor (an INT4 one dequantized to the values it multiplies by)."""
    if type(module) is nn.Linear:
        return module.weight
    return module.matmul.weight.dequantize(torch.float32)


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

    def __init__(self, attn: nn.Module, config, slots: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb

        self.attn = attn
        self.heads = config.num_attention_heads
        self.nope, self.rope, self.v_dim, self.lora = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim, config.kv_lora_rank
        self.scaling = attn.scaling
        self.rotary = apply_rotary_pos_emb  # the non-interleaved layout; interleaved: `_rotate_interleaved`
        self.interleaved = bool(config.rope_interleave)
        self.cache = torch.zeros(slots, max_len, self.lora + self.rope, device=device, dtype=dtype)

    def refresh(self) -> None:
        """The projections as matmuls on the current weights (called when a batch opens): the query and the
        key/value down-projection, which both read the layer's input, as one (with query LoRA: the LoRA's down
        projection and the key/value one)."""
        a = self.attn
        self.q_kv = _projection(a.q_proj if a.q_proj is not None else a.q_a_proj, a.kv_a_proj_with_mqa)
        self.q_b = None if a.q_proj is not None else _projection(a.q_b_proj)
        self.kv_b, self.out = _projection(a.kv_b_proj), _projection(a.o_proj)
        # kv_b's key and value halves per head, for attention in the latent space (absorbed; contiguous, and an INT4
        # kv_b dequantized once per batch rather than every step)
        w = _weight(a.kv_b_proj).view(self.heads, self.nope + self.v_dim, self.lora)
        self.absorb_k = w[:, : self.nope].contiguous()  # [H, nope, lora]
        self.absorb_v = w[:, self.nope :].transpose(1, 2).contiguous()  # [H, lora, v_dim]

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [n, t, hidden] → q_pass, q_rot [n, H, t, ·], latent [n, t, lora], k_rot [n, 1, t, rope]."""
        a = self.attn
        n, t, _ = x.shape
        q_kv = self.q_kv(x)
        q, kv = q_kv[..., : -(self.lora + self.rope)], q_kv[..., -(self.lora + self.rope) :]
        if self.q_b is not None:
            q = self.q_b(_rms_norm(a.q_a_layernorm, q))
        q_pass, q_rot = torch.split(q.view(n, t, self.heads, self.nope + self.rope).transpose(1, 2), [self.nope, self.rope], dim=-1)
        kv_nope, k_rot = torch.split(kv, [self.lora, self.rope], dim=-1)
        k_rot = k_rot.view(n, 1, t, self.rope)
        if self.interleaved:  # query heads and the shared key rotated in one pass
            rotated = _rotate_interleaved(torch.cat([q_rot, k_rot], dim=1), cos, sin)
            q_rot, k_rot = rotated[:, : self.heads], rotated[:, self.heads :]
        else:
            q_rot, k_rot = self.rotary(q_rot, k_rot, cos, sin)
        return q_pass, q_rot, _rms_norm(a.kv_a_layernorm, kv_nope), k_rot

    def prefill(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dest: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
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
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, span: int, mask: torch.Tensor, read: slice | torch.Tensor
    ) -> torch.Tensor:
        n = x.shape[0]
        q_pass, q_rot, latent, k_rot = self._project(x, cos, sin)
        self.cache[rows, positions] = torch.cat([latent[:, 0], k_rot[:, 0, 0]], dim=-1)
        q_latent = torch.bmm(q_pass[:, :, 0].transpose(0, 1), self.absorb_k).transpose(0, 1)  # [n, H, lora]
        query = torch.cat([q_latent, q_rot[:, :, 0]], dim=-1)  # [n, H, lora + rope]
        keys = self.cache[read, :span]  # [n, span, lora + rope]
        probs = torch.softmax(torch.baddbmm(mask, query, keys.transpose(1, 2), alpha=self.scaling), dim=-1)  # [n, H, span]
        context = torch.bmm(probs, keys[..., : self.lora])  # [n, H, lora]
        o = torch.bmm(context.transpose(0, 1), self.absorb_v).transpose(0, 1)  # [n, H, v_dim]
        return o.reshape(n, 1, -1)

    def extend(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, span: int, mask: torch.Tensor) -> torch.Tensor:
        """`decode` for t tokens per slot: x [e, t, hidden] at `positions` [e, t] of slots `rows` [e] (the `valid`
        ones written to the cache), each attending in the latent space to its slot's positions up to its own."""
        e, t, _ = x.shape
        q_pass, q_rot, latent, k_rot = self._project(x, cos, sin)
        self.cache[rows[:, None].expand(-1, t)[valid], positions[valid]] = torch.cat([latent, k_rot[:, 0]], dim=-1)[valid]
        query = torch.cat([torch.matmul(q_pass, self.absorb_k), q_rot], dim=-1)  # [e, H, t, lora + rope]
        keys = self.cache[rows, :span][:, None].expand(-1, self.heads, -1, -1)  # [e, H, span, lora + rope]: one latent "head" every query head reads
        context = F.scaled_dot_product_attention(query, keys, keys, attn_mask=mask[:, None], scale=self.scaling)[..., : self.lora]
        o = torch.matmul(context, self.absorb_v)  # [e, H, t, v_dim]
        return o.transpose(1, 2).reshape(e, t, -1)


class _GQA:
    """Grouped-query attention with RoPE (Llama, Mistral, Qwen2, Qwen3) over a cache [slots, kv heads, max_len, d]."""

    def __init__(self, attn: nn.Module, config, slots: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.attn = attn
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = attn.scaling
        self.rotary = apply_rotary_pos_emb
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.k_cache = torch.zeros(slots, self.kv_heads, max_len, self.dim, device=device, dtype=dtype)
        self.v_cache = torch.zeros_like(self.k_cache)

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, t, _ = x.shape
        q, k, v = torch.split(self.qkv(x), [self.heads * self.dim, self.kv_heads * self.dim, self.kv_heads * self.dim], dim=-1)
        q, k = q.reshape(n, t, self.heads, self.dim), k.reshape(n, t, self.kv_heads, self.dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q, k, v.reshape(n, t, self.kv_heads, self.dim).transpose(1, 2)

    def refresh(self) -> None:
        """The projections as matmuls on the current weights (called when a batch opens); q, k, v as one."""
        a = self.attn
        self.qkv = _projection(a.q_proj, a.k_proj, a.v_proj)
        self.out = _projection(a.o_proj)

    def prefill(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dest: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        self.k_cache[dest, :, :t], self.v_cache[dest, :, :t] = k[src], v[src]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling, enable_gqa=self.kv_heads != self.heads)
        return o.transpose(1, 2).reshape(n, t, -1)

    def decode(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, span: int, mask: torch.Tensor, read: slice | torch.Tensor
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self._qkv(x, cos, sin)
        self.k_cache[rows, :, positions], self.v_cache[rows, :, positions] = k[:, :, 0], v[:, :, 0]
        keys, values = self.k_cache[read, :, :span], self.v_cache[read, :, :span]
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None], scale=self.scaling, enable_gqa=self.kv_heads != self.heads)
        return o.transpose(1, 2).reshape(n, 1, -1)

    def extend(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, span: int, mask: torch.Tensor) -> torch.Tensor:
        """`decode` for t tokens per slot (see `_MLA.extend`)."""
        e, t, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        at_rows, at = rows[:, None].expand(-1, t)[valid], positions[valid]
        self.k_cache[at_rows, :, at], self.v_cache[at_rows, :, at] = k.transpose(1, 2)[valid], v.transpose(1, 2)[valid]
        keys, values = self.k_cache[rows, :, :span], self.v_cache[rows, :, :span]
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None], scale=self.scaling, enable_gqa=self.kv_heads != self.heads)
        return o.transpose(1, 2).reshape(e, t, -1)


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
        return 3 * config.hidden_size * (config.n_routed_experts * config.moe_intermediate_size + shared) <= FUSE_MOE_MAX_ELEMENTS

    def _expert(self, name: str) -> torch.Tensor:
        packed = getattr(self.experts, "int4", {})
        if name in packed:
            return torch.stack([m.weight.dequantize(torch.float32) for m in packed[name]])
        return getattr(self.experts, name).detach()

    def refresh(self) -> None:
        gate_up, down = self._expert("gate_up_proj"), self._expert("down_proj")  # [E, 2I, H], [E, H, I]
        e, i = self.num_experts, self.inter
        dtype = self.shared.gate_proj.weight.dtype
        self.router = _Matmul(self.gate.weight.float())
        self.experts_in = [_Matmul(w) for w in gate_up.to(dtype)]  # per expert (sparse)
        self.experts_out = [_Matmul(w) for w in down.to(dtype)]
        self.shared_in = _projection(self.shared.gate_proj, self.shared.up_proj)
        self.shared_out = _projection(self.shared.down_proj)
        gate = torch.cat([gate_up[:, :i].reshape(e * i, -1).to(dtype), self.shared.gate_proj.weight.detach()])
        up = torch.cat([gate_up[:, i:].reshape(e * i, -1).to(dtype), self.shared.up_proj.weight.detach()])
        self.w_in = _Matmul(torch.cat([gate, up]))  # [2 (E I + I_shared), H]
        self.w_out = _Matmul(torch.cat([down.permute(1, 0, 2).reshape(down.shape[1], e * i).to(dtype), self.shared.down_proj.weight.detach()], dim=1))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        scores = self.router(x.float()).sigmoid()
        chosen = torch.topk(scores + self.gate.e_score_correction_bias, self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, chosen)
        if self.gate.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if self.gate.routed_scaling_factor != 1.0:
            weights = weights * self.gate.routed_scaling_factor
        if x.shape[0] >= SPARSE_MOE_MIN_TOKENS:
            return self._sparse(x, chosen, weights).view(shape)
        # each routed expert's hidden units scaled by the token's weight for it (0: not routed), shared ones by 1
        scale = torch.cat([torch.zeros_like(scores).scatter_(1, chosen, weights), scores.new_ones(1).expand(x.shape[0], self.shared_units)], dim=1)
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
        return _GatedMLP(mlp) if all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")) else mlp

    def refresh(self) -> None:
        self.gate_up = _projection(self.mlp.gate_proj, self.mlp.up_proj)
        self.down = _projection(self.mlp.down_proj)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * up)


class Decoder:
    """Prefill and decode for one HF causal LM over `slots` cache slots of up to `max_len` positions each."""

    def __init__(self, model: nn.Module, slots: int, max_len: int) -> None:
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"the rollout engine runs {', '.join(SUPPORTED_MODEL_TYPES)} models; model.path is a {config.model_type!r} "
                "model (its decoder layers would need an attention adapter in rollouts/decoder.py)"
            )
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True) and window < max_len:
            raise ValueError(f"sliding-window attention ({window} < {max_len} positions) is not supported by the rollout engine")
        if max_len > config.max_position_embeddings:
            raise ValueError(f"sequences of {max_len} tokens exceed the model's max_position_embeddings ({config.max_position_embeddings})")
        self.model, self.body = model, model.model
        self.layers = list(self.body.layers)
        device, dtype = model.device, next(model.parameters()).dtype
        adapter = _MLA if config.model_type == "deepseek_v3" else _GQA
        self.attn = [adapter(layer.self_attn, config, slots, max_len, device, dtype) for layer in self.layers]
        self.mlps = [_FusedMoE(layer.mlp, config) if _FusedMoE.applies(layer.mlp, config) else _GatedMLP.wrap(layer.mlp) for layer in self.layers]
        self.slots, self.max_len, self.device = slots, max_len, device
        # cos/sin of every position, computed once by the model's own rotary module (the values it computes per call)
        cos, sin = self.body.rotary_emb(torch.zeros(1, device=device, dtype=dtype), torch.arange(max_len, device=device)[None])
        self.cos, self.sin = cos[0], sin[0]  # [max_len, rotary dim]
        self.refresh()

    def refresh(self) -> None:
        """Pick up weights loaded into the model since the last batch (called when a batch opens)."""
        for part in [*self.attn, *self.mlps]:
            if hasattr(part, "refresh"):
                part.refresh()
        self.lm_head = _projection(self.model.lm_head)

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
        return torch.zeros(visible.shape, device=self.device, dtype=self.cos.dtype).masked_fill_(~visible, float("-inf"))

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, span: int, rows: torch.Tensor | None = None) -> torch.Tensor:
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

    def extend(self, ids: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
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
