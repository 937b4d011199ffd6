"""Policy losses, by name, and how per-token losses are aggregated over a batch.

Every loss takes per-token tensors ([batch, seq]: `logprobs` under the learner, `old_logprobs` from the rollout,
`advantages` broadcast over each sequence's tokens, the loss `mask`) and returns a per-token loss; `aggregate`
turns it into the batch loss. Here `old_logprobs` are the rollout engine's, so every ratio also corrects for the
gap between the rollout engine and the learner.

- `ppo_clip` (Schulman et al. 2017; verl `vanilla`): loss_t = max(-A ratio_t, -A clip(ratio_t, 1 - eps_low,
  1 + eps_high)), ratio_t = exp(logp_t - logp_old_t). DAPO's clip-higher is `clip_ratio_high` > `clip_ratio_low`.
- `gspo` (Zheng et al. 2025, GSPO; verl `gspo`): the same clip on the sequence ratio s_i = exp(mean_t(logp -
  logp_old)), as s_i,t = sg(s_i) exp(logp_t - sg(logp_t)) so each token carries the sequence's ratio.
- `cispo` (MiniMax-M1 2025; verl `cispo`): loss_t = -sg(clip(ratio_t, 1 - eps_low, 1 + eps_high)) A logp_t: the
  clipped ratio weights the gradient instead of cutting it off.
- `k2` (Kimi K1.5/K2's online mirror descent): per sequence (A - tau log(pi/pi_old))^2 / (2 tau) with
  log(pi/pi_old) summed over the sequence's tokens and A = r - mean(r_group) (`algorithm.advantage: mean_baseline`);
  at pi = pi_old its gradient is -A grad log pi(y), REINFORCE with a mean baseline; tau (`algorithm.k2_tau`) pulls
  toward pi_old. Broadcast over tokens and aggregated `seq-mean-token-sum` it is the sequence loss itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from envs.registry import Registry

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor  # [batch, seq] per-token loss (unmasked)
    clipped: torch.Tensor  # [batch, seq] bool, where clipping changed the token's term
    ratio: torch.Tensor  # [batch, seq] importance ratio


PolicyLossFn = Callable[..., PolicyLossOutput]
LOSSES: Registry[PolicyLossFn] = Registry("policy loss", "tiderl.losses")
register_loss = LOSSES.register


@register_loss("ppo_clip")
def ppo_clip(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    **_: object,
) -> PolicyLossOutput:
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    return PolicyLossOutput(loss=torch.maximum(unclipped, clipped), clipped=clipped > unclipped, ratio=ratio)


@register_loss("gspo")
def gspo(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_ratio_low: float = 3e-4,
    clip_ratio_high: float = 4e-4,
    **_: object,
) -> PolicyLossOutput:
    seq_log_ratio = ((logprobs - old_logprobs) * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [batch]
    log_ratio = logprobs - logprobs.detach() + seq_log_ratio.detach()[:, None]
    ratio = torch.exp(log_ratio.clamp(max=10.0))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    return PolicyLossOutput(loss=torch.maximum(unclipped, clipped), clipped=clipped > unclipped, ratio=ratio)


@register_loss("cispo")
def cispo(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    **_: object,
) -> PolicyLossOutput:
    ratio = torch.exp((logprobs - old_logprobs).clamp(-20.0, 20.0))
    weight = torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high).detach()
    return PolicyLossOutput(loss=-weight * advantages * logprobs, clipped=weight != ratio.detach(), ratio=ratio)


@register_loss("k2")
def k2(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    k2_tau: float = 0.1,
    **_: object,
) -> PolicyLossOutput:
    seq_log_ratio = ((logprobs - old_logprobs) * mask).sum(-1)  # [batch]: log pi(y) / pi_old(y)
    seq_advantage = (advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # the sequence's A, once
    per_seq = (seq_advantage - k2_tau * seq_log_ratio) ** 2 / (2 * k2_tau)  # [batch]
    lengths = mask.sum(-1, keepdim=True).clamp(min=1)
    loss = per_seq[:, None] / lengths * torch.ones_like(logprobs)  # spread so that the token sum is the sequence loss
    ratio = torch.exp(logprobs - old_logprobs)
    return PolicyLossOutput(loss=loss, clipped=torch.zeros_like(mask, dtype=torch.bool), ratio=ratio)


def vanishes_at_zero_advantage(loss_fn: PolicyLossFn, **kwargs: object) -> bool:
    """Whether `loss_fn` gives a sequence whose advantages are all 0 no gradient at all (PPO-clip, GSPO, CISPO: the
    advantage multiplies every term; not K2's, whose tau term pulls toward pi_old whatever the advantage). The
    learner then skips the backward of such sequences. Checked on random logprobs away from the old ones, so it
    holds for a user's loss too, or that loss keeps the full backward."""
    g = torch.Generator().manual_seed(0)
    logprobs = (-3.0 * torch.rand(3, 6, generator=g)).requires_grad_()
    old = logprobs.detach() + 0.5 * torch.randn(3, 6, generator=g)
    mask = torch.ones(3, 6)
    try:
        out = loss_fn(logprobs, old, torch.zeros(3, 6), mask, **kwargs)
        (out.loss * mask).sum().backward()
    except (RuntimeError, TypeError, ValueError):
        return False
    return logprobs.grad is None or bool((logprobs.grad == 0).all())


def token_band_mask(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor, band: tuple[float, float]
) -> torch.Tensor:
    """K2.5's token mask: `mask` with the tokens whose log(pi/pi_old) left [alpha, beta] removed (no gradient)."""
    log_ratio = logprobs.detach() - old_logprobs
    return mask * ((log_ratio >= band[0]) & (log_ratio <= band[1])).to(mask.dtype)


def rollout_correction(logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mode: str, cap: float) -> torch.Tensor:
    """Per-token importance weights pi_learner / pi_rollout (no gradient) for the train-inference mismatch.

    tis (truncated IS, as in verl's rollout correction and Yao et al. 2025): min(w, cap); mis (masked IS): w
    inside [1/cap, cap], 0 outside (tokens the engine and the learner disagree on too much drop out). With a
    correction on, the loss's own ratio is taken against the learner's logprobs at the start of the step.
    """
    w = torch.exp((logprobs.detach() - rollout_logprobs).clamp(-20.0, 20.0))
    if mode == "tis":
        return w.clamp(max=cap)
    if mode == "mis":
        return w * ((w >= 1.0 / cap) & (w <= cap)).to(w.dtype)
    raise ValueError(f"unknown rollout correction {mode!r} (tis, mis)")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman 2020): k1 = log r, k2 = (log r)^2 / 2,
    k3 = exp(-log r) - 1 + log r (unbiased, always >= 0), with log r = logp - logp_ref (verl's low_var_kl is k3)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1, k2, k3)")


def aggregate(
    loss: torch.Tensor, mask: torch.Tensor, mode: AggMode, batch_tokens: float, batch_sequences: int, horizon: int
) -> torch.Tensor:
    """One micro-batch's share of the batch loss (shares add up to the whole batch's aggregate).

    token-mean: every token of the batch weighs the same; seq-mean-token-mean: every sequence weighs the same,
    its tokens averaged; seq-mean-token-sum: sequences weigh the same, tokens summed (sequence-level losses);
    seq-mean-token-sum-norm (Dr.GRPO): tokens summed, divided by a constant `horizon` instead of the length.
    """
    masked = loss * mask
    if mode == "token-mean":
        return masked.sum() / batch_tokens
    per_seq = masked.sum(-1)
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / mask.sum(-1).clamp(min=1)
    elif mode == "seq-mean-token-sum-norm":
        per_seq = per_seq / horizon
    return per_seq.sum() / batch_sequences


def token_mean(values: torch.Tensor, mask: torch.Tensor, num_tokens: float) -> torch.Tensor:
    """Sum over masked tokens divided by the batch's token count (so micro-batches add up to the batch mean)."""
    return (values * mask).sum() / num_tokens
