"""Sharded learners (`trainer.sharding: fsdp`, rl/trainer/sharding.py): two learner actors on a real local Ray, FSDP2
over gloo, the tiny built-in MoE policy with QAT on its fused expert tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch

from rl.config import ConfigError
from rl.launch.placement import place
from rl.launch.preflight import PreflightError, preflight
from rl.loop.controller import train
from rl.trainer.learner import Learner
from rl.trainer.learner_group import LearnerGroup
from rl.trainer.sharding import SHARDS_DIR
from rollouts.quant import PackedInt4
from rollouts.worker import RolloutWorker
from tests.test_rl_step import LENGTH_REWARD
from tests.test_scale_out import _batch

BASE = (
    f"reward.functions=[{{name: '{LENGTH_REWARD}'}}]",
    "rollout.samples_per_prompt=4",
    "quant.enabled=true",
    "trainer.learner_cpus=0.25",
    "rollout.cpus_per_worker=0.25",
    "trainer.micro_batch_size=3",  # several micro-batches per shard, in different numbers on the two ranks
)
SHARDED = ("trainer.num_learners=2", "trainer.sharding=fsdp")


def _whole(group: LearnerGroup) -> dict[str, torch.Tensor]:
    """Rank 0's whole weights (gathered after the last update)."""
    return ray.get(group.actors[0].full_state_dict.remote())


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys() and len(a) > 20
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, worst


@pytest.fixture(scope="module")
def batches(tiny_policy_dir, make_cfg) -> list:
    """Three real batches of 3 prompts x 4 samples, and one of a single sequence (one rank's shard is empty)."""
    cfg = make_cfg(*BASE)
    worker = RolloutWorker(str(tiny_policy_dir), cfg.worker_spec(), 0)
    out = [_batch(worker, cfg, 3, first_row=3 * k) for k in range(3)]
    return [*out, out[0].select(slice(0, 1))]


@pytest.mark.usefixtures("ray_local")
def test_sharded_update_equals_the_single_learner_and_holds_half_per_rank(tiny_policy_dir, make_cfg, batches) -> None:
    """Each of 4 updates (QAT on; the last with one rank's shard empty): the metrics are the single learner's and
    the whole weights equal its weights within fp32 noise; each rank holds half the parameters, gradients and
    optimizer state; the fake-quant the sharded forward runs is bit for bit the INT4 weights rank 0 pushes."""
    single = Learner(str(tiny_policy_dir), make_cfg(*BASE).learner_spec())
    cfg = make_cfg(*BASE, *SHARDED)
    placement = place(cfg)
    group = LearnerGroup(str(tiny_policy_dir), cfg, placement)
    try:
        _assert_close(_whole(group), single.full_state_dict(), 0.0)  # the same start
        for batch in batches:
            m1, m2 = single.train_step(batch), group.train_step(batch)
            for key in ("loss", "grad_norm", "mismatch_abs_logp", "entropy", "train_tokens", "policy_version"):
                assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-6), key
            _assert_close(_whole(group), single.full_state_dict(), 2e-6)
        assert m1["grad_norm"] > 0 and len(group.parameters_digests()) == 1

        held = ray.get([a.held_bytes.remote() for a in group.actors])
        whole = single.held_bytes()
        assert 0 <= whole["optimizer"] - 2 * whole["params"] < 200  # AdamW: two moments per parameter, step counters
        for part in ("params", "grads", "optimizer"):
            shares = [h[part] / whole[part] for h in held]
            assert all(0.45 < s < 0.55 for s in shares) and sum(shares) == pytest.approx(1.0, abs=1e-3), (part, shares)

        forward = ray.get([a.forward_int4_weights.remote() for a in group.actors])
        pushed = ray.get(group.get_weights())
        assert forward[1] == {} and len(forward[0]) == 4  # 2 layers x (gate_up_proj, down_proj), on rank 0
        for name, w in forward[0].items():
            assert w.ndim == 3 and isinstance(pushed[name], PackedInt4)
            assert torch.equal(w, pushed[name].dequantize(w.dtype)), name
    finally:
        group.kill()
        placement.remove()


@pytest.mark.slow  # two more pairs of learner actors (52 s on the loaded 2-core machine): over the default budget
@pytest.mark.usefixtures("ray_local")
def test_a_sharded_checkpoint_resumes_exactly(tmp_path: Path, tiny_policy_dir, make_cfg, batches) -> None:
    """Two updates, a checkpoint (each rank's optimizer shards in one directory), a third update; a new pair of
    learners loads the checkpoint and takes the third update: the same weights bit for bit, the same metrics."""
    cfg = make_cfg(*BASE, *SHARDED)
    placement = place(cfg)
    group = LearnerGroup(str(tiny_policy_dir), cfg, placement)
    try:
        for batch in batches[:2]:
            group.train_step(batch)
        group.save(str(tmp_path))
        assert sorted(p.name for p in (tmp_path / SHARDS_DIR).iterdir()) == [
            ".metadata",
            "__0_0.distcp",
            "__1_0.distcp",
        ]
        assert (tmp_path / "policy" / "config.json").is_file()
        uninterrupted, weights = group.train_step(batches[2]), _whole(group)
        group.kill()
        group = LearnerGroup(str(tiny_policy_dir), cfg, placement)
        assert group.load(str(tmp_path)) == 2
        resumed = group.train_step(batches[2])
        _assert_close(_whole(group), weights, 0.0)
        assert resumed == uninterrupted
    finally:
        group.kill()
        placement.remove()


@pytest.mark.slow  # a whole job (~20 s on an idle machine); the learner's part is pinned by the tests above
@pytest.mark.usefixtures("ray_local")
def test_a_job_with_sharded_learners_trains_end_to_end(tmp_path: Path, make_cfg) -> None:
    """`trainer.num_learners=2 trainer.sharding=fsdp` with QAT: two steps, rank 0's pushes reach the worker (its
    samples score as the learner scores them), a checkpoint with the optimizer shards."""
    cfg = make_cfg(
        f"reward.functions=[{{name: '{LENGTH_REWARD}'}}]",
        *SHARDED,
        "trainer.learner_cpus=0.5",
        "rollout.cpus_per_worker=0.5",
        "eval.enabled=false",
        "quant.enabled=true",
        "rollout.max_staleness=0",  # every sample from the weights just pushed: the mismatch is the sync's alone
    )
    train(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and [r["policy_version"] for r in rows] == [1.0, 2.0]
    assert all(r["num_samples"] == 8 and r["mismatch_abs_logp"] < 1e-4 for r in rows)
    step = tmp_path / "checkpoints" / "step_000002"
    assert (step / "policy").is_dir() and (step / SHARDS_DIR / ".metadata").is_file()


def test_sharding_settings_that_cannot_train_fail_at_config_time(make_cfg) -> None:
    with pytest.raises(ConfigError, match=r"trainer.sharding=fsdp .* needs trainer.num_learners >= 2 \(got 1\)"):
        make_cfg("trainer.sharding=fsdp")
    with pytest.raises(PreflightError) as err:
        preflight(make_cfg(*SHARDED, "trainer.lora.rank=4", "trainer.optimizer=muon"), resources=False)
    assert [p.key for p in err.value.problems] == ["trainer.sharding", "trainer.sharding"]
    assert "trainer.lora trains small adapters" in str(err.value) and "trainer.optimizer=muon" in str(err.value)
    with pytest.raises(PreflightError, match=r"routing_replay=record is not built for sharded learners"):
        preflight(make_cfg(*SHARDED, "algorithm.routing_replay=record"), resources=False)
    preflight(make_cfg(*SHARDED), resources=False)  # full-parameter AdamW shards
