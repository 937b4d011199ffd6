"""Advantage estimators and policy losses against hand-worked numbers (the peers' implementations are the oracles
in test_oracles.py)."""

from __future__ import annotations

import math

import pytest
import torch

from rl.trainer.advantages import ADVANTAGES, grpo
from rl.trainer.losses import LOSSES, aggregate, ppo_clip, token_band_mask, token_mean


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
    assert token_mean(out.loss, mask, num_tokens=3.0).item() == pytest.approx(
        (-1.2 - math.exp(-0.5) + 2.0) / 3, abs=1e-5
    )
    assert LOSSES.get("ppo_clip") is ppo_clip


def test_ppo_clip_gradient_at_ratio_one_is_reinforce() -> None:
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    adv = torch.tensor([[0.5, -1.5]])
    ppo_clip(logp, logp.detach(), adv).loss.sum().backward()
    assert torch.allclose(logp.grad, -adv)


def test_unknown_estimator_suggests_a_name() -> None:
    with pytest.raises(LookupError, match="Did you mean 'grpo'"):
        ADVANTAGES.get("grp")


def _k2_grad(
    advantages: torch.Tensor, logp: torch.Tensor, old: torch.Tensor, mask: torch.Tensor, tau: float = 0.1
) -> torch.Tensor:
    logp = logp.clone().requires_grad_(True)
    out = LOSSES.get("k2")(logp, old, advantages[:, None] * mask, mask, k2_tau=tau)
    loss = aggregate(out.loss, mask, "seq-mean-token-sum", float(mask.sum()), mask.shape[0], mask.shape[1])
    return torch.autograd.grad(loss, logp)[0]


def test_k2_loss_at_pi_old_is_reinforce_with_a_mean_baseline() -> None:
    g = torch.Generator().manual_seed(0)
    rewards, groups = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0]), torch.tensor([0, 0, 0, 1, 1, 1])
    advantages = ADVANTAGES.get("mean_baseline")(rewards, groups)
    assert torch.allclose(advantages, torch.tensor([2 / 3, -1 / 3, -1 / 3, 1 / 3, 1 / 3, -2 / 3]))
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    old = -torch.rand(6, 5, generator=g)
    grad = _k2_grad(advantages, old, old, mask)
    # REINFORCE with baseline: loss = -(1/B) sum_i A_i log pi(y_i), so d/d logp_it = -A_i / B on every response token
    assert torch.allclose(grad, -advantages[:, None] / 6 * mask, atol=1e-7)
    # away from pi_old, tau pulls back: the gradient grows with the log-ratio, as (A - tau * logratio)
    moved = old + 0.5 * mask
    expected = -(advantages - 0.1 * (0.5 * mask).sum(-1))[:, None] / 6 * mask
    assert torch.allclose(_k2_grad(advantages, moved, old, mask), expected, atol=1e-6)


def test_equal_rewards_in_a_group_give_zero_policy_gradient() -> None:
    rewards, groups = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]), torch.tensor([0, 0, 0, 1, 1])
    for name in ("grpo", "rloo", "mean_baseline"):
        assert torch.equal(ADVANTAGES.get(name)(rewards, groups), torch.zeros(5)), name
    mask = torch.ones(5, 4)
    old = -torch.rand(5, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(_k2_grad(ADVANTAGES.get("mean_baseline")(rewards, groups), old, old, mask), torch.zeros(5, 4))


def test_token_mask_zeroes_gradient_outside_the_band_for_both_signs_of_advantage() -> None:
    old = torch.zeros(2, 4)
    logp = torch.tensor(
        [[-0.9, -0.1, 0.1, 0.9], [-0.9, -0.1, 0.1, 0.9]]
    )  # log-ratios: two outside [-0.5, 0.5], two inside
    mask = torch.ones(2, 4)
    band = token_band_mask(logp, old, mask, (-0.5, 0.5))
    assert band.tolist() == [[0.0, 1.0, 1.0, 0.0]] * 2
    advantages = torch.tensor([[1.0] * 4, [-1.0] * 4])  # a positive and a negative advantage
    for name in ("ppo_clip", "cispo"):
        x = logp.clone().requires_grad_(True)
        out = LOSSES.get(name)(x, old, advantages, band, clip_ratio_low=10.0, clip_ratio_high=10.0)
        (grad,) = torch.autograd.grad(aggregate(out.loss, band, "token-mean", 8.0, 2, 4), x)
        assert torch.equal(grad[:, [0, 3]], torch.zeros(2, 2)), name
        assert (grad[0, 1:3] < 0).all() and (grad[1, 1:3] > 0).all(), name  # inside the band: the usual signs


def test_prioritized_sampling_frequencies_match_their_targets_over_20k_draws() -> None:
    from envs.base import PromptRow
    from rl.loop.data import PromptSampler

    rows = [PromptRow(i, [{"role": "user", "content": str(i)}], "t", "0") for i in range(6)]
    sampler = PromptSampler(rows, seed=0, mode="prioritized", success_ema=1.0)
    sampler.update({0: 1.0, 1: 0.75, 2: 0.5, 3: 0.25, 4: 0.0})  # row 5 unseen: success 0, like row 4
    target = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.0]) / 3.5
    assert torch.allclose(sampler.weights().float(), target)
    counts = torch.zeros(6)
    for _ in range(20000 // 16):
        for i in sampler.draw_indices(16):
            counts[i] += 1
    freq = counts / counts.sum()
    assert counts[0] == 0 and (freq - target).abs().max() < 0.02 and 0.5 * (freq - target).abs().sum() < 0.01
    resumed = PromptSampler(rows, seed=0, mode="prioritized")
    resumed.load_state_dict(sampler.state_dict())
    assert resumed.draw_indices(8) == sampler.draw_indices(8)  # success rates and draw counter travel in checkpoints
    sampler.update({1: 0.0})  # the EMA (weight 1 here) moves the rate to the newest accuracy
    assert sampler.success[1] == 0.0 and sampler.weights()[1] == sampler.weights()[4]


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(tiny_policy_dir, make_cfg) -> None:
    from rl.trainer.optim import build_optimizer, muon_parameters
    from rollouts.model import load_policy

    cfg = make_cfg("trainer.optimizer=muon")
    model, _ = load_policy(tiny_policy_dir, cfg.model)
    muon, adamw = muon_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 for p in muon) and not any(
        "embed" in names[id(p)] or "lm_head" in names[id(p)] for p in muon
    )
    assert any(p.ndim == 3 for p in adamw) and len(muon) + len(adamw) == len(list(model.parameters()))
    optimizer = build_optimizer(model, cfg.trainer)
    before = [p.detach().clone() for p in model.parameters()]
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    moved = {names[id(p)] for p, b in zip(model.parameters(), before, strict=True) if not torch.equal(p, b)}
    assert {names[id(p)] for p in muon} <= moved and any("embed" in n for n in moved)
    state = optimizer.state_dict()
    assert set(state) == {"muon", "adamw"} and state["muon"]["state"]
    build_optimizer(model, cfg.trainer).load_state_dict(state)  # round-trips through checkpoints


def test_rollout_corrections_truncate_or_mask_the_importance_weights() -> None:
    from rl.trainer.losses import rollout_correction

    rollout = torch.zeros(1, 4)
    learner = torch.log(torch.tensor([[0.25, 0.9, 1.5, 3.0]]))  # pi_learner / pi_rollout per token
    assert torch.allclose(rollout_correction(learner, rollout, "tis", 2.0), torch.tensor([[0.25, 0.9, 1.5, 2.0]]))
    assert torch.allclose(rollout_correction(learner, rollout, "mis", 2.0), torch.tensor([[0.0, 0.9, 1.5, 0.0]]))
    assert torch.allclose(
        rollout_correction(rollout, rollout, "tis", 2.0), torch.ones(1, 4)
    )  # no mismatch: no correction


def test_dapo_overlong_penalty_is_soft_then_hard() -> None:
    from rewards.shaping import overlong_penalty

    ids = [[0] * n for n in (10, 12, 14, 16, 20)]
    assert overlong_penalty([], [None] * 5, ids, max_length=16, cache_length=4) == [0.0, 0.0, -0.5, -1.0, -1.0]


def test_kl_estimators_hand_worked() -> None:
    from rl.trainer.losses import kl_penalty

    logp, ref = torch.tensor([math.log(0.5), math.log(0.2)]), torch.tensor([math.log(0.25), math.log(0.2)])
    r = math.log(2.0)
    assert torch.allclose(kl_penalty(logp, ref, "k1"), torch.tensor([r, 0.0]))
    assert torch.allclose(kl_penalty(logp, ref, "k2"), torch.tensor([r * r / 2, 0.0]))
    assert torch.allclose(kl_penalty(logp, ref, "k3"), torch.tensor([0.5 - 1 + r, 0.0]))


def test_curriculum_walks_easy_to_hard_and_names_rows_without_difficulty() -> None:
    from envs.base import PromptRow
    from rl.loop.data import DataError, PromptSampler

    rows = [
        PromptRow(i, [{"role": "user", "content": str(i)}], "t", "0", {"difficulty": d})
        for i, d in enumerate([3, 1, 2, 1, 3])
    ]
    sampler = PromptSampler(rows, seed=0, mode="curriculum")
    sampler.check()
    walk = [r.extra_info["difficulty"] for r in sampler.next(10)]
    assert walk == [1, 1, 2, 3, 3, 1, 1, 2, 3, 3]  # each epoch from easy to hard
    rows.append(PromptRow(5, [{"role": "user", "content": "x"}], "t", "0", {}))
    with pytest.raises(DataError, match="row 5"):
        PromptSampler(rows, seed=0, mode="curriculum").check()


def test_temperature_schedule_decays_linearly() -> None:
    from rl.config import load_config
    from rl.loop.sampling import rollout_temperature

    cfg = load_config(
        None,
        ["model={}", "rollout.temperature=1.0", "rollout.temperature_final=0.6", "rollout.temperature_decay_steps=4"],
    )
    assert [round(rollout_temperature(cfg, s), 6) for s in range(1, 7)] == [1.0, 0.9, 0.8, 0.7, 0.6, 0.6]
    assert rollout_temperature(load_config(None, ["model={}"]), 9) == 1.0
