"""Policy losses, by name. Each returns a per-token loss; the learner aggregates it (token mean over the batch).

`ppo_clip` (Schulman et al. 2017; verl's `compute_policy_loss_vanilla`): with ratio = exp(logp - logp_old),
loss_t = max(-A_t * ratio, -A_t * clip(ratio, 1 - eps_low, 1 + eps_high)). Here logp_old is the rollout
logprob, so the ratio also corrects for any gap between the rollout engine and the learner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rl.registry import Registry


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor  # [batch, seq] per-token loss (unmasked)
    clipped: torch.Tensor  # [batch, seq] bool, where the clipped branch was taken
    ratio: torch.Tensor  # [batch, seq] importance ratio


PolicyLossFn = Callable[..., PolicyLossOutput]
LOSSES: Registry[PolicyLossFn] = Registry("policy loss", "tiderl.losses")
register_loss = LOSSES.register


@register_loss("ppo_clip")
def ppo_clip(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, clip_ratio_low: float = 0.2, clip_ratio_high: float = 0.2
) -> PolicyLossOutput:
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    return PolicyLossOutput(loss=torch.maximum(unclipped, clipped), clipped=clipped > unclipped, ratio=ratio)


def token_mean(values: torch.Tensor, mask: torch.Tensor, num_tokens: float) -> torch.Tensor:
    """Sum over masked tokens divided by the batch's token count (so micro-batches add up to the batch mean)."""
    return (values * mask).sum() / num_tokens
