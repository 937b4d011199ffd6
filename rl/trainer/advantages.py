"""Advantage estimators, by name. Each maps per-sample rewards and group ids to one advantage per sample.

`grpo` (DeepSeekMath, Shao et al. 2024): A_i = (r_i - mean(r_group)) / (std(r_group) + eps), std unbiased as in
verl's `compute_grpo_outcome_advantage`; with `normalize_by_std=False` it is Dr.GRPO's A_i = r_i - mean(r_group).
`mean_baseline` (Kimi K1.5/K2): A_i = r_i - mean(r_group), the baseline of the K2 loss (same as Dr.GRPO).
`reinforce_pp` (REINFORCE++, Hu 2025; verl `reinforce_plus_plus` for outcome rewards): the reward whitened over every
response token of the batch (token-weighted mean and unbiased variance); `reinforce_pp_baseline` subtracts the
group mean first (verl `reinforce_plus_plus_baseline`). They take `lengths`, each sample's response token count.
`rloo` (Ahmadian et al. 2024): A_i = r_i - mean_{j != i} r_j = n/(n-1) (r_i - mean(r_group)), the leave-one-out
baseline. A group of one sample gets advantage 0 in both (no baseline to compare against; verl passes the raw
reward through instead).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from envs.registry import Registry

AdvantageFn = Callable[..., torch.Tensor]
ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator", "tiderl.advantages")
register_advantage = ADVANTAGES.register


@register_advantage("grpo")
def grpo(
    rewards: torch.Tensor, group_ids: torch.Tensor, normalize_by_std: bool = True, eps: float = 1e-6, **_: object
) -> torch.Tensor:
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


@register_advantage("mean_baseline")
def mean_baseline(rewards: torch.Tensor, group_ids: torch.Tensor, **_: object) -> torch.Tensor:
    return grpo(rewards, group_ids, normalize_by_std=False)


def _whiten_over_tokens(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) with each sample counted once per response token (verl's masked_whiten)."""
    weights = lengths.float()
    n = weights.sum()
    if n < 2:
        return torch.zeros_like(values, dtype=torch.float32)
    mean = (values * weights).sum() / n
    var = ((values - mean) ** 2 * weights).sum() / n * (n / (n - 1))
    return (values - mean) * torch.rsqrt(var + 1e-8)


@register_advantage("reinforce_pp")
def reinforce_pp(rewards: torch.Tensor, group_ids: torch.Tensor, lengths: torch.Tensor, **_: object) -> torch.Tensor:
    return _whiten_over_tokens(rewards.float(), lengths)


@register_advantage("reinforce_pp_baseline")
def reinforce_pp_baseline(
    rewards: torch.Tensor, group_ids: torch.Tensor, lengths: torch.Tensor, **_: object
) -> torch.Tensor:
    centered = rewards.float().clone()
    for gid in group_ids.unique():
        members = group_ids == gid
        centered[members] = centered[members] - centered[members].mean()
    return _whiten_over_tokens(centered, lengths)
