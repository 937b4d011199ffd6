"""INT4 weight-only quantization: the one spec, and the one pair of functions (`quantize`, `dequantize`) that the
learner's fake-quant, the weight sync, the rollout engine and the export all call.

The grid: 4-bit symmetric integers, one scale per `group_size` consecutive input channels (the last dim of a
weight: [out, in] for `nn.Linear`, [experts, out, in] for fused MoE experts). With rule "amax/7" (default, the grid
reported for Kimi K2 Thinking) scale = amax(|w| in the group) / 7 and q in [-7, 7]; with "amax/7.5"
(compressed-tensors' minmax observer) scale = amax / 7.5 and q in [-8, 7]. The scale is rounded to `scale_dtype`
(bf16, as K2 Thinking ships) *before* q is computed, so the stored scale is the one used:
q = clamp(round(w / scale)), and dequant = q * scale in fp32 (exact: a 4-bit integer times a scale of at most 24
mantissa bits), cast to the weight's dtype. Because every consumer calls these two functions,
fake_quantize(W) == dequantize(unpack(pack(W))) bit for bit.

torchao's affine primitives (`choose_qparams_affine`, `quantize_affine`) compute the scales and q; they take N-D
block sizes, so fused 3-D expert tensors need nothing special. The straight-through estimator is ours: torchao's
QAT fake-quantizers wrap `nn.Linear`/`nn.Embedding` only (not fused expert parameters) and zero the gradient of
clipped weights, while K2-style QAT passes the gradient through unchanged. Packing is compressed-tensors'
`pack_to_int32` (8 values per int32 along the input dim): the layout of the exported `pack-quantized` checkpoint,
so weight sync and export share one format.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

from rollouts.config import QuantConfig

ROUTED_EXPERTS = (r"(^|\.)experts\.",)
"""Routed MoE experts: fused `...mlp.experts.gate_up_proj` / `.down_proj` in memory, `...mlp.experts.7.up_proj.weight`
in checkpoints. `shared_experts` does not match (the dot must come right before `experts`)."""
ALL_LINEAR = (r".",)
ALWAYS_IGNORED = (r"(^|\.)lm_head\.",)
"""lm_head stays full precision in both presets (as in K2 Thinking and common W4A16 recipes)."""

_GRIDS = {"amax/7": (-7, 7), "amax/7.5": (-8, 7)}


@dataclass(frozen=True)
class QuantSpec:
    """What is quantized and how. Build it from the job config with `QuantSpec.from_config`."""

    group_size: int = 32
    scale_rule: str = "amax/7"
    scale_dtype: torch.dtype = torch.bfloat16
    targets: tuple[str, ...] = ROUTED_EXPERTS
    ignore: tuple[str, ...] = ALWAYS_IGNORED
    bits: int = 4

    def __post_init__(self) -> None:
        if self.scale_rule not in _GRIDS:
            raise ValueError(f"quant.scale_rule must be one of {sorted(_GRIDS)}, got {self.scale_rule!r}")
        if self.group_size <= 0 or self.group_size % 8:
            raise ValueError(f"quant.group_size must be a positive multiple of 8, got {self.group_size}")

    @staticmethod
    def from_config(cfg: QuantConfig) -> QuantSpec:
        preset = ROUTED_EXPERTS if cfg.modules == "routed_experts" else ALL_LINEAR
        return QuantSpec(
            group_size=cfg.group_size,
            scale_rule=cfg.scale_rule,
            scale_dtype=getattr(torch, cfg.scale_dtype),
            targets=tuple(cfg.targets) if cfg.targets is not None else preset,
            ignore=ALWAYS_IGNORED + tuple(cfg.ignore),
        )

    @property
    def qmin(self) -> int:
        return _GRIDS[self.scale_rule][0]

    @property
    def qmax(self) -> int:
        return _GRIDS[self.scale_rule][1]

    def matches(self, name: str) -> bool:
        """Whether a parameter (or checkpoint tensor) name is selected by targets and not by ignore."""
        return any(re.search(t, name) for t in self.targets) and not any(re.search(i, name) for i in self.ignore)


def quantizable_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the weights an INT4 kernel can run: `nn.Linear` weights and fused expert tensors (3-D parameters
    named `gate_up_proj` / `down_proj` on an experts module, the transformers 5 layout of MoE models)."""
    names = []
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, torch.nn.Linear):
            names.append(prefix + "weight")
        for pname, param in module.named_parameters(recurse=False):
            if pname in ("gate_up_proj", "down_proj") and param.ndim == 3:
                names.append(prefix + pname)
    return names


def targeted_parameters(model: torch.nn.Module, spec: QuantSpec) -> list[str]:
    """The parameters `spec` quantizes in `model`; an error naming the config keys when there are none."""
    names = [n for n in quantizable_parameters(model) if spec.matches(n)]
    if not names:
        raise ValueError(
            f"quant: targets {list(spec.targets)} (minus ignore {list(spec.ignore)}) match no linear weight or fused "
            f"expert tensor of {type(model).__name__}; a dense model has no routed experts: set "
            f"quant.modules=all_linear "
            "or quant.targets"
        )
    return names


def _pad_to_groups(t: torch.Tensor, group_size: int) -> torch.Tensor:
    pad = -t.shape[-1] % group_size
    return torch.nn.functional.pad(t, (0, pad)) if pad else t


def quantize(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """q (int8, w's shape, in [qmin, qmax]) and scale ([..., out, ceil(in / group_size)], `spec.scale_dtype`).

    An input dim that is not a multiple of the group size gets a last, shorter group (zero-padded for the amax).
    """
    if w.ndim < 2:
        raise ValueError(f"INT4 weight quantization needs a [..., out, in] weight, got shape {tuple(w.shape)}")
    w32 = _pad_to_groups(w.detach().to(torch.float32), spec.group_size)
    block = (1,) * (w.ndim - 1) + (spec.group_size,)
    scale, zero = choose_qparams_affine(
        w32, MappingType.SYMMETRIC, block, torch.int8, spec.qmin, spec.qmax, scale_dtype=spec.scale_dtype
    )
    scale = scale.reshape(*w.shape[:-1], w32.shape[-1] // spec.group_size)
    scale = torch.where(
        scale == 0, torch.ones_like(scale), scale
    )  # an all-zero group under fp16 scales (eps underflows)
    # q from the *stored* (rounded) scale, so dequantizing the stored pair reproduces fake-quant exactly.
    q = quantize_affine(w32, block, scale.to(torch.float32), zero, torch.int8, spec.qmin, spec.qmax)
    return q[..., : w.shape[-1]].contiguous(), scale.contiguous()


def dequantize(q: torch.Tensor, scale: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """q * scale, group-wise along the last dim, computed in fp32 (exact) and cast to `dtype`.

    Hand-written rather than torchao's `dequantize_affine`: it is one product, and it needs only the group size,
    so a loader can call it on an exported checkpoint alone.
    """
    in_features = q.shape[-1]
    expanded = scale.to(torch.float32).repeat_interleave(group_size, dim=-1)[..., :in_features]
    return (q.to(torch.float32) * expanded).to(dtype)


class _FakeQuantize(torch.autograd.Function):
    """Forward: dequantize(quantize(w)). Backward: the gradient unchanged (straight-through), clipped or not."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:  # type: ignore[override]
        return dequantize(*quantize(w, spec), spec.group_size, w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The INT4 weight the rollout engine runs, as a differentiable function of the master weight (STE)."""
    return _FakeQuantize.apply(w, spec)


@dataclass
class PackedInt4:
    """One quantized weight as it travels (weight sync) and ships (export): compressed-tensors' layout."""

    packed: torch.Tensor
    """int32 [..., out, ceil(in / 8)]: q + 8 as 4-bit fields, element i at bits 4*(i % 8) of word i // 8."""
    scale: torch.Tensor
    """[..., out, ceil(in / group_size)] in the spec's scale dtype."""
    shape: tuple[int, ...]
    """The dense weight's shape."""
    dtype: torch.dtype
    """The dense (master) weight's dtype: what `dequantize` returns."""
    group_size: int

    @staticmethod
    def from_weight(w: torch.Tensor, spec: QuantSpec) -> PackedInt4:
        q, scale = quantize(w, spec)
        return PackedInt4(pack_to_int32(q, spec.bits), scale, tuple(w.shape), w.dtype, spec.group_size)

    def unpack(self) -> torch.Tensor:
        """q as int8, the dense shape."""
        return unpack_from_int32(self.packed, 4, torch.Size(self.shape))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.unpack(), self.scale, self.group_size, dtype or self.dtype)

    def select(self, index: int) -> PackedInt4:
        """The `index`-th slice along the first dim (one expert of a fused [experts, out, in] weight)."""
        return PackedInt4(self.packed[index], self.scale[index], self.shape[1:], self.dtype, self.group_size)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scale.numel() * self.scale.element_size()


WeightPayload = dict[str, "torch.Tensor | PackedInt4"]


def pack_state_dict(state: dict[str, torch.Tensor], spec: QuantSpec, targets: Iterable[str]) -> WeightPayload:
    """The weight-sync payload: targeted weights packed to INT4, everything else as is."""
    targets = set(targets)
    missing = targets - state.keys()
    if missing:
        raise KeyError(f"quantization targets not in the state dict: {sorted(missing)}")
    return {k: PackedInt4.from_weight(v, spec) if k in targets else v.detach().clone() for k, v in state.items()}


def payload_nbytes(payload: WeightPayload) -> dict[str, int]:
    """Bytes on the wire, split into packed INT4 weights and the rest, plus what the packed weights weigh in bf16."""
    packed = [v for v in payload.values() if isinstance(v, PackedInt4)]
    dense = [v for v in payload.values() if isinstance(v, torch.Tensor)]
    numel = sum(int(torch.Size(p.shape).numel()) for p in packed)
    return {
        "int4_bytes": sum(p.nbytes for p in packed),
        "int4_weights_bf16_bytes": 2 * numel,
        "dense_bytes": sum(t.numel() * t.element_size() for t in dense),
    }
