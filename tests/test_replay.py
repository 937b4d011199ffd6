"""Sampling-mask replay and routing replay (R3): the rollout records its truncation and its MoE routing, and the
learner scores under the same ones (rollouts/replay.py, rollouts/routing.py, rl/trainer/replay.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_rl_step import IN_PROCESS, _metrics, calculator_rows
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from rewards.scoring import RewardScorer
from rl.loop.controller import train
from rl.trainer.batch import TrainBatch
from rl.trainer.learner import Learner
from rl.trainer.replay import RoutingReplay
from rollouts.engine import Engine
from rollouts.routing import moe_blocks
from rollouts.sampling import SamplingParams
from rollouts.worker import RolloutWorker


def _batch(worker: RolloutWorker, cfg, prompts: int = 4) -> TrainBatch:
    trajectories = worker.generate(calculator_rows(prompts), cfg.rollout.samples_per_prompt)
    scored = RewardScorer(cfg.reward).score(trajectories).scored
    return TrainBatch.from_scored(scored, torch.zeros(len(scored)), worker.pad_token_id())


def test_sampling_mask_replay_removes_the_kept_mass_bias(tiny_policy_dir, make_cfg) -> None:
    """With top-k + top-p the rollout logprob is of the truncated distribution; the learner renormalized over the
    recorded kept ids equals it to float noise, the full distribution is off by exactly log(kept mass)."""
    cfg = make_cfg("rollout.top_k=6", "rollout.top_p=0.9")
    worker, learner = (
        RolloutWorker(str(tiny_policy_dir), cfg.worker_spec(), 0),
        Learner(str(tiny_policy_dir), cfg.learner_spec()),
    )
    batch = _batch(worker, cfg)
    policy = batch.loss_mask > 0
    kept = batch.sampling_mask
    assert kept is not None and kept.shape[-1] <= 6  # bounded by top_k, trimmed to the widest kept set
    assert bool((kept[policy] == batch.input_ids[policy][:, None]).any(-1).all())  # the sampled token was kept
    assert bool((kept[~policy] == -1).all())  # prompt and tool tokens were not sampled
    with torch.no_grad():
        replayed, _ = learner.sequence_logprobs(batch.input_ids, batch.attention_mask, where=policy, kept=kept)
        full, _ = learner.sequence_logprobs(batch.input_ids, batch.attention_mask, where=policy)
        logits = learner.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    # the kept mass under the full distribution at each scored token: what the full logprob leaves in the ratio
    probs = torch.softmax(logits[:, :-1] / cfg.rollout.temperature, -1)
    ids = kept[:, 1:].long()
    mass = (probs.gather(-1, ids.clamp(min=0)) * (ids >= 0)).sum(-1)
    log_mass = torch.cat([torch.zeros_like(mass[:, :1]), mass.log()], 1)
    gap = (replayed - batch.rollout_logprobs)[policy].abs()
    assert float(gap.max()) < 1e-5
    assert torch.allclose((full - batch.rollout_logprobs)[policy], log_mass[policy], atol=1e-5)
    assert float(log_mass[policy].mean()) < -0.05  # the bias replay removes is real on this policy
    metrics = learner.train_step(batch)
    assert metrics["mismatch_abs_logp"] < 1e-5


def test_sampling_mask_replay_is_on_with_truncation_and_its_settings_are_checked(make_cfg) -> None:
    assert make_cfg("rollout.top_p=0.9").rollout.kept_per_token == 512  # top-p alone samples under this bound
    assert make_cfg("rollout.top_k=20").rollout.kept_per_token == 512
    assert make_cfg().rollout.kept_per_token == 0
    assert make_cfg("rollout.top_k=20", "rollout.sampling_mask_replay=false").rollout.kept_per_token == 0
    with pytest.raises(ValueError, match="sampling is not truncated"):
        make_cfg("rollout.sampling_mask_replay=true")
    with pytest.raises(ValueError, match="raise sampling_mask_max_kept"):
        make_cfg("rollout.top_k=64", "rollout.sampling_mask_max_kept=32")


def _used_experts(learner: Learner) -> list[torch.Tensor]:
    """Records the experts each router hands on (after the replay hook): [tokens, top_k] per call."""
    used: list[torch.Tensor] = []
    for block in moe_blocks(learner.model, "test"):
        block.gate.register_forward_hook(lambda m, a, out: used.append(out[2].sort(-1).values))
    return used


def test_routing_is_recorded_for_every_computed_position_and_replayed_exactly(tool_policy_dir, make_cfg) -> None:
    """Multi-turn episodes with tool results (prefilled on the episode's cached slot): the routing covers every
    position that scores a policy token, the learner with the same weights routes the same way (agreement 1.0),
    and with routers perturbed (a stale or quantized learner) replay hands the experts the rollout's choice and
    lowers the mismatch."""
    cfg = make_cfg("algorithm.routing_replay=replay", "env.max_turns=3")
    worker = RolloutWorker(str(tool_policy_dir), cfg.worker_spec(), 0)
    trajectories = worker.generate(calculator_rows(4), cfg.rollout.samples_per_prompt)
    assert any(t.num_tool_calls for t in trajectories), "the test needs tool results inside episodes"
    for t in trajectories:
        last_policy = int(t.loss_mask.nonzero().max())
        assert t.routing is not None and t.routing.dtype == torch.uint8 and t.routing.shape[1:] == (2, 2)
        assert last_policy <= len(t.routing) <= len(t.token_ids) - 1, t.sample_id
    scored = RewardScorer(cfg.reward).score(trajectories).scored
    batch = TrainBatch.from_scored(scored, torch.zeros(len(scored)), worker.pad_token_id())

    learner = Learner(str(tool_policy_dir), cfg.learner_spec())
    assert learner.train_step(batch)["routing_agreement"] == 1.0  # same weights: the same routing
    learner = Learner(str(tool_policy_dir), make_cfg("algorithm.routing_replay=record").learner_spec())
    with torch.no_grad():
        for block in moe_blocks(learner.model, "test"):
            block.gate.weight.add_(0.3 * block.gate.weight.std() * torch.randn_like(block.gate.weight))
    where = batch.loss_mask > 0
    with torch.no_grad():
        own, _ = learner.sequence_logprobs(batch.input_ids, batch.attention_mask, where=where, routing=batch.routing)
        matches, compared = learner.routing.take()
        learner.routing.mode = "replay"
        replayed, _ = learner.sequence_logprobs(
            batch.input_ids, batch.attention_mask, where=where, routing=batch.routing
        )
    assert compared > 0 and matches / compared < 0.9  # the perturbed routers choose otherwise
    assert learner.routing.take()[1] == compared  # the same pairs compared (own choices move with the inputs)
    mismatch_own = float((own - batch.rollout_logprobs)[where].abs().mean())
    mismatch_replayed = float((replayed - batch.rollout_logprobs)[where].abs().mean())
    assert mismatch_replayed < 0.5 * mismatch_own


def test_replayed_forward_uses_the_rollouts_experts(tiny_policy_dir, make_cfg) -> None:
    """One forward without prompt sharing: the experts every router hands on are the rollout's at each recorded
    position (the learner's routers perturbed, so their own choice differs)."""
    cfg = make_cfg("algorithm.routing_replay=replay", "trainer.share_prompt=false")
    worker = RolloutWorker(str(tiny_policy_dir), cfg.worker_spec(), 0)
    batch = _batch(worker, cfg, prompts=2)
    learner = Learner(str(tiny_policy_dir), cfg.learner_spec())
    with torch.no_grad():
        for block in moe_blocks(learner.model, "test"):
            block.gate.weight.add_(0.3 * block.gate.weight.std() * torch.randn_like(block.gate.weight))
    used = _used_experts(learner)
    with torch.no_grad():
        learner.sequence_logprobs(
            batch.input_ids, batch.attention_mask, where=batch.loss_mask > 0, routing=batch.routing
        )
    matches, compared = learner.routing.take()
    assert matches < compared  # the routers' own choice differs ...
    rollout = batch.routing.reshape(-1, 2, 2).long()
    recorded = rollout[:, 0, 0] >= 0
    for layer, experts in enumerate(used):  # ... and the experts used are the rollout's
        assert torch.equal(experts[recorded], rollout[recorded, layer])


def test_routing_agreement_under_int4_ptq_is_below_one(tiny_policy_dir, make_cfg) -> None:
    """INT4 rollouts and a full-precision learner (PTQ): the second MoE layer's routers see different inputs and
    pick other experts for some tokens; `record` reports it."""
    cfg = make_cfg("quant.enabled=true", "quant.mode=ptq", "algorithm.routing_replay=record")
    worker = RolloutWorker(str(tiny_policy_dir), cfg.worker_spec(), 0)
    metrics = Learner(str(tiny_policy_dir), cfg.learner_spec()).train_step(_batch(worker, cfg, prompts=8))
    assert 0.95 < metrics["routing_agreement"] < 1.0


def test_routing_replay_fails_loudly_where_it_cannot_apply(tiny_policy_dir, make_cfg) -> None:
    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(ValueError, match="needs a mixture-of-experts model; model.path is a 'llama' model"):
        RoutingReplay(llama, "replay")
    with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
        Engine(llama, 0, 1, record_routing=True).batcher(SamplingParams(), 1, 8)
    mixtral = MixtralForCausalLM(
        MixtralConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            num_local_experts=4,
        )
    )
    with pytest.raises(ValueError, match="'mixtral' model's MoE router .* DeepSeek-V3-style routers"):
        RoutingReplay(mixtral, "record")
    with pytest.raises(ValueError, match="runs 'mixtral' models through their HF forward"):
        Engine(mixtral, 0, 1, record_routing=True)
    plain = make_cfg()  # rollouts that recorded no routing (as an agent's, served by the OpenAI endpoint)
    batch = _batch(RolloutWorker(str(tiny_policy_dir), plain.worker_spec(), 0), plain, prompts=1)
    with pytest.raises(ValueError, match="routing_replay=replay, but the batch carries no rollout routing"):
        Learner(str(tiny_policy_dir), make_cfg("algorithm.routing_replay=replay").learner_spec()).train_step(batch)
    recorded = Learner(str(tiny_policy_dir), make_cfg("algorithm.routing_replay=record").learner_spec())
    metrics = recorded.train_step(batch)  # record only measures: nothing to measure, nothing reported
    assert "routing_agreement" not in metrics and metrics["train_tokens"] > 0


@pytest.mark.slow
def test_a_job_with_routing_and_sampling_mask_replay_and_partial_rollouts(tmp_path: Path, make_cfg) -> None:
    """Async steps, partial rollouts resumed under newer weights, top-p sampling: every trained step replays and
    reports its routing agreement; the mismatch stays at the policy lag's."""
    train(
        make_cfg(
            IN_PROCESS,
            "algorithm.routing_replay=replay",
            "rollout.top_p=0.9",
            "rollout.partial_rollout_budget=8",
            "trainer.steps=3",
            "eval.enabled=false",
        ),
        tmp_path,
    )
    rows = _metrics(tmp_path)
    trained = [r for r in rows if "loss" in r]
    assert trained and all(0.5 < r["routing_agreement"] <= 1.0 for r in trained)
    assert all(r["mismatch_abs_logp"] < 0.05 for r in trained)
