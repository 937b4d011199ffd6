"""GRPO advantages and the clipped policy-gradient loss against hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from rl.advantages import ADVANTAGES, grpo
from rl.losses import LOSSES, ppo_clip, token_mean


def test_grpo_hand_worked() -> None:
    # group 0: rewards 1, 0, 0, 1 -> mean 0.5, unbiased std sqrt(1/3); group 1: 1, 1 -> all equal -> 0
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    adv = grpo(rewards, groups)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert torch.allclose(adv, torch.tensor([a, -a, -a, a, 0.0, 0.0]), atol=1e-6)
    assert ADVANTAGES.get("grpo") is grpo


def test_grpo_without_std_is_dr_grpo_and_singletons_get_zero() -> None:
    rewards = torch.tensor([3.0, 1.0, 2.0, 5.0])
    groups = torch.tensor([7, 7, 7, 9])
    adv = grpo(rewards, groups, normalize_by_std=False)
    assert adv.tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0])


def test_ppo_clip_hand_worked() -> None:
    old = torch.zeros(1, 4)
    # ratios e^0.5 = 1.6487, e^-0.5 = 0.6065, 1, e^0.1 = 1.1052
    new = torch.tensor([[0.5, -0.5, 0.0, 0.1]])
    adv = torch.tensor([[1.0, 1.0, -2.0, -1.0]])
    out = ppo_clip(new, old, adv, clip_ratio_low=0.2, clip_ratio_high=0.2)
    # A>0, r=1.6487: max(-1.6487, -1.2) = -1.2 (clipped); A>0, r=0.6065: max(-0.6065, -0.8) = -0.6065
    # A=-2, r=1: 2; A=-1, r=1.1052: max(1.1052, 1.1052) = 1.1052 (inside the clip range)
    expected = torch.tensor([[-1.2, -math.exp(-0.5), 2.0, math.exp(0.1)]])
    assert torch.allclose(out.loss, expected, atol=1e-5)
    assert out.clipped.tolist() == [[True, False, False, False]]
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert token_mean(out.loss, mask, num_tokens=3.0).item() == pytest.approx((-1.2 - math.exp(-0.5) + 2.0) / 3, abs=1e-5)
    assert LOSSES.get("ppo_clip") is ppo_clip


def test_ppo_clip_gradient_at_ratio_one_is_reinforce() -> None:
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    adv = torch.tensor([[0.5, -1.5]])
    ppo_clip(logp, logp.detach(), adv).loss.sum().backward()
    assert torch.allclose(logp.grad, -adv)


def test_unknown_estimator_suggests_a_name() -> None:
    with pytest.raises(LookupError, match="Did you mean 'grpo'"):
        ADVANTAGES.get("grp")
