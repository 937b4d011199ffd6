"""The rollout engine's INT4 weights: targeted weights stay packed in memory and their products run INT4 kernels.

`convert_to_int4(model, spec, ...)` swaps every targeted `nn.Linear` for an `Int4Linear` and every experts module
with targeted fused tensors for an `Int4Experts`; `load_packed(model, payload)` installs the packed weights of a
weight sync. Untargeted weights stay ordinary parameters (loaded with `load_state_dict`).

Kernels (`Int4Matmul`):
- CPU: torch's `_weight_int4pack_mm_for_cpu`, fed our symmetric q as the unsigned nibble q + 8 with zero point 0
  (its dequant is (nibble - 8) * scale + zero), so it multiplies by exactly the learner's fake-quant weight. With
  fp32 activations it reproduces `F.linear(x, dequantized W)` to summation order; its speed per row is flat, so
  from `dense_min_rows` rows on, unpacking the weight on the fly and running one dense matmul wins (fp32
  activations; see `benchmarks/int4_decode.py`).
- CUDA: torch's tinygemm `_weight_int4pack_mm` (aten/src/ATen/native/cuda/int4mm.cu). Its layout, read from
  that source: the weight goes in as uint8 [n, k / 2], element 2j in the high nibble of byte j and 2j + 1 in the low
  one, and `_convert_weight_to_int4pack(w, inner_k_tiles)` tiles it for the m16n8k16 tensor cores (int32
  [n / 8, k / (16 inner_k_tiles), 32, inner_k_tiles / 2]); `scales_and_zeros` is bf16 [k / group, n, 2] (scale,
  zero). The kernel dequantizes each nibble u as fma(bf16(u - 8), scale, zero) in bf16, so our symmetric q in
  [-8, 7] goes in as u = q + 8 with zero 0 and each weight is exactly round_bf16(q * scale): with bf16 scales (the
  spec's default) that is `dequantize(q, scale, bf16)`, the learner's fake-quant weight of a bf16 model bit for
  bit (an fp32 model's fake-quant weight is q * scale unrounded; q * scale needs up to 11 significant bits, bf16
  keeps 8). Activations must be bf16 and contiguous; products accumulate in fp32 and the output is rounded to
  bf16. The kernel takes n a multiple of 8, k a multiple of 16 x inner_k_tiles (8, 4 or 2: the largest that divides
  k is used) and groups of 32, 64, 128 or 256. `benchmarks/gpu_check.sh` checks the layout exactly on a GPU
  (identity activations read the kernel's weight back); the CPU test suite cannot run it.
Shapes or settings a kernel refuses (CPU: out features not a multiple of 16, in features not a multiple of the group
size; CUDA: the above, or scales that bf16 cannot hold exactly) run the on-the-fly dense path: the weight still
lives packed, and the product is exact to the spec.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rollouts.quant import PackedInt4, QuantSpec, WeightPayload, pack_state_dict

_CUDA_INNER_K_TILES = (8, 4, 2)
_CUDA_GROUP_SIZES = (32, 64, 128, 256)


class Int4Matmul:
    """y = x @ dequantize(W).T for one packed [out, in] weight."""

    def __init__(self, weight: PackedInt4, activation_dtype: torch.dtype, dense_min_rows: int | None) -> None:
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        self.activation_dtype = torch.bfloat16 if weight.packed.is_cuda else activation_dtype  # tinygemm runs bf16 only
        self.dense_min_rows = dense_min_rows
        self.kernel_weight, self.scales_and_zeros = self._to_kernel_layout(weight)
        self._dense_cache: dict[torch.dtype, torch.Tensor] = {}

    def _dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight (exactly the learner's fake-quant values) for the dense path. On the CPU it is made
        once per loaded weight and kept (a weight push builds a new `Int4Matmul`): unpacking on every decode step
        cost SmolLM2's INT4 rollouts about as much again as the float32 matmuls. On a GPU the packed weight's
        memory is the point, so nothing is kept there."""
        if self.weight.packed.is_cuda:
            return self.weight.dequantize(dtype)
        cached = self._dense_cache.get(dtype)
        if cached is None:
            cached = self._dense_cache[dtype] = self.weight.dequantize(dtype)
        return cached

    def _to_kernel_layout(self, weight: PackedInt4) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        n, k = weight.shape
        g = weight.group_size
        if k % g:
            return None, None
        q = weight.unpack()  # int8 [n, k]
        scale = weight.scale.to(torch.float32)  # [n, k / g]
        if q.is_cuda:
            tiles = next((t for t in _CUDA_INNER_K_TILES if k % (t * 16) == 0), None)
            # the kernel reads bf16 scales: fp16 or fp32 scales (quant.scale_dtype) that bf16 rounds stay dense
            exact_scales = torch.equal(scale.to(torch.bfloat16).to(torch.float32), scale)
            if tiles is None or n % 8 or g not in _CUDA_GROUP_SIZES or not exact_scales:
                return None, None
            nibbles = (q.to(torch.int16) + 8).to(torch.uint8)
            packed = torch._convert_weight_to_int4pack((nibbles[:, ::2] << 4 | nibbles[:, 1::2]).contiguous(), tiles)
        else:
            if n % 16:
                return None, None
            packed = torch._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), 1)
        zeros = torch.zeros_like(scale)
        return packed, torch.stack([scale.T, zeros.T], dim=-1).to(self.activation_dtype).contiguous()  # [k / g, n, 2]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if self.kernel_weight is None or (self.dense_min_rows is not None and rows >= self.dense_min_rows):
            return F.linear(x, self._dense(x.dtype))
        xa = x.to(self.activation_dtype).contiguous()  # tinygemm reads the activations as a dense row-major matrix
        g = self.weight.group_size
        if x.is_cuda:
            y = torch._weight_int4pack_mm(xa, self.kernel_weight, g, self.scales_and_zeros)
        else:
            y = torch._weight_int4pack_mm_for_cpu(xa, self.kernel_weight, g, self.scales_and_zeros)
        return y.to(x.dtype)


class Int4Linear(nn.Module):
    """Drop-in for a targeted `nn.Linear`: same in/out features and bias, weight held as INT4."""

    def __init__(self, linear: nn.Linear, activation_dtype: torch.dtype, dense_min_rows: int | None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias
        self.activation_dtype, self.dense_min_rows = activation_dtype, dense_min_rows
        self.matmul: Int4Matmul | None = None

    def set_packed(self, name: str, weight: PackedInt4) -> None:
        if name != "weight" or weight.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"Int4Linear takes 'weight' of shape {(self.out_features, self.in_features)}, got {name!r} "
                f"{weight.shape}"
            )
        self.matmul = Int4Matmul(weight, self.activation_dtype, self.dense_min_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matmul is None:
            raise RuntimeError("Int4Linear used before its packed weight was loaded")
        y = self.matmul(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


class Int4Experts(nn.Module):
    """Drop-in for a fused-experts module (transformers 5 MoE layout: `gate_up_proj` [E, 2I, H], `down_proj`
    [E, H, I], `act_fn`) whose targeted tensors run as INT4, one kernel call per active expert.

    The routing arithmetic mirrors the eager forward of `DeepseekV3Experts` (transformers 5.23), so the learner's
    fake-quant forward and this one differ only in the products' summation order.
    """

    def __init__(
        self, experts: nn.Module, targeted: set[str], activation_dtype: torch.dtype, dense_min_rows: int | None
    ) -> None:
        super().__init__()
        self.num_experts = experts.num_experts
        self.act_fn = experts.act_fn
        self.activation_dtype, self.dense_min_rows = activation_dtype, dense_min_rows
        self.int4: dict[str, list[Int4Matmul]] = {}
        for name in ("gate_up_proj", "down_proj"):
            if name not in targeted:  # stays a dense parameter, loaded by load_state_dict under its usual name
                setattr(self, name, getattr(experts, name))

    def set_packed(self, name: str, weight: PackedInt4) -> None:
        if name not in ("gate_up_proj", "down_proj") or weight.shape[0] != self.num_experts:
            raise ValueError(
                f"Int4Experts takes gate_up_proj/down_proj with {self.num_experts} experts, got {name!r} {weight.shape}"
            )
        self.int4[name] = [
            Int4Matmul(weight.select(e), self.activation_dtype, self.dense_min_rows) for e in range(self.num_experts)
        ]

    def _project(self, name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        if name in self.int4:
            return self.int4[name][expert](x)
        return F.linear(x, getattr(self, name)[expert])

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)  # [E+1, k, tokens]
        for expert in (expert_mask.sum(dim=(-1, -2)) > 0).nonzero()[:, 0].tolist():
            if expert == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert])
            gate, up = self._project("gate_up_proj", expert, hidden_states[token_idx]).chunk(2, dim=-1)
            out = self._project("down_proj", expert, self.act_fn(gate) * up)
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


def convert_to_int4(
    model: nn.Module, spec: QuantSpec, targets: list[str], activation_dtype: torch.dtype, dense_min_rows: int | None
) -> None:
    """Swap the modules owning `targets` for INT4 ones and quantize their current weights into them (in place)."""
    dense = {name: p.detach() for name, p in model.named_parameters() if name in set(targets)}
    by_owner: dict[str, set[str]] = {}
    for name in targets:
        owner, _, pname = name.rpartition(".")
        by_owner.setdefault(owner, set()).add(pname)
    for owner, pnames in by_owner.items():
        module = model.get_submodule(owner)
        if isinstance(module, nn.Linear):
            replacement: nn.Module = Int4Linear(module, activation_dtype, dense_min_rows)
        elif pnames <= {"gate_up_proj", "down_proj"} and hasattr(module, "act_fn") and hasattr(module, "num_experts"):
            replacement = Int4Experts(module, pnames, activation_dtype, dense_min_rows)
        else:
            raise TypeError(
                f"{owner} ({type(module).__name__}): the INT4 engine runs nn.Linear weights and fused experts "
                f"(gate_up_proj/down_proj) only"
            )
        parent, _, child = owner.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, replacement)
    load_packed(model, pack_state_dict(dense, spec, targets))


def load_packed(model: nn.Module, payload: WeightPayload) -> None:
    """Install the packed entries of a weight-sync payload into the model's INT4 modules."""
    for name, weight in payload.items():
        if not isinstance(weight, PackedInt4):
            continue
        owner, _, pname = name.rpartition(".")
        module = model.get_submodule(owner)
        if not isinstance(module, (Int4Linear, Int4Experts)):
            raise TypeError(
                f"weight sync sent INT4 {name!r} but {owner} is a {type(module).__name__}: learner and rollout quant "
                f"targets differ"
            )
        module.set_packed(pname, weight)
