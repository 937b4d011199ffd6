"""The slot decoder's shared building blocks on the model's own weights (`rollouts/decoder.py` and the attention
and MLP blocks it runs, `rollouts/attention.py` and `rollouts/mlp.py`).

A decode step makes dozens of small projections, and at small sizes each call's own overhead is a visible share
of it. So projections that read the same input run as one matmul on their stacked weights (`_projection`), on a
CPU from a transposed, contiguous copy of the weight (`_Matmul`), refreshed when a batch opens; RMSNorm goes
through torch's fused `rms_norm`. INT4 modules keep their own kernels (`_weight` dequantizes one when a block
needs its dense values); on a CPU with float32 activations, where from `dense_min_rows` rows on they multiply by
their dequantized weight anyway, those rows run one stacked matmul too (`_Int4Projection`).

Mixed precision (`matmul_dtype`, the engine's `rollout.matmul_dtype`): a float32 model's projections multiply in
bf16, as the learner's matmuls do under `trainer.compute_dtype: bfloat16` (autocast): the weight's bf16 copy is
kept (the bf16 rounding of the fp32 weight, or of an INT4 weight's fp32 dequantized values: what autocast casts
the learner's fake-quant to), the input is cast per call and the product comes back in float32; norms, attention,
sampling and logprobs stay float32. On a CPU with AMX or AVX-512-BF16 this is 2-4x the fp32 GEMM rate at decode
sizes (batch 32: 576 x 3072 0.78 against 1.38 ms, SmolLM2's 576 x 49152 head 7.5 against 28.4 ms), and the
real-model job (SmolLM2, every linear layer INT4, 32 samples of 64 tokens) generates a step in 5.6 against 13-16 s.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rollouts.int4 import Int4Linear, Int4Matmul


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

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None
    ) -> None:
        self.cpu, self.bias = weight.device.type == "cpu", None if bias is None else bias.detach()
        # mixed precision: multiply in `dtype` (weight rounded once here, input per call), return the input's dtype
        self.dtype = dtype if dtype is not None and dtype != weight.dtype else None
        weight = weight.detach() if self.dtype is None else weight.detach().to(self.dtype)
        self.weight = weight.t().contiguous() if self.cpu else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype is not None:
            low = x.to(self.dtype)
            out = (torch.matmul(low, self.weight) if self.cpu else F.linear(low, self.weight)).to(x.dtype)
        elif not self.cpu:
            return F.linear(x, self.weight, self.bias)
        else:
            out = torch.matmul(x, self.weight)
        return out if self.bias is None else out.add_(self.bias)


def _projection(*modules: nn.Module, dtype: torch.dtype | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The projections `modules` (all reading the same input) as one call, outputs side by side: plain
    `nn.Linear`s as one `_Matmul` on their stacked weights (a decode step makes dozens of these calls; each call's
    own overhead is a visible share of it), anything else (INT4 modules: their own kernels) through the modules.
    `dtype`: multiply in it (mixed precision, see the module docstring)."""
    if all(type(m) is nn.Linear for m in modules):
        weight = torch.cat([m.weight for m in modules])
        return _Matmul(weight, _stacked_bias(modules, weight), dtype)
    if _Int4Projection.applies(modules):
        return _Int4Projection(modules, dtype)
    if len(modules) == 1:
        return modules[0]
    return lambda x: torch.cat([m(x) for m in modules], dim=-1)


def _stacked_bias(modules: tuple[nn.Module, ...], weight: torch.Tensor) -> torch.Tensor | None:
    """The biases of stacked projections side by side (zeros for one without), or None when none has one."""
    if all(m.bias is None for m in modules):
        return None
    return torch.cat([m.bias if m.bias is not None else weight.new_zeros(m.out_features) for m in modules])


class _Int4Projection:
    """INT4 projections (all reading the same input) on a CPU with float32 activations: from `dense_min_rows` rows
    on, one `_Matmul` on their stacked dequantized weights, which is what each module's dense path multiplies by
    (so the outputs agree to summation order); below it, each module's packed kernel. With a mixed-precision
    `dtype`, the stacked bf16 `_Matmul` at every row count. SmolLM2's decode step with
    every linear layer INT4 makes 7 INT4 products a layer, 4 stacked (q/k/v and gate/up as one each).

    The stacked weight is built on the first call with enough rows and kept while the modules hold the same packed
    weights (a weight push gives them new ones), like `Int4Matmul`'s own dense cache, which the modules then never
    fill: one dense copy of the weights, not two."""

    def __init__(self, modules: tuple[nn.Module, ...], dtype: torch.dtype | None = None) -> None:
        self.modules = modules
        self.dtype = None if dtype in (None, torch.float32) else dtype  # the dense rows' matmul dtype, else float32
        self.dense_min_rows = modules[0].matmul.dense_min_rows

    @staticmethod
    def applies(modules: tuple[nn.Module, ...]) -> bool:
        if not all(type(m) is Int4Linear and m.matmul is not None for m in modules):
            return False
        rows = modules[0].matmul.dense_min_rows
        return rows is not None and all(
            not m.matmul.weight.packed.is_cuda
            and m.matmul.activation_dtype == torch.float32
            and m.matmul.dense_min_rows == rows
            for m in modules
        )

    def _stacked(self) -> _Matmul:
        owner = self.modules[0]
        matmuls = tuple(m.matmul for m in self.modules)
        cached: tuple[tuple[Int4Matmul, ...], _Matmul] | None = getattr(owner, "_stacked_dense", None)
        if (
            cached is None
            or cached[1].dtype != self.dtype
            or any(a is not b for a, b in zip(cached[0], matmuls, strict=True))
        ):
            owner._stacked_dense = None  # free the old copy before building the new one
            weight = torch.cat([mm.weight.dequantize(torch.float32) for mm in matmuls])
            cached = (matmuls, _Matmul(weight, _stacked_bias(self.modules, weight), self.dtype))
            owner._stacked_dense = cached
        return cached[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Mixed precision takes the stacked bf16 path at every row count: each product then multiplies the bf16
        # rounding of its weight, as the learner's autocast does, whatever else decodes beside it (the packed
        # kernel below `dense_min_rows` multiplies exactly, with fp32 activations). It is also the fast path on a
        # CPU with AMX: one decode row through SmolLM2's four stacked products of a layer took 3.2 ms in the
        # kernel against 0.28 ms in bf16 (2 threads), and rollouts whose replies finish early decode mostly such
        # stragglers (the 80-step bf16 job's generation went from 6 to 15-20 s a step as its replies shortened).
        if x.dtype == torch.float32 and (self.dtype is not None or x.numel() // x.shape[-1] >= self.dense_min_rows):
            return self._stacked()(x)
        if len(self.modules) == 1:
            return self.modules[0](x)
        return torch.cat([m(x) for m in self.modules], dim=-1)


def _weight(module: nn.Module) -> torch.Tensor:
    """A projection's [out, in] weight as a dense tensor (an INT4 one dequantized to the values it multiplies by)."""
    if type(module) is nn.Linear:
        return module.weight
    return module.matmul.weight.dequantize()  # the model's dtype: a bf16 model's activations meet bf16 weights
