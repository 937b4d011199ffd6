"""Delta weight sync (`rollouts.delta`, `cluster.weight_sync_delta`): a delta push reconstructs the full push bit for
bit across real optimizer steps, a version gap gets a full push, a restarted worker resyncs, and a job with deltas
gives the same run as one with full pushes while sending fewer bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch

from rewards.scoring import RewardScorer
from rl.trainer.advantages import grpo
from rl.trainer.batch import TrainBatch
from rl.trainer.learner import Learner
from rollouts.backend import InProcessBackend
from rollouts.collective import flatten, unflatten
from rollouts.delta import DeltaSender, IndexCode, WeightDelta, apply_delta, diff, owned_copy, payload_digest
from rollouts.pool import RolloutPool
from rollouts.quant import PackedInt4, QuantSpec
from rollouts.worker import RolloutWorker, RolloutWorkerActor
from tests.test_rl_step import LENGTH_REWARD, calculator_rows

QUANT = (f"reward.functions=[{{name: '{LENGTH_REWARD}'}}]", "quant.enabled=true", "rollout.samples_per_prompt=4")


def _train_once(learner: Learner, worker: RolloutWorker, cfg) -> None:
    """One real update (AdamW on a GRPO loss) on the worker's samples."""
    trajectories = worker.generate(calculator_rows(4), cfg.rollout.samples_per_prompt)
    scored = RewardScorer(cfg.reward).score(trajectories).scored
    rewards = torch.tensor([s.reward for s in scored])
    advantages = grpo(rewards, torch.tensor([s.trajectory.group_id for s in scored]))
    learner.train_step(TrainBatch.from_scored(scored, advantages, worker.renderer.pad_token_id))


def test_index_code_picks_the_smaller_encoding_and_round_trips() -> None:
    sparse = torch.zeros(10_000, dtype=torch.bool)
    sparse[[3, 700, 701, 9_999]] = True  # gaps up to 9298: int16
    dense = torch.rand(10_000, generator=torch.Generator().manual_seed(0)) < 0.5
    for mask, kind, nbytes in ((sparse, "gaps", 8), (dense, "bitmap", 1250)):
        code = IndexCode.encode(mask)
        assert (code.kind, code.nbytes) == (kind, nbytes)
        assert torch.equal(code.indices(), mask.nonzero()[:, 0])
    assert IndexCode.encode(torch.zeros(5, dtype=torch.bool)).indices().numel() == 0


def test_diff_and_apply_cover_odd_shapes_bit_for_bit() -> None:
    """Groups of a [2, 8, 64] expert tensor and of a [5, 40] one (40 inputs: not whole groups, so by rows), rows of
    a matrix, a vector, a scalar; -0.0 against 0.0 counts as a change (bits, not values)."""
    g = torch.Generator().manual_seed(0)
    spec = QuantSpec()
    weights = {
        "experts": torch.randn(2, 8, 64, generator=g),
        "odd": torch.randn(5, 40, generator=g),
        "matrix": torch.randn(6, 3, generator=g),
        "vector": torch.zeros(4),
        "scalar": torch.tensor(1.5),
    }
    old = {k: PackedInt4.from_weight(v, spec) if k in ("experts", "odd") else v.clone() for k, v in weights.items()}
    moved = {k: v.clone() for k, v in weights.items()}
    moved["experts"][1, 3, 40] += 1.0  # one group of 32 inputs (its code and maybe its scale)
    moved["odd"][4, 0] += 1.0
    moved["matrix"][2, 1] += 1e-7
    moved["vector"][2] = -0.0
    new = {k: PackedInt4.from_weight(v, spec) if k in ("experts", "odd") else v.clone() for k, v in moved.items()}

    delta = diff(old, new, "a", "b", dense_by="row")
    assert delta.int4_groups == 2 * 8 * 2 + 5 and delta.int4_groups_changed == 2
    assert delta.int4["experts"].index.indices().tolist() == [(1 * 8 + 3) * 2 + 1]
    assert delta.int4["odd"].words.shape == (1, 5) and delta.int4["odd"].scales.shape == (1, 2)
    assert sorted(delta.dense) == ["matrix", "vector"] and delta.dense["matrix"].index.indices().tolist() == [2]
    held_int4 = {k: owned_copy(v) for k, v in old.items() if isinstance(v, PackedInt4)}
    held_dense = {k: v.clone() for k, v in old.items() if isinstance(v, torch.Tensor)}
    apply_delta(delta, held_int4, held_dense)
    assert payload_digest({**held_int4, **held_dense}) == payload_digest(new)
    assert diff(old, new, "a", "b", dense_by="tensor").dense["matrix"].rows.shape == (1, 18)
    with pytest.raises(ValueError, match="different tensors"):
        diff(old, {k: v for k, v in new.items() if k != "scalar"}, "a", "b")


def test_delta_pushes_reconstruct_full_pushes_bit_for_bit_over_real_steps(tiny_policy_dir, make_cfg) -> None:
    """Two workers follow one learner over three AdamW steps: one gets every push whole, the other deltas (one
    through the collective's flat buffer). Same bytes, same INT4 kernels, same greedy samples."""
    cfg = make_cfg(*QUANT)
    learner = Learner(str(tiny_policy_dir), cfg.learner_spec())
    full_worker, delta_worker = (RolloutWorker(str(tiny_policy_dir), cfg.worker_spec(), i) for i in range(2))
    info, update, _ = learner.weight_update(None, delta=True)
    for worker in (full_worker, delta_worker):
        worker.load_weights(update, learner.version, info.sync_id)
    for step in range(3):
        _train_once(learner, full_worker, cfg)
        info, update, full = learner.weight_update(delta_worker.sync_id, delta=True)
        assert isinstance(update, WeightDelta) and info.base_id == delta_worker.sync_id and full is not None
        if step == 1:
            update = unflatten(*flatten(update))  # as cluster.weight_sync=collective carries it
        delta_worker.load_weights(update, learner.version, info.sync_id)
        full_worker.load_weights(full, learner.version, info.sync_id)
        assert delta_worker.weights_digest() == full_worker.weights_digest() == payload_digest(learner.get_weights())
        assert 0 < info.int4_groups_changed < info.int4_groups and info.nbytes < info.full_nbytes
    assert delta_worker.weight_sync_state() == {"version": 3, "sync_id": info.sync_id, "full": 1, "delta": 3}
    rows = calculator_rows(4)
    a, b = (w.generate(rows, 1, greedy=True) for w in (full_worker, delta_worker))
    assert all(torch.equal(x.token_ids, y.token_ids) and torch.equal(x.logprobs, y.logprobs) for x, y in zip(a, b))


def test_a_version_gap_gets_a_full_push(tiny_policy_dir, make_cfg) -> None:
    """A worker that missed a push gets the full payload while the others get the delta; a delta against a push a
    worker does not hold is refused; a sender without the base (a restarted learner) pushes whole."""
    cfg = make_cfg(*QUANT)
    learner = Learner(str(tiny_policy_dir), cfg.learner_spec())
    backend = InProcessBackend(str(tiny_policy_dir), cfg.worker_spec(), 2)
    info, update, full = learner.weight_update(backend.delta_base(), delta=True)
    assert info.base_id is None and full is None and backend.publish(update, 0, info, full) == 0
    _train_once(learner, backend.workers[0], cfg)
    info, update, full = learner.weight_update(backend.delta_base(), delta=True)
    backend.workers[0].load_weights(update, 1, info.sync_id)  # worker 1 misses push 1
    _train_once(learner, backend.workers[0], cfg)
    stale = backend.workers[1].sync_id
    info, update, full = learner.weight_update(backend.workers[0].sync_id, delta=True)
    with pytest.raises(ValueError, match="the sender must push the full weights"):
        backend.workers[1].load_weights(update, 2, info.sync_id)
    assert backend.workers[1].sync_id == stale
    assert backend.publish(update, 2, info, full) == 1
    assert [w.weight_sync_state()["full"] for w in backend.workers] == [1, 2]
    assert backend.workers[0].weights_digest() == backend.workers[1].weights_digest()

    restarted = DeltaSender()  # a new learner (restored from a checkpoint) has no last push
    info, update, _ = restarted.push(learner.get_weights(), 2, backend.delta_base(), delta=True)
    assert info.base_id is None and not isinstance(update, WeightDelta)
    assert info.metrics() == {"sync_bytes": info.full_nbytes, "sync_full_bytes": info.full_nbytes, "sync_delta": 0.0}


@pytest.mark.usefixtures("ray_local")
def test_a_restarted_worker_resyncs_from_the_last_full_payload(tiny_policy_dir, make_cfg) -> None:
    cfg = make_cfg(*QUANT)
    learner = Learner(str(tiny_policy_dir), cfg.learner_spec())
    driver_worker = RolloutWorker(str(tiny_policy_dir), cfg.worker_spec(), 0)  # makes the training batches
    pool = RolloutPool(
        lambda i: RolloutWorkerActor.options(num_cpus=0.5).remote(str(tiny_policy_dir), cfg.worker_spec(), i), 1
    )
    info, update, full = learner.weight_update(pool.delta_base(), delta=True)
    pool.publish(update, 0, info, full)
    for version in (1, 2):
        _train_once(learner, driver_worker, cfg)
        info, update, full = learner.weight_update(pool.delta_base(), delta=True)
        assert info.base_id is not None and pool.publish(update, version, info, full) == 0
    ray.kill(pool.workers[0])
    assert len(pool.generate(calculator_rows(2), 1)) == 2  # meets the death, restarts it with push 2's full payload
    assert pool.restarts == 1 and pool.delta_base() == info.sync_id
    _train_once(learner, driver_worker, cfg)
    info, update, full = learner.weight_update(pool.delta_base(), delta=True)
    assert info.base_id is not None and pool.publish(update, 3, info, full) == 0
    state = ray.get(pool.workers[0].weight_sync_state.remote())
    assert (state["full"], state["delta"], state["version"]) == (1, 1, 3)
    assert ray.get(pool.workers[0].weights_digest.remote()) == payload_digest(learner.get_weights())
    pool.kill()


def test_a_job_with_delta_sync_matches_full_pushes_and_reports_bytes(tmp_path: Path, make_cfg) -> None:
    """The same tiny job (INT4 rollouts, QAT; in process, where it is deterministic given its seed) with deltas and
    with full pushes: the same rewards and losses step for step, fewer bytes per push with deltas."""
    common = (*QUANT, "eval.enabled=false", "trainer.steps=3", "cluster.backend=in_process")
    from rl.loop.controller import train

    train(make_cfg(*common), tmp_path / "delta")
    train(make_cfg(*common, "cluster.weight_sync_delta=false"), tmp_path / "full")
    rows = {
        name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("delta", "full")
    }
    for a, b in zip(rows["delta"], rows["full"], strict=True):
        assert (a["reward_mean"], a["loss"], a["grad_norm"], a["mismatch_abs_logp"]) == (
            b["reward_mean"],
            b["loss"],
            b["grad_norm"],
            b["mismatch_abs_logp"],
        )
        assert a["sync_delta"] == 1.0 and a["sync_full_fallbacks"] == 0.0 and b["sync_delta"] == 0.0
        assert a["sync_full_bytes"] == b["sync_full_bytes"] == b["sync_bytes"] > a["sync_bytes"]
        assert 0 < a["sync_int4_groups_changed"] < 1
    assert json.loads((tmp_path / "delta" / "weight_sync.json").read_text())["delta"] is True
