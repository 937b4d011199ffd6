"""Our advantage estimators and PPO-clip loss against the peers' reference implementations on random inputs:
verl's `core_algos` (GRPO, Dr.GRPO, RLOO, PPO-clip) and TRL's GRPOTrainer and RLOOTrainer (GRPO, Dr.GRPO, RLOO).
verl pins transformers<5.11, so `make test` installs both without dependencies into `.oracles/` (see the
Makefile); these tests skip where that directory is missing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rl.trainer.advantages import grpo, reinforce_pp, reinforce_pp_baseline, rloo
from rl.trainer.losses import aggregate, cispo, gspo, ppo_clip, token_mean

ORACLES = Path(__file__).resolve().parents[1] / ".oracles"


@pytest.fixture(scope="module")
def core_algos():
    if not (ORACLES / "verl").is_dir():
        pytest.skip("verl is not installed in .oracles/ (make oracles)")
    sys.path.append(str(ORACLES))  # appended: our own packages and pins keep precedence
    from verl.trainer.ppo import core_algos

    return core_algos


def _batch(seed: int, groups: int = 6, size: int = 5, length: int = 7):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(groups * size, generator=g).round(decimals=1)  # rounding makes ties, as binary rewards do
    group_ids = torch.arange(groups).repeat_interleave(size)[torch.randperm(groups * size, generator=g)]
    mask = (torch.rand(groups * size, length, generator=g) > 0.2).float()
    mask[:, 0] = 1.0
    token_rewards = torch.zeros(groups * size, length)
    token_rewards[:, -1] = rewards  # verl puts the outcome reward on the last token and sums
    return rewards, group_ids, mask, token_rewards


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_and_dr_grpo_match_verl(core_algos, seed: int) -> None:
    rewards, group_ids, mask, token_rewards = _batch(seed)
    index = np.array([f"p{i}" for i in group_ids.tolist()], dtype=object)
    for by_std in (True, False):
        ref, _ = core_algos.compute_grpo_outcome_advantage(
            token_rewards, mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=by_std
        )
        ours = grpo(rewards, group_ids, normalize_by_std=by_std)[:, None] * mask
        assert torch.allclose(ours, ref, atol=1e-5), by_std


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rloo_matches_verl(core_algos, seed: int) -> None:
    rewards, group_ids, mask, token_rewards = _batch(seed, size=4)
    index = np.array(group_ids.tolist())
    ref, _ = core_algos.compute_rloo_outcome_advantage(token_rewards, mask, index)
    assert torch.allclose(rloo(rewards, group_ids)[:, None] * mask, ref, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_reinforce_pp_with_and_without_baseline_match_verl(core_algos, seed: int) -> None:
    rewards, group_ids, mask, token_rewards = _batch(seed)
    lengths = mask.sum(-1)
    from types import SimpleNamespace

    ref, _ = core_algos.compute_reinforce_plus_plus_outcome_advantage(
        _last_token(rewards, mask), mask, config=SimpleNamespace(gamma=1.0)
    )
    assert torch.allclose(reinforce_pp(rewards, group_ids, lengths)[:, None] * mask, ref, atol=1e-5)
    index = np.array(group_ids.tolist())
    ref, _ = core_algos.compute_reinforce_plus_plus_baseline_outcome_advantage(token_rewards, mask, index)
    assert torch.allclose(reinforce_pp_baseline(rewards, group_ids, lengths)[:, None] * mask, ref, atol=1e-5)


def _last_token(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Outcome rewards on each sequence's last response token (REINFORCE++ returns run backwards over the mask)."""
    out = torch.zeros_like(mask)
    last = (mask * torch.arange(mask.shape[1])).argmax(-1)
    out[torch.arange(mask.shape[0]), last] = rewards
    return out


class _ActorConfig(dict):
    """The fields `compute_policy_loss_vanilla` reads from verl's actor config."""

    def __init__(self, low: float, high: float, num_tokens: int) -> None:
        super().__init__(clip_ratio_c=3.0)
        self.clip_ratio, self.clip_ratio_low, self.clip_ratio_high = low, low, high
        self.global_batch_info = {"dp_size": 1, "batch_num_tokens": num_tokens}


def _as_verl_actor_config(low: float, high: float, num_tokens: int, num_seqs: int):
    """GSPO and CISPO check `isinstance(config, ActorConfig)`: a real one, with the fields they read."""
    from verl.workers.config.actor import ActorConfig

    config = ActorConfig.__new__(ActorConfig)
    for key, value in {"clip_ratio": low, "clip_ratio_low": low, "clip_ratio_high": high}.items():
        object.__setattr__(config, key, value)
    object.__setattr__(
        config, "global_batch_info", {"dp_size": 1, "batch_num_tokens": num_tokens, "global_batch_size": num_seqs}
    )
    return config


@pytest.mark.parametrize(("seed", "low", "high"), [(0, 0.2, 0.2), (1, 0.2, 0.28), (2, 0.1, 0.3)])
def test_ppo_clip_matches_verl(core_algos, seed: int, low: float, high: float) -> None:
    g = torch.Generator().manual_seed(seed)
    _, _, mask, _ = _batch(seed)
    old = -torch.rand(mask.shape, generator=g) * 3
    new = (
        old + (torch.rand(mask.shape, generator=g) - 0.5) * 1.6
    )  # ratios in [0.45, 2.2]: below verl's dual-clip bound 3
    adv = torch.randn(mask.shape[0], 1, generator=g).expand_as(mask) * mask
    ref, metrics = core_algos.compute_policy_loss_vanilla(
        old, new, adv, mask, "token-mean", _ActorConfig(low, high, int(mask.sum()))
    )
    out = ppo_clip(new, old, adv, mask, clip_ratio_low=low, clip_ratio_high=high)
    assert torch.allclose(token_mean(out.loss, mask, mask.sum()), ref, atol=1e-6)
    assert abs(float((out.clipped.float() * mask).sum() / mask.sum()) - metrics["actor/pg_clipfrac"]) < 1e-6


@pytest.fixture(scope="module")
def trl():
    if not (ORACLES / "trl").is_dir():
        pytest.skip("trl is not installed in .oracles/ (make oracles)")
    if str(ORACLES) not in sys.path:
        sys.path.append(str(ORACLES))
    import trl

    return trl


def _trl_advantages(
    trl, policy_dir: Path, tmp_path: Path, rewards: torch.Tensor, group_size: int, trainer: str, **options
) -> torch.Tensor:
    """TRL computes advantages inside its trainers: run one real batch (tiny generations) whose reward function
    returns `rewards`, and read the advantages the trainer computed."""
    from datasets import Dataset

    prompts = len(rewards) // group_size
    common = dict(
        output_dir=str(tmp_path / trainer),
        use_cpu=True,
        num_generations=group_size,
        per_device_train_batch_size=len(rewards),
        max_completion_length=3,
        report_to=[],
        beta=0.0,
    )
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"question {i}"}]} for i in range(prompts)])
    reward = lambda prompts, completions, **kwargs: rewards[: len(completions)].tolist()  # noqa: E731
    if trainer == "grpo":
        t = trl.GRPOTrainer(
            model=str(policy_dir),
            reward_funcs=[reward],
            args=trl.GRPOConfig(**common, **options),
            train_dataset=dataset,
        )
    else:
        t = trl.RLOOTrainer(
            model=str(policy_dir),
            reward_funcs=[reward],
            args=trl.RLOOConfig(**common, **options),
            train_dataset=dataset,
        )
    t.model.train()
    batch = [dataset[i] for i in range(prompts) for _ in range(group_size)]  # TRL groups consecutive completions
    return t._generate_and_score_completions(batch)["advantages"]


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_advantages_match_trl(trl, tiny_policy_dir, tmp_path: Path, estimator: str) -> None:
    group_size = 4
    rewards = torch.randn(3 * group_size, generator=torch.Generator().manual_seed(7)).round(decimals=1)
    group_ids = torch.arange(3).repeat_interleave(group_size)
    if estimator == "rloo":
        ref, ours = (
            _trl_advantages(trl, tiny_policy_dir, tmp_path, rewards, group_size, "rloo", normalize_advantages=False),
            rloo(rewards, group_ids),
        )
    else:
        scale = "group" if estimator == "grpo" else "none"
        ref = _trl_advantages(trl, tiny_policy_dir, tmp_path, rewards, group_size, "grpo", scale_rewards=scale)
        ours = grpo(rewards, group_ids, normalize_by_std=scale == "group", eps=1e-4)  # TRL's epsilon
    assert torch.allclose(ours, ref, atol=1e-5), (ours, ref)


@pytest.mark.parametrize(
    ("name", "mode"), [("gspo", "seq-mean-token-mean"), ("gspo", "token-mean"), ("cispo", "token-mean")]
)
def test_gspo_and_cispo_match_verl(core_algos, name: str, mode: str) -> None:
    g = torch.Generator().manual_seed(3)
    _, _, mask, _ = _batch(3)
    old = -torch.rand(mask.shape, generator=g) * 3
    new = (old + (torch.rand(mask.shape, generator=g) - 0.5) * 0.8).requires_grad_(True)
    adv = torch.randn(mask.shape[0], 1, generator=g).expand_as(mask) * mask
    low, high = (3e-4, 4e-4) if name == "gspo" else (0.2, 0.28)
    config = _as_verl_actor_config(low, high, int(mask.sum()), mask.shape[0])
    reference = core_algos.compute_policy_loss_gspo if name == "gspo" else core_algos.compute_policy_loss_cispo
    ref, _ = reference(old, new, adv, mask, mode, config)
    (ref_grad,) = torch.autograd.grad(ref, new)
    ours_fn = gspo if name == "gspo" else cispo
    ours = aggregate(
        ours_fn(new, old, adv, mask, clip_ratio_low=low, clip_ratio_high=high).loss,
        mask,
        mode,
        float(mask.sum()),
        mask.shape[0],
        mask.shape[1],
    )
    (grad,) = torch.autograd.grad(ours, new)
    assert torch.allclose(ours, ref, atol=1e-6) and torch.allclose(grad, ref_grad, atol=1e-6)


@pytest.mark.parametrize(
    ("loss_type", "level", "ours", "mode"),
    [
        ("grpo", "token", "ppo_clip", "seq-mean-token-mean"),
        ("dapo", "token", "ppo_clip", "token-mean"),
        ("dr_grpo", "token", "ppo_clip", "seq-mean-token-sum-norm"),
        ("grpo", "sequence", "gspo", "seq-mean-token-mean"),
        ("dapo", "sequence", "gspo", "token-mean"),
    ],
)
def test_policy_losses_match_trl(
    trl, tiny_policy_dir, tmp_path: Path, loss_type: str, level: str, ours: str, mode: str
) -> None:
    """TRL's GRPOTrainer loss (its `loss_type` aggregations, token or sequence importance sampling = GSPO) on a batch
    of random completions, against our losses fed the same per-token logprobs."""
    from datasets import Dataset

    from rl.trainer.losses import LOSSES

    low, high, length = 0.2, 0.28, 6
    args = trl.GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        num_generations=2,
        per_device_train_batch_size=4,
        max_completion_length=length,
        report_to=[],
        beta=0.0,
        loss_type=loss_type,
        importance_sampling_level=level,
        epsilon=low,
        epsilon_high=high,
    )
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "q"}]}] * 2)
    trainer = trl.GRPOTrainer(
        model=str(tiny_policy_dir),
        reward_funcs=[lambda completions, **k: [0.0] * len(completions)],
        args=args,
        train_dataset=dataset,
    )
    trainer.current_gradient_accumulation_steps = 1
    g = torch.Generator().manual_seed(11)
    prompt_ids, completion_ids = (
        torch.randint(3, 200, (4, 5), generator=g),
        torch.randint(3, 200, (4, length), generator=g),
    )
    completion_mask = torch.ones(4, length, dtype=torch.long)
    completion_mask[1, 4:], completion_mask[3, 2:] = 0, 0
    with torch.no_grad():
        logps = trainer._get_per_token_logps_and_entropies(
            trainer.model,
            torch.cat([prompt_ids, completion_ids], 1),
            torch.ones(4, 5 + length, dtype=torch.long),
            length,
        )[0]
    old = logps + (torch.rand(logps.shape, generator=g) - 0.5) * 0.6
    advantages = torch.randn(4, generator=g)
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "num_items_in_batch": completion_mask.sum(),
    }
    with torch.no_grad():
        ref = trainer._compute_loss(trainer.model, inputs)
    mask = completion_mask.float()
    out = LOSSES.get(ours)(logps, old, advantages[:, None] * mask, mask, clip_ratio_low=low, clip_ratio_high=high)
    mine = aggregate(out.loss, mask, mode, float(mask.sum()), 4, length)
    assert torch.allclose(mine, ref, atol=1e-5), (mine, ref)
