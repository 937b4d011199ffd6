"""Scaling out: data-parallel learners (torch.distributed over gloo inside Ray actors), micro-batches by token
count, token-balanced shards, and placement of every role's resources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch

from rewards.scoring import RewardScorer
from rl.launch.placement import Bundle, PlacementError, check_fits, job_bundles, place
from rl.loop.controller import train
from rl.trainer.advantages import grpo
from rl.trainer.batch import TrainBatch
from rl.trainer.forward import Prompts, plan
from rl.trainer.learner import Learner
from rl.trainer.learner_group import LearnerGroup
from rollouts.worker import RolloutWorker
from tests.test_rl_step import LENGTH_REWARD, calculator_rows


def _batch(worker: RolloutWorker, cfg, rows: int, first_row: int = 0) -> TrainBatch:
    """A real batch: the tiny policy's rollouts, scored by a reward that varies with length, GRPO advantages."""
    scored = (
        RewardScorer(cfg.reward)
        .score(worker.generate(calculator_rows(first_row + rows)[first_row:], cfg.rollout.samples_per_prompt))
        .scored
    )
    rewards, groups = torch.tensor([s.reward for s in scored]), torch.tensor([s.trajectory.group_id for s in scored])
    assert rewards.std() > 0, "the test needs a learning signal"
    return TrainBatch.from_scored(scored, grpo(rewards, groups), worker.pad_token_id())


def test_shards_balance_tokens_and_keep_every_sequence_once() -> None:
    lengths = [40, 5, 5, 5, 5, 20, 10, 10]  # 100 tokens
    n = len(lengths)
    batch = TrainBatch(
        input_ids=torch.arange(n)[:, None].repeat(1, 40),
        attention_mask=torch.tensor([[1] * k + [0] * (40 - k) for k in lengths]),
        loss_mask=torch.zeros(n, 40),
        rollout_logprobs=torch.zeros(n, 40),
        advantages=torch.zeros(n, 40),
        policy_versions=torch.zeros(n, dtype=torch.long),
    )
    two = batch.shard(2)
    assert [s.input_ids[:, 0].tolist() for s in two] == [[0, 1, 2], [3, 4, 5, 6, 7]]  # 50 and 50 tokens
    three = batch.shard(3)
    assert sum(s.num_sequences for s in three) == n and torch.equal(
        torch.cat([s.input_ids for s in three]), batch.input_ids
    )
    assert [int(s.attention_mask.sum()) for s in three] == [40, 20, 40]  # cuts at the boundaries nearest 1/3 and 2/3
    assert [s.num_sequences for s in batch.select(slice(0, 2)).shard(4)] == [
        0,
        1,
        0,
        1,
    ]  # fewer sequences than shards: some empty


def test_token_capped_micro_batches_give_the_same_update(tiny_policy_dir, make_cfg) -> None:
    cfg = make_cfg(
        f"reward.functions=[{{name: '{LENGTH_REWARD}'}}]", "rollout.samples_per_prompt=4", "quant.enabled=true"
    )
    batch = _batch(RolloutWorker(str(tiny_policy_dir), cfg.worker_spec(), 0), cfg, 3)
    whole, capped = (
        Learner(str(tiny_policy_dir), cfg.learner_spec()),
        Learner(
            str(tiny_policy_dir),
            cfg.model_copy(
                update={"trainer": cfg.trainer.model_copy(update={"micro_batch_tokens": 100})}
            ).learner_spec(),
        ),
    )
    assert (
        len(plan(batch.attention_mask, 64, 100, Prompts.of(batch.input_ids, batch.attention_mask, batch.loss_mask > 0)))
        >= 3
    )
    a, b = whole.train_step(batch), capped.train_step(batch)
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-6) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    for (name, p), q in zip(whole.model.named_parameters(), capped.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


@pytest.mark.usefixtures("ray_local")
def test_two_learners_stay_identical_and_take_the_single_learner_step(tiny_policy_dir, make_cfg) -> None:
    """gloo inside two Ray actors, QAT on: after each of 3 steps both learners hold bit-identical parameters, equal
    (fp32 tolerance) to one learner given the whole batch; the metrics are the whole batch's."""
    base = [
        f"reward.functions=[{{name: '{LENGTH_REWARD}'}}]",
        "rollout.samples_per_prompt=4",
        "quant.enabled=true",
        "trainer.learner_cpus=0.25",
        "rollout.cpus_per_worker=0.25",
    ]
    one_cfg, two_cfg = make_cfg(*base), make_cfg(*base, "trainer.num_learners=2", "trainer.micro_batch_size=3")
    worker = RolloutWorker(str(tiny_policy_dir), one_cfg.worker_spec(), 0)
    batches = [_batch(worker, one_cfg, 3, first_row=3 * k) for k in range(3)]
    placements = [place(one_cfg), place(two_cfg)]
    one, two = (
        LearnerGroup(str(tiny_policy_dir), one_cfg, placements[0]),
        LearnerGroup(str(tiny_policy_dir), two_cfg, placements[1]),
    )
    try:
        for batch in batches:
            m1, m2 = one.train_step(batch), two.train_step(batch)
            digests = two.parameters_digests()
            assert len(digests) == 2 and digests[0] == digests[1]
            assert 0.5 <= m2["learner_shard_tokens_max_share"] < 0.75
            for key in (
                "loss",
                "grad_norm",
                "mismatch_abs_logp",
                "entropy",
                "train_tokens",
                "clip_fraction",
                "policy_version",
            ):
                assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-6), key
            w1, w2 = ray.get(one.actors[0].get_weights.remote()), ray.get(two.actors[1].get_weights.remote())
            dense = [k for k, v in w1.items() if isinstance(v, torch.Tensor)]
            assert len(dense) > 10 and max(float((w1[k] - w2[k]).abs().max()) for k in dense) < 1e-6
    finally:
        one.kill(), two.kill()
        for p in placements:
            p.remove()


@pytest.mark.usefixtures("ray_local")
def test_a_job_with_two_learners_and_two_workers_trains(tmp_path: Path, make_cfg) -> None:
    """Two data-parallel learners, two rollout workers, weights broadcast from learner rank 0 over gloo."""
    cfg = make_cfg(
        f"reward.functions=[{{name: '{LENGTH_REWARD}'}}]",
        "trainer.num_learners=2",
        "trainer.learner_cpus=0.5",
        "rollout.num_workers=2",
        "rollout.cpus_per_worker=0.5",
        "eval.enabled=false",
        "trainer.micro_batch_tokens=256",
        "cluster.weight_sync=collective",
        "quant.enabled=true",
        "rollout.max_staleness=0",  # every sample from the weights just pushed: the mismatch is the sync's alone
    )
    train(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and [r["policy_version"] for r in rows] == [1.0, 2.0]
    assert all(
        r["num_samples"] == 8 and r["learner_shard_tokens_max_share"] < 0.8 and r["worker_restarts"] == 0 for r in rows
    )
    assert all(r["mismatch_abs_logp"] < 1e-4 for r in rows)  # the workers run exactly the weights rank 0 broadcast
    assert (tmp_path / "checkpoints" / "step_000002" / "policy").is_dir()


def test_placement_names_the_setting_a_node_or_the_cluster_cannot_hold(make_cfg) -> None:
    nodes = [{"CPU": 2.0}, {"CPU": 2.0}]
    cfg = make_cfg("trainer.learner_cpus=3")
    with pytest.raises(
        PlacementError, match=r"learner actor needs 3 CPU \(trainer.learner_cpus/learner_gpus\) but no node"
    ):
        check_fits(job_bundles(cfg), nodes, {"CPU": 4.0})
    cfg = make_cfg("rollout.num_workers=4", "rollout.cpus_per_worker=1")  # 1 + 4 CPUs on a 4-CPU cluster
    with pytest.raises(
        PlacementError,
        match=r"needs 5 CPUs \(trainer.learner_cpus/learner_gpus 1 in all, rollout.cpus_per_worker/gpus_per_worker 4 "
        r"in all\)",
    ):
        check_fits(job_bundles(cfg), nodes, {"CPU": 4.0})
    gpu = make_cfg("trainer.learner_gpus=1")
    with pytest.raises(PlacementError, match="1 GPU"):
        check_fits(job_bundles(gpu), nodes, {"CPU": 4.0})
    bundles = job_bundles(make_cfg("trainer.num_learners=2", "rollout.num_workers=3", "rollout.gpus_per_worker=0.25"))
    assert [(b.role, b.index) for b in bundles] == [
        ("learner", 0),
        ("learner", 1),
        ("rollout", 0),
        ("rollout", 1),
        ("rollout", 2),
    ]
    assert bundles[2] == Bundle("rollout", 0, "rollout.cpus_per_worker/gpus_per_worker", {"CPU": 1.0, "GPU": 0.25})
    check_fits(bundles[:2], nodes, {"CPU": 4.0})


@pytest.mark.usefixtures("ray_local")
def test_a_job_the_local_cluster_cannot_hold_fails_before_starting(tmp_path: Path, make_cfg) -> None:
    with pytest.raises(PlacementError, match="trainer.learner_cpus"):
        train(make_cfg("trainer.learner_cpus=3", "eval.enabled=false"), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_flat_weight_buffer_round_trips_dense_and_int4_tensors(tiny_policy_dir, make_cfg) -> None:
    from rollouts.collective import buffer_size, flatten, unflatten
    from rollouts.quant import PackedInt4

    payload = Learner(str(tiny_policy_dir), make_cfg("quant.enabled=true").learner_spec()).get_weights()
    manifest, buffer = flatten(payload)
    assert buffer.dtype == torch.uint8 and buffer.numel() == buffer_size(manifest)
    back = unflatten(manifest, buffer)
    assert back.keys() == payload.keys() and any(isinstance(v, PackedInt4) for v in back.values())
    for name, v in payload.items():
        w = back[name]
        if isinstance(v, PackedInt4):
            assert (
                torch.equal(v.packed, w.packed)
                and torch.equal(v.scale, w.scale)
                and (v.shape, v.dtype, v.group_size) == (w.shape, w.dtype, w.group_size)
            )
        else:
            assert torch.equal(v, w) and v.dtype == w.dtype, name
    with pytest.raises(ValueError, match="bytes received"):
        unflatten(manifest, torch.cat([buffer, torch.zeros(4, dtype=torch.uint8)]))


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_collective_weight_sync_over_gloo_matches_the_object_store_path(tmp_path: Path, make_cfg) -> None:
    """`cluster.weight_sync=collective` (gloo here; NCCL between GPUs) gives the same job, step for step, as the
    object store, with the group formed once and reused across pushes."""
    common = [
        f"reward.functions=[{{name: '{LENGTH_REWARD}'}}]",
        "rollout.num_workers=2",
        "rollout.cpus_per_worker=0.5",
        "eval.enabled=false",
        "quant.enabled=true",
        "rollout.max_staleness=0",
    ]  # synchronous: every sample from the weights just pushed, so |Δ logp| is the sync's alone
    train(make_cfg(*common), tmp_path / "store")
    train(make_cfg(*common, "cluster.weight_sync=collective"), tmp_path / "collective")
    rows = {
        name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("store", "collective")
    }
    for a, b in zip(rows["store"], rows["collective"], strict=True):
        assert (a["reward_mean"], a["loss"], a["grad_norm"]) == (b["reward_mean"], b["loss"], b["grad_norm"])
        assert b["mismatch_abs_logp"] < 1e-4  # the workers run exactly what the learner trained


@pytest.mark.usefixtures("ray_local")
def test_a_policy_dir_missing_on_a_node_is_unpacked_from_the_object_store(tiny_policy_dir, tmp_path: Path) -> None:
    from rollouts.shipping import ShippedDir, open_dir, read_tree, ship_dir

    shipped = ship_dir(tiny_policy_dir, 2**30)
    assert shipped.files is not None and open_dir(shipped, tmp_path) == str(tiny_policy_dir)  # this node sees the path
    elsewhere = ShippedDir(
        "/nonexistent/policy", shipped.files, shipped.digest
    )  # as a node without the driver's disk sees it
    local = Path(open_dir(elsewhere, tmp_path / "cache"))
    assert local == tmp_path / "cache" / shipped.digest and read_tree(local) == read_tree(tiny_policy_dir)
    assert open_dir(elsewhere, tmp_path / "cache") == str(local)  # unpacked once per node
    with pytest.raises(FileNotFoundError, match="too big to ship"):
        open_dir(ShippedDir("/nonexistent/policy"), tmp_path / "cache")
    assert ship_dir(tiny_policy_dir, 10).files is None
