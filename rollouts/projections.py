"""The slot decoder's shared building blocks on the model's own weights (`rollouts/decoder.py` and the attention
and MLP blocks it runs, `rollouts/attention.py` and `rollouts/mlp.py`).

A decode step makes dozens of small projections, and at small sizes each call's own overhead is a visible share
of it. So projections that read the same input run as one matmul on their stacked weights (`_projection`), on a
CPU from a transposed, contiguous copy of the weight (`_Matmul`), refreshed when a batch opens; RMSNorm goes
through torch's fused `rms_norm`. INT4 modules keep their own kernels (`_weight` dequantizes one when a block
needs its dense values).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


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
        bias = (
            None
            if all(b is None for b in biases)
            else torch.cat(
                [
                    b if b is not None else m.weight.new_zeros(m.out_features)
                    for m, b in zip(modules, biases, strict=True)
                ]
            )
        )
        return _Matmul(torch.cat([m.weight for m in modules]), bias)
    if len(modules) == 1:
        return modules[0]
    return lambda x: torch.cat([m(x) for m in modules], dim=-1)


def _weight(module: nn.Module) -> torch.Tensor:
    """A projection's [out, in] weight as a dense tensor (an INT4 one dequantized to the values it multiplies by)."""
    if type(module) is nn.Linear:
        return module.weight
    return module.matmul.weight.dequantize()  # the model's dtype: a bf16 model's activations meet bf16 weights
