"""Advantage estimators, by name. Each maps per-sample rewards and group ids to one advantage per sample.

`grpo` (DeepSeekMath, Shao et al. 2024): A_i = (r_i - mean(r_group)) / (std(r_group) + eps), std unbiased as in
verl's `compute_grpo_outcome_advantage`; with `normalize_by_std=False` it is Dr.GRPO's A_i = r_i - mean(r_group).
`rloo` (Ahmadian et al. 2024): A_i = r_i - mean_{j != i} r_j = n/(n-1) (r_i - mean(r_group)), the leave-one-out
baseline. A group of one sample gets advantage 0 in both (no baseline to compare against; verl passes the raw
reward through instead).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rl.registry import Registry

AdvantageFn = Callable[..., torch.Tensor]
ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator", "tiderl.advantages")
register_advantage = ADVANTAGES.register


@register_advantage("grpo")
def grpo(rewards: torch.Tensor, group_ids: torch.Tensor, normalize_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """rewards [batch] float, group_ids [batch] int -> advantages [batch]."""
    advantages = torch.zeros_like(rewards, dtype=torch.float32)
    for gid in group_ids.unique():
        members = group_ids == gid
        group = rewards[members].float()
        if group.numel() < 2:
            continue
        centered = group - group.mean()
        advantages[members] = centered / (group.std() + eps) if normalize_by_std else centered
    return advantages


@register_advantage("rloo")
def rloo(rewards: torch.Tensor, group_ids: torch.Tensor, **_: object) -> torch.Tensor:
    """rewards [batch] float, group_ids [batch] int -> advantages [batch]."""
    advantages = torch.zeros_like(rewards, dtype=torch.float32)
    for gid in group_ids.unique():
        members = group_ids == gid
        group = rewards[members].float()
        n = group.numel()
        if n < 2:
            continue
        advantages[members] = (group - group.mean()) * n / (n - 1)
    return advantages
