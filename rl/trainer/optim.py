"""The learner's optimizer: AdamW, or Muon for the hidden 2-D weight matrices with AdamW for the rest (Kimi K2's
recipe, MuonClip aside).

Muon is torch's `torch.optim.Muon` (Newton-Schulz orthogonalized momentum) with `adjust_lr_fn="match_rms_adamw"`
(Moonlight's scaling), so `trainer.lr` means the same step size for both. torch's Muon takes 2-D parameters only:
embeddings and the output head stay on AdamW (as in Moonlight), and so do the fused 3-D expert tensors of
transformers 5 MoE layers, which Kimi K2 would orthogonalize per expert.
"""

from __future__ import annotations

from typing import Any

import torch

from rl.trainer.config import TrainerConfig

_ADAMW_ONLY = ("embed", "lm_head", "wte", "wpe")


class CombinedOptimizer:
    """Several optimizers over disjoint parameter sets, stepped, zeroed and checkpointed together."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def muon_parameters(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(2-D hidden weight matrices for Muon, everything else for AdamW)."""
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (muon if p.ndim == 2 and not any(k in name for k in _ADAMW_ONLY) else adamw).append(p)
    return muon, adamw


def build_optimizer(model: torch.nn.Module, cfg: TrainerConfig) -> CombinedOptimizer:
    adamw_kwargs = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "adamw":
        return CombinedOptimizer({"adamw": torch.optim.AdamW(model.parameters(), **adamw_kwargs)})
    muon, rest = muon_parameters(model)
    if not muon:
        raise ValueError("trainer.optimizer=muon: the model has no 2-D hidden weight matrices for Muon")
    return CombinedOptimizer(
        {
            "muon": torch.optim.Muon(muon, lr=cfg.lr, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw"),
            "adamw": torch.optim.AdamW(rest, **adamw_kwargs),
        }
    )
