"""LoRA between the learner and the rollout workers: which weights are adapted, the adapters as they travel, and the
one function that adds an adapter to its frozen base weight.

The learner trains the adapters with peft (`rl/trainer/lora.py`); a rollout worker builds no peft layers. It keeps
its own copy of each adapted weight's frozen base (the INT4 values, dequantized, when the weight is a quantization
target: the learner's base under `quant.mode: qat`) and at each push installs base + delta, with the delta computed
as peft's `get_delta_weight` computes it: (B @ A) * scaling for an `nn.Linear`, peft's `ParamWrapper` einsum for a
fused [experts, out, in] tensor. So a worker's weights are bit for bit peft's merge of the learner's adapters onto
the same base, and a push carries the adapters alone (A, B and a 3-number record per adapted weight): the base never
changes, so it never travels.

An adapted weight runs dense on the worker (base + delta is off the INT4 grid); the quantized weights that are not
adapted keep their INT4 kernels (`rollouts/int4.py`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from rollouts.config import LoraConfig
from rollouts.quant import ALWAYS_IGNORED, QuantSpec, WeightPayload, dequantize, quantizable_parameters, quantize

LORA_A, LORA_B, LORA_META = "::lora_A", "::lora_B", "::lora_meta"
"""Suffixes of an adapted weight's entries in a weight-sync payload (the weight's own name before them)."""
FUSED = ("gate_up_proj", "down_proj")
"""Fused MoE expert tensors (transformers 5 layout), adapted through peft's `target_parameters`."""


@dataclass
class LoraFactors:
    """One adapted weight's adapter, in peft's own layout (the tensors of `lora_A.weight` / `lora_B.weight`)."""

    a: torch.Tensor
    """[rank * experts, in]: peft's lora_A weight (for fused experts, the experts' A matrices stacked)."""
    b: torch.Tensor
    """[out, rank * experts]: peft's lora_B weight."""
    scaling: float
    """alpha / rank."""
    experts: int = 0
    """0 for an `nn.Linear` weight; the number of experts of a fused [experts, d1, d2] tensor."""
    out_first: bool = True
    """Fused tensors: stored [experts, out, in] (DeepseekV3; peft swaps its in/out features) or [experts, in, out]."""

    def delta(self, like: torch.Tensor) -> torch.Tensor:
        """The weight's update, shaped and typed as `like` (its base), computed as peft computes it."""
        a, b = self.a.to(like.device), self.b.to(like.device)
        if not self.experts:  # peft lora.Linear: half-precision factors multiply in fp32 on the CPU
            upcast = like.device.type == "cpu" and b.dtype in (torch.float16, torch.bfloat16)
            delta = (b.float() @ a.float() if upcast else b @ a) * self.scaling
        else:  # peft lora.ParamWrapper, several experts
            a3 = a.reshape(self.experts, -1, a.shape[-1])  # [experts, rank, in]
            b3 = b.reshape(b.shape[0], -1, self.experts)  # [out, rank, experts]
            delta = torch.einsum("o r e, e r i -> e o i" if self.out_first else "o r e, e r i -> e i o", b3, a3)
            delta = delta * self.scaling
        return delta.to(like.dtype)

    @property
    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()


def adapted_parameters(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """The weights `trainer.lora.targets` select in `model`: linear weights and fused expert tensors, never lm_head;
    an error naming the field when there are none, or when dropout is asked of fused experts (peft cannot)."""
    candidates = quantizable_parameters(model)
    names = [
        n
        for n in candidates
        if any(re.search(t, n) for t in cfg.targets) and not any(re.search(i, n) for i in ALWAYS_IGNORED)
    ]
    if not names:
        examples = ", ".join(candidates[:4])
        raise ValueError(
            f"trainer.lora.targets {cfg.targets} match no linear weight or fused expert tensor of "
            f"{type(model).__name__} (lm_head is never adapted); its names look like: {examples}"
        )
    fused = [n for n in names if n.rpartition(".")[2] in FUSED and model.get_parameter(n).ndim == 3]
    if fused and cfg.dropout:
        raise ValueError(
            f"trainer.lora.dropout={cfg.dropout}: peft applies no dropout to fused MoE expert tensors (targeted here: "
            f"{fused[0]}, ...); set trainer.lora.dropout=0 or leave the experts out of trainer.lora.targets"
        )
    return names


def frozen_base(weight: torch.Tensor, name: str, quant: QuantSpec | None) -> torch.Tensor:
    """An adapted weight's frozen base: its INT4 values (`rollouts.quant`, dequantized) when `quant` targets it,
    else itself (a copy)."""
    if quant is not None and quant.matches(name):
        return dequantize(*quantize(weight, quant), quant.group_size, weight.dtype)
    return weight.detach().clone()


def adapter_payload(factors: dict[str, LoraFactors]) -> WeightPayload:
    """The weight-sync payload of a push: per adapted weight its A, B and [scaling, experts, out_first] (float64,
    which holds the Python float exactly)."""
    payload: WeightPayload = {}
    for name, f in factors.items():
        payload[name + LORA_A] = f.a
        payload[name + LORA_B] = f.b
        payload[name + LORA_META] = torch.tensor([f.scaling, f.experts, float(f.out_first)], dtype=torch.float64)
    return payload


def is_adapter_payload(payload: WeightPayload) -> bool:
    return bool(payload) and all(k.endswith((LORA_A, LORA_B, LORA_META)) for k in payload)


def read_adapter_payload(payload: WeightPayload) -> dict[str, LoraFactors]:
    """`adapter_payload`'s inverse; an error naming what is missing."""
    names = {k.removesuffix(LORA_META) for k in payload if k.endswith(LORA_META)}
    out = {}
    for name in sorted(names):
        parts = [payload.get(name + s) for s in (LORA_A, LORA_B, LORA_META)]
        if not all(isinstance(p, torch.Tensor) for p in parts):
            raise ValueError(f"weight sync: the adapter of {name} arrived incomplete (A, B and its record needed)")
        a, b, meta = parts
        scaling, experts, out_first = meta.tolist()
        out[name] = LoraFactors(a, b, scaling, int(experts), bool(out_first))
    if len(payload) != 3 * len(out):
        raise ValueError(f"weight sync: entries without an adapter record: {sorted(payload)[:4]}")
    return out


class AdapterInstaller:
    """A rollout worker's side: the frozen bases of the adapted weights, and `install`, which writes base + delta
    into the model for each pushed adapter."""

    def __init__(self, model: nn.Module, names: list[str], quant: QuantSpec | None) -> None:
        self.base = {n: frozen_base(model.get_parameter(n), n, quant) for n in names}
        with torch.no_grad():  # until the first push the policy is the base itself (peft's B starts at zero)
            for name, base in self.base.items():
                model.get_parameter(name).copy_(base)

    def install(self, model: nn.Module, payload: WeightPayload) -> None:
        factors = read_adapter_payload(payload)
        if factors.keys() != self.base.keys():
            raise ValueError(
                f"weight sync: adapted weights differ between learner and rollout worker: "
                f"{sorted(factors.keys() ^ self.base.keys())[:4]} (trainer.lora must be the same on both)"
            )
        with torch.no_grad():
            for name, f in factors.items():
                base = self.base[name]
                model.get_parameter(name).copy_(base + f.delta(base))
