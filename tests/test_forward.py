"""The learner's forward (rl/trainer/forward.py): micro-batches of similar lengths, each prompt forwarded once, the head
on scored tokens only — each pinned to give the plain forward's logprobs, gradients and update."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config

from rl.trainer.batch import TrainBatch
from rl.trainer.forward import (
    Prompts,
    forwarded_positions,
    head_on_hidden_states,
    plan,
    scoring_states,
    shares_prompt_cache,
)
from rl.trainer.learner import Learner
from rollouts.worker import RolloutWorker
from tests.test_engine import small
from tests.test_rl_step import LENGTH_REWARD
from tests.test_scale_out import _batch


def _mask(lengths: list[int]) -> torch.Tensor:
    width = max(lengths)
    return torch.tensor([[1] * n + [0] * (width - n) for n in lengths])


def test_plan_orders_rows_by_length_and_caps_sequences_and_positions() -> None:
    mask = _mask([10, 2, 2, 2, 30, 3, 3])
    rows = lambda mbs: [m.tolist() for m in mbs]  # noqa: E731
    assert rows(plan(mask, 64)) == [[1, 2, 3, 5, 6, 0, 4]]  # shortest first
    assert rows(plan(mask, 3)) == [[1, 2, 3], [5, 6, 0], [4]]
    # at most 20 positions (rows x the longest): 5 x 3 = 15 fits, a 10-token row makes 60; the 30-token row stands alone
    assert rows(plan(mask, 64, 20)) == [[1, 2, 3, 5, 6], [0], [4]]
    assert plan(mask[:0], 64, 20) == []


def test_plan_keeps_a_prompts_rows_together_and_counts_the_prompt_once() -> None:
    # rows 0, 2, 4 share prompt A (4 tokens), rows 1, 3 prompt B (6 tokens); continuations 5, 2, 1, 2, 3 tokens
    ids = torch.tensor(
        [
            [1, 1, 1, 1, 7, 7, 7, 7, 7, 0],
            [2, 2, 2, 2, 2, 2, 8, 8, 0, 0],
            [1, 1, 1, 1, 9, 0, 0, 0, 0, 0],
            [2, 2, 2, 2, 2, 2, 9, 9, 0, 0],
            [1, 1, 1, 1, 5, 5, 5, 0, 0, 0],
        ]
    )
    mask = (ids > 0).long()
    where = mask.bool() & (ids > 2)
    prompts = Prompts.of(ids, mask, where)
    assert prompts.ids == [0, 1, 0, 1, 0] and prompts.lengths.tolist() == [4, 6, 4, 6, 4]
    # group B (longest continuation 2) before group A (5); inside a group, shortest continuation first
    assert [m.tolist() for m in plan(mask, 64, 0, prompts)] == [[1, 3, 2, 4, 0]]
    # at most 16 positions: B = 1 x 6 + 2 x 2 = 10, adding row 2 makes 2 x 6 + 3 x 2 = 18; A's rows 2 and 4 =
    # 1 x 4 + 2 x 3 = 10, adding row 0 makes 4 + 3 x 5 = 19 (unshared, rows 2 and 4 alone would be 2 x 7 = 14)
    assert [m.tolist() for m in plan(mask, 64, 16, prompts)] == [[1, 3], [2, 4], [0]]
    assert forwarded_positions(mask[[2, 4, 0]], prompts.rows(torch.tensor([2, 4, 0]))) == 4 + 3 * 5
    assert forwarded_positions(mask[[2, 4, 0]], None) == 3 * 9


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_a_shared_prompt_gives_the_whole_sequences_hidden_states(kind: str) -> None:
    """Llama-family models through the shared-prompt forward: two groups with prompts of different lengths, rows
    of different lengths, scored positions = the plain forward's states (the tiny K2 policy: the tests below)."""
    model = small(kind)
    g = torch.Generator().manual_seed(0)
    prompt_a, prompt_b = (
        torch.randint(3, 60, (5,), generator=g).tolist(),
        torch.randint(3, 60, (9,), generator=g).tolist(),
    )
    rows = [prompt_a + torch.randint(3, 60, (n,), generator=g).tolist() for n in (7, 3)] + [
        prompt_b + torch.randint(3, 60, (n,), generator=g).tolist() for n in (4, 6, 1)
    ]
    mask = _mask([len(r) for r in rows])
    ids = torch.tensor([r + [0] * (mask.shape[1] - len(r)) for r in rows])
    where = mask.bool().clone()
    where[:2, :5], where[2:, :9] = False, False
    assert shares_prompt_cache(model) and head_on_hidden_states(model)
    prompts = Prompts.of(ids, mask, where)
    assert prompts.ids == [0, 0, 1, 1, 1]
    with torch.no_grad():
        plain, at = scoring_states(model, ids, mask, where)
        shared, at_shared = scoring_states(model, ids, mask, where, prompts)
    assert [t.tolist() for t in at] == [t.tolist() for t in at_shared] and len(at[0]) == int(where.sum())
    torch.testing.assert_close(shared, plain, rtol=0, atol=1e-5)


def test_models_whose_logits_are_not_the_head_of_the_last_hidden_state_keep_the_full_forward() -> None:
    small_cfg = {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 16,
    }
    torch.manual_seed(0)
    assert not head_on_hidden_states(
        AutoModelForCausalLM.from_config(Gemma2Config(**small_cfg, final_logit_softcapping=0.5))
    )  # tanh soft-capped logits


@pytest.mark.parametrize("share_prompt", [False, True])
@pytest.mark.parametrize("fake_quant", [False, True])
def test_scoring_only_the_policy_tokens_gives_the_full_forwards_logprobs_and_gradients(
    tiny_policy_dir, make_cfg, fake_quant, share_prompt
) -> None:
    """`where=`: the head runs on the policy tokens alone (and, sharing, each group's prompt is forwarded once):
    their logprobs, entropies and gradients equal the full forward's, every other position is 0."""
    cfg = make_cfg(
        f"reward.functions=[{{name: '{LENGTH_REWARD}'}}]",
        "rollout.samples_per_prompt=4",
        "quant.enabled=true",
        f"trainer.share_prompt={share_prompt}",
    )
    batch = _batch(RolloutWorker(str(tiny_policy_dir), cfg.worker_spec(), 0), cfg, 2)
    learner = Learner(str(tiny_policy_dir), cfg.learner_spec())
    assert learner._head_on_hidden and learner._share_prompt == share_prompt
    where = batch.loss_mask > 0
    if share_prompt:
        assert (
            sorted(Prompts.of(batch.input_ids, batch.attention_mask, where).ids) == [0] * 4 + [1] * 4
        )  # 2 prompts x 4 samples

    def score(**kwargs):
        learner.model.zero_grad()
        logp, entropy = learner.sequence_logprobs(
            batch.input_ids, batch.attention_mask, fake_quant, entropy_grad=True, temperature=0.7, **kwargs
        )
        ((logp + 0.1 * entropy) * where).sum().backward()
        return (
            logp.detach(),
            entropy.detach(),
            {n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None},
        )

    (full_logp, full_entropy, full_grads), (logp, entropy, grads) = score(), score(where=where)
    assert float(logp[~where].abs().sum()) == 0 and float(entropy[~where].abs().sum()) == 0
    torch.testing.assert_close(logp[where], full_logp[where], rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy[where], full_entropy[where], rtol=0, atol=1e-5)
    assert grads.keys() == full_grads.keys() and len(grads) > 10
    for name, g in full_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_sharing_prompts_gives_the_same_update_on_fewer_positions(tiny_policy_dir, make_cfg) -> None:
    """One learner step on a real batch (8 prompts x 4 samples, QAT) with and without `trainer.share_prompt`: the
    same weights to 1e-6, loss and grad norm to 1e-5, with fewer forwarded positions than the batch has tokens."""
    base = [
        f"reward.functions=[{{name: '{LENGTH_REWARD}'}}]",
        "rollout.samples_per_prompt=4",
        "quant.enabled=true",
        "trainer.micro_batch_tokens=400",
    ]
    batch = _batch(RolloutWorker(str(tiny_policy_dir), make_cfg(*base).worker_spec(), 0), make_cfg(*base), 8)
    plain, shared = (
        Learner(str(tiny_policy_dir), make_cfg(*base, "trainer.share_prompt=false").learner_spec()),
        Learner(str(tiny_policy_dir), make_cfg(*base).learner_spec()),
    )
    a, b = plain.train_step(batch), shared.train_step(batch)
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-6) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert b["entropy"] == pytest.approx(a["entropy"], rel=1e-5) and b["mismatch_abs_logp"] == pytest.approx(
        a["mismatch_abs_logp"], rel=1e-4, abs=1e-7
    )
    for (name, p), q in zip(plain.model.named_parameters(), shared.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)
    # 4 samples share each prompt: the shared forward runs far fewer positions than the padded plain one
    assert b["train_forward_ratio"] < 0.85 * a["train_forward_ratio"] and a["train_forward_ratio"] >= 1.0


def test_the_learner_orders_rows_by_length_before_cutting_micro_batches(tiny_policy_dir, make_cfg) -> None:
    """Lengths alternating short and long, 4 rows per micro-batch: the positions forwarded are the sorted layout's
    (counted here by hand), less than half of what the given order would pad to."""
    learner = Learner(
        str(tiny_policy_dir), make_cfg("trainer.micro_batch_size=4", "trainer.share_prompt=false").learner_spec()
    )
    lengths = [6, 30, 7, 29, 6, 31, 8, 28]
    mask = _mask(lengths)
    loss_mask = mask.float()
    loss_mask[:, :3] = 0  # a 3-token prompt
    n = len(lengths)
    batch = TrainBatch(
        input_ids=torch.randint(3, 60, mask.shape, generator=torch.Generator().manual_seed(0)) * mask,
        attention_mask=mask,
        loss_mask=loss_mask,
        rollout_logprobs=-2.0 * loss_mask,
        advantages=torch.tensor([1.0, -1.0] * (n // 2))[:, None] * loss_mask,
        policy_versions=torch.zeros(n, dtype=torch.long),
    )
    as_given, sorted_ = (4 * 31 + 4 * 31) / sum(lengths), (4 * 8 + 4 * 31) / sum(lengths)
    assert learner.train_step(batch)["train_forward_ratio"] == pytest.approx(sorted_) and sorted_ < as_given / 1.5


def test_the_update_does_not_depend_on_the_order_of_the_sequences(tiny_policy_dir, make_cfg) -> None:
    cfg = make_cfg(
        f"reward.functions=[{{name: '{LENGTH_REWARD}'}}]",
        "rollout.samples_per_prompt=4",
        "quant.enabled=true",
        "trainer.micro_batch_size=3",
    )
    batch = _batch(RolloutWorker(str(tiny_policy_dir), cfg.worker_spec(), 0), cfg, 3)
    shuffled = batch.select(torch.randperm(batch.num_sequences, generator=torch.Generator().manual_seed(0)))
    a_learner, b_learner = (
        Learner(str(tiny_policy_dir), cfg.learner_spec()),
        Learner(str(tiny_policy_dir), cfg.learner_spec()),
    )
    a, b = a_learner.train_step(batch), b_learner.train_step(shuffled)
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-6) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    for (name, p), q in zip(a_learner.model.named_parameters(), b_learner.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_mla_attention_with_padded_values_is_the_same_attention(tiny_policy_dir, make_cfg) -> None:
    """The K2 policy's values (16 wide) padded to its query width (32) so SDPA runs its flash kernel: the same
    logits as SDPA's math path, and the gradients."""
    from rl.trainer.forward import LEARNER_SDPA, use_learner_attention
    from rollouts.model import load_policy

    cfg = make_cfg()
    model, _ = load_policy(tiny_policy_dir, cfg.model)
    ids = torch.randint(3, 200, (3, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0

    def run():
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask).logits
        (logits * mask[..., None]).square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert model.config._attn_implementation == "sdpa"
    plain, plain_grads = run()
    assert use_learner_attention(model) and model.config._attn_implementation == LEARNER_SDPA
    padded, grads = run()
    real = mask.bool()
    torch.testing.assert_close(padded[real], plain[real], rtol=0, atol=1e-5)
    for name, g in plain_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_learner_attention_runs_float32_under_cpu_autocast() -> None:
    """Under bf16 autocast the learner's SDPA takes the bf16 projections' outputs, runs float32 (torch's CPU
    flash backward is ~3x slower in bf16) and hands back bf16: its output is the float32 attention of the bf16
    inputs, rounded once, and the model's logits stay within bf16 rounding of transformers' own `sdpa`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from rl.trainer.forward import _sdpa_learner, use_learner_attention

    model = small("llama")
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, 9, 16, generator=g).bfloat16() for heads in (4, 2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = _sdpa_learner(attn, q, k, v, None, is_causal=True, scaling=0.25)
    exact, _ = sdpa_attention_forward(attn, q.float(), k.float(), v.float(), None, is_causal=True, scaling=0.25)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, exact.bfloat16())
    ids = torch.randint(0, 97, (2, 12), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(input_ids=ids).logits.float()
        assert use_learner_attention(model)
        learner = model(input_ids=ids).logits.float()
    assert (learner - plain).abs().max() < 0.02 * plain.abs().max()


def _zero_groups(batch: TrainBatch, groups: list[int], size: int) -> TrainBatch:
    """The batch with the advantages of groups `groups` (rows size*g ... size*g + size - 1) set to 0, as GRPO gives
    a group whose samples all got the same reward."""
    advantages = batch.advantages.clone()
    for g in groups:
        advantages[g * size : (g + 1) * size] = 0.0
    return dataclasses.replace(batch, advantages=advantages)


def test_zero_advantage_sequences_skip_the_backward_and_give_the_same_update(tiny_policy_dir, make_cfg) -> None:
    """A real batch (6 prompts x 4 samples, QAT) where 3 groups got equal rewards: their sequences are forwarded
    without autograd and not backpropagated; weights, loss, grad norm and every metric equal the full backward's."""
    base = [
        f"reward.functions=[{{name: '{LENGTH_REWARD}'}}]",
        "rollout.samples_per_prompt=4",
        "quant.enabled=true",
        "trainer.micro_batch_tokens=300",
    ]
    batch = _zero_groups(
        _batch(RolloutWorker(str(tiny_policy_dir), make_cfg(*base).worker_spec(), 0), make_cfg(*base), 6), [0, 2, 5], 4
    )
    full, skipping = (
        Learner(str(tiny_policy_dir), make_cfg(*base, "trainer.skip_zero_advantage_backward=false").learner_spec()),
        Learner(str(tiny_policy_dir), make_cfg(*base).learner_spec()),
    )
    assert skipping._backward_rows(batch).tolist() == [False] * 4 + [True] * 4 + [False] * 4 + [True] * 8 + [False] * 4
    a, b = full.train_step(batch), skipping.train_step(batch)
    assert a["train_backward_fraction"] == 1.0 and 0.3 < b["train_backward_fraction"] < 0.7
    assert b["train_forward_ratio"] == pytest.approx(
        a["train_forward_ratio"], rel=0.05
    )  # the same positions, cut apart
    for key in (
        "loss",
        "mismatch_abs_logp",
        "mismatch_kl",
        "entropy",
        "ratio_mean",
        "clip_fraction",
        "mismatch_quant_abs_logp",
    ):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-8), key
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5) and a["grad_norm"] > 0
    for (name, p), q in zip(full.model.named_parameters(), skipping.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)
    # a batch without any gradient still takes AdamW's step on its moments, as the full backward does
    nothing = _zero_groups(batch, list(range(6)), 4)
    before = [p.detach().clone() for p in skipping.model.parameters()]
    a, b = full.train_step(nothing), skipping.train_step(nothing)
    assert a["grad_norm"] == b["grad_norm"] == 0.0 and b["train_backward_fraction"] < 1.0  # one micro-batch
    assert any(not torch.equal(p, q) for p, q in zip(skipping.model.parameters(), before, strict=True))
    for (name, p), q in zip(full.model.named_parameters(), skipping.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)


def test_unscored_zero_advantage_sequences_give_the_same_update_and_the_trained_sequences_metrics(
    tiny_policy_dir, make_cfg
) -> None:
    """`trainer.score_zero_advantage=false`: the sequences without gradient are not forwarded at all; the update is
    still the full backward's, and the metrics are those of the trained sequences alone."""
    base = [
        f"reward.functions=[{{name: '{LENGTH_REWARD}'}}]",
        "rollout.samples_per_prompt=4",
        "quant.enabled=true",
        "trainer.micro_batch_tokens=300",
    ]
    batch = _zero_groups(
        _batch(RolloutWorker(str(tiny_policy_dir), make_cfg(*base).worker_spec(), 0), make_cfg(*base), 6), [1, 2, 4], 4
    )
    full, unscored = (
        Learner(str(tiny_policy_dir), make_cfg(*base).learner_spec()),
        Learner(str(tiny_policy_dir), make_cfg(*base, "trainer.score_zero_advantage=false").learner_spec()),
    )
    trained_only = Learner(str(tiny_policy_dir), make_cfg(*base).learner_spec())
    a, b = full.train_step(batch), unscored.train_step(batch)
    c = trained_only.train_step(batch.select(unscored._backward_rows(batch).nonzero().flatten()))
    assert b["train_forward_ratio"] < 0.7 * a["train_forward_ratio"] and b["train_backward_fraction"] == 1.0
    for (name, p), q in zip(full.model.named_parameters(), unscored.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)
    for key in (
        "mismatch_abs_logp",
        "mismatch_kl",
        "entropy",
        "ratio_mean",
        "clip_fraction",
        "mismatch_quant_abs_logp",
    ):
        assert b[key] == pytest.approx(c[key], rel=1e-5, abs=1e-8), key


@pytest.mark.parametrize(("loss", "vanishes"), [("ppo_clip", True), ("gspo", True), ("cispo", True), ("k2", False)])
def test_which_losses_vanish_at_zero_advantage(loss: str, vanishes: bool) -> None:
    """K2's loss pulls toward pi_old whatever the advantage, so its zero-advantage sequences keep their backward."""
    from rl.trainer.losses import LOSSES, vanishes_at_zero_advantage

    assert vanishes_at_zero_advantage(LOSSES.get(loss)) is vanishes


def test_an_entropy_bonus_keeps_every_backward(tiny_policy_dir, make_cfg) -> None:
    learner = Learner(str(tiny_policy_dir), make_cfg("algorithm.entropy_coef=0.01").learner_spec())
    assert (
        not learner._skip_zero_advantage
        and Learner(str(tiny_policy_dir), make_cfg().learner_spec())._skip_zero_advantage
    )
