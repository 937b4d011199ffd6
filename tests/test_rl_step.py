"""One RL step through real parts: rollouts from the tiny policy, rewards, GRPO, the learner, Ray actors."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from envs.base import PromptRow
from rewards.scoring import RewardScorer
from rl.loop.controller import train
from rl.loop.data import to_prompt_row
from rl.loop.failures import JobFailed
from rl.tasks.calculator import make_rows as make_calculator_rows
from rl.trainer.advantages import grpo
from rl.trainer.batch import TrainBatch
from rl.trainer.learner import Learner
from rl.trainer.losses import token_band_mask
from rollouts.worker import RolloutWorker

IN_PROCESS = "cluster.backend=in_process"  # the loop without Ray: tests of its logic (rollouts.backend)
LENGTH_REWARD = str(Path(__file__).parent / "data" / "length_reward.py") + ":compute_score"


def calculator_rows(n: int) -> list[PromptRow]:
    return [to_prompt_row(i, row) for i, row in enumerate(make_calculator_rows(n, seed=1, split="train"))]


def test_learner_step_changes_every_parameter_that_got_a_gradient(tiny_policy_dir, make_cfg) -> None:
    cfg = make_cfg(f"reward.functions=[{{name: '{LENGTH_REWARD}'}}]", "rollout.samples_per_prompt=4")
    worker, learner = (
        RolloutWorker(str(tiny_policy_dir), cfg.worker_spec(), 0),
        Learner(str(tiny_policy_dir), cfg.learner_spec()),
    )
    trajectories = worker.generate(calculator_rows(4), cfg.rollout.samples_per_prompt)
    scored = RewardScorer(cfg.reward).score(trajectories).scored
    rewards = torch.tensor([s.reward for s in scored])
    assert rewards.std() > 0, "the test needs a learning signal"
    advantages = grpo(rewards, torch.tensor([s.trajectory.group_id for s in scored]))
    batch = TrainBatch.from_scored(scored, advantages, worker.renderer.pad_token_id)

    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    got_grad: set[str] = set()
    for name, param in learner.model.named_parameters():
        param.register_post_accumulate_grad_hook(
            lambda p, name=name: got_grad.add(name) if p.grad.abs().sum() > 0 else None
        )
    metrics = learner.train_step(batch)

    assert learner.version == 1 and metrics["policy_version"] == 1.0
    assert metrics["mismatch_abs_logp"] < 1e-4  # same weights on both sides
    assert len(got_grad) > 0.5 * len(before)
    for name, param in learner.model.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        assert changed == (name in got_grad), name
    assert torch.isfinite(torch.tensor(metrics["loss"])) and metrics["grad_norm"] > 0


def test_bf16_compute_keeps_fp32_master_weights_and_the_fp32_update(tiny_policy_dir, make_cfg) -> None:
    """`trainer.compute_dtype=bfloat16`: the forward and backward run under autocast (the learner's logprobs move
    off the fp32 rollout engine's by bf16 rounding), the weights and gradients stay fp32, and the
    update points where the fp32 learner's does."""
    cfg = make_cfg(f"reward.functions=[{{name: '{LENGTH_REWARD}'}}]", "rollout.samples_per_prompt=4")
    worker = RolloutWorker(str(tiny_policy_dir), cfg.worker_spec(), 0)
    scored = RewardScorer(cfg.reward).score(worker.generate(calculator_rows(4), 4)).scored
    rewards = torch.tensor([s.reward for s in scored])
    advantages = grpo(rewards, torch.tensor([s.trajectory.group_id for s in scored]))
    batch = TrainBatch.from_scored(scored, advantages, worker.renderer.pad_token_id)
    deltas, mismatch = {}, {}
    for dtype in ("float32", "bfloat16"):
        learner = Learner(str(tiny_policy_dir), make_cfg(f"trainer.compute_dtype={dtype}").learner_spec())
        before = torch.cat([p.detach().flatten().clone() for p in learner.model.parameters()])
        mismatch[dtype] = learner.train_step(batch)["mismatch_abs_logp"]
        params = list(learner.model.parameters())
        assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32) for p in params)
        deltas[dtype] = torch.cat([p.detach().flatten() for p in params]) - before
    assert mismatch["float32"] < 1e-5 < mismatch["bfloat16"] < 5e-2
    cosine = torch.nn.functional.cosine_similarity(deltas["float32"], deltas["bfloat16"], dim=0)
    print(f"mismatch {mismatch}, update cosine {cosine:.3f}")
    assert cosine > 0.8


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _policy(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "policy" / "model.safetensors")


@pytest.mark.usefixtures("ray_local")
def test_job_end_to_end_on_ray_equals_in_process_and_resume_is_exact(tmp_path: Path, make_cfg) -> None:
    overrides = [
        f"reward.functions=[{{name: '{LENGTH_REWARD}'}}, {{name: calculator, weight: 0.5}}]",
        "trainer.checkpoint_every=1",
        "trainer.keep_checkpoints=5",
    ]
    straight = tmp_path / "straight"
    evals = train(make_cfg(*overrides, "trainer.steps=3"), straight)

    rows = _metrics(straight)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["policy_version"] for r in rows] == [1.0, 2.0, 3.0]
    assert rows[0]["mismatch_abs_logp"] < 1e-4
    # wall_time: when each step was logged; the gap between two rows is at least the later step's own time
    assert all(b["wall_time"] - a["wall_time"] >= 0.9 * b["time_step_s"] > 0 for a, b in itertools.pairwise(rows))
    for key in [
        "reward_mean",
        "accuracy",
        "response_length",
        "tool_calls_per_sample",
        "loss",
        "grad_norm",
        "mismatch_kl",
        "time_generate_s",
        "time_update_s",
        "time_sync_s",
        "reward/calculator",
    ]:
        assert key in rows[0], key
    assert rows[0]["num_samples"] == 4 * 2
    assert set(evals) == {"before", "after"} and 0.0 <= evals["after"]["accuracy"] <= 1.0
    assert json.loads((straight / "eval.json").read_text())["before"]["num_prompts"] == 8
    assert list((straight / "tensorboard").glob("events.out.tfevents.*"))
    assert "samples_per_prompt: 2" in (straight / "config.yaml").read_text()
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step_000001", "step_000002", "step_000003"]
    assert any(
        not torch.equal(a, b)
        for a, b in zip(
            _policy(straight / "checkpoints/step_000001").values(),
            _policy(straight / "checkpoints/step_000003").values(),
            strict=True,
        )
    )

    # the same job without Ray (the in-process rollout backend and learner) is the same job, value for value: what
    # lets the tests of the loop's logic below run in process
    in_process = tmp_path / "in-process"
    assert train(make_cfg(*overrides, "trainer.steps=3", IN_PROCESS), in_process) == evals
    timeless = lambda r: {k: v for k, v in r.items() if not (k.startswith("time_") or k == "wall_time")}  # noqa: E731
    assert [timeless(r) for r in _metrics(in_process)] == [timeless(r) for r in rows]

    # stop after 2 steps, then resume to 3: same parameters and data cursor as the uninterrupted run. A run that
    # ended started nothing ahead, so extending it is exact for the synchronous loop (an interrupted async run
    # resumes exactly too: tests/test_cluster_jobs.py kills the driver mid-checkpoint)
    sync = [*overrides, "eval.enabled=false", "rollout.max_staleness=0", IN_PROCESS]
    straight = tmp_path / "straight-sync"
    train(make_cfg(*sync, "trainer.steps=3"), straight)
    resumed = tmp_path / "resumed"
    train(make_cfg(*sync, "trainer.steps=2"), resumed)
    train(make_cfg(*sync, "trainer.steps=3"), resumed, resume=True)
    assert [r["step"] for r in _metrics(resumed)] == [1, 2, 3]
    a, b = _policy(straight / "checkpoints/step_000003"), _policy(resumed / "checkpoints/step_000003")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = lambda d: json.loads((d / "checkpoints/step_000003/controller_state.json").read_text())  # noqa: E731
    assert state(straight) == state(resumed) and state(straight)["data_cursor"] == {
        "epoch": 0,
        "position": 12,
        "draws": 0,
        "success": {},
    }
    assert _metrics(straight)[2]["reward_mean"] == _metrics(resumed)[2]["reward_mean"]


def test_a_step_whose_samples_all_fail_is_skipped_not_fatal(tmp_path: Path, make_cfg) -> None:
    raising = str(Path(__file__).parent / "data" / "raising_reward.py") + ":compute_score"
    with pytest.raises(JobFailed, match="every one of the 2 RL steps failed"):  # it runs to its end, then says so
        train(
            make_cfg(IN_PROCESS, f"reward.functions=[{{name: '{raising}'}}]", "trainer.steps=2", "eval.enabled=false"),
            tmp_path,
        )
    rows = _metrics(tmp_path)
    assert [(r["step"], r["failed_samples"], r["skipped_step"]) for r in rows] == [(1, 8.0, 1.0), (2, 8.0, 1.0)]
    assert json.loads((tmp_path / "checkpoints" / "step_000002" / "controller_state.json").read_text())["step"] == 2


def test_python_math_job_with_partial_rollouts_trains_groups_once_they_finish(tmp_path: Path, make_cfg) -> None:
    """The python tool and the math task through a real job, with a per-step budget smaller than a sample: the
    first step only pauses (nothing to train), the next ones train the groups that finished."""
    if not Path("/usr/bin/bwrap").exists():
        pytest.skip("bubblewrap is not installed (make setup installs it)")
    train(
        make_cfg(
            IN_PROCESS,
            "data.task=python_math",
            "env.name=python",
            "reward.functions=[{name: numeric_answer}]",
            "rollout.partial_rollout_budget=8",
            "trainer.steps=3",
            "eval.enabled=false",
            "rollout.repeat_window=0",
        ),
        tmp_path,
    )
    rows = _metrics(tmp_path)
    assert rows[0]["skipped_step"] == 1.0 and rows[0]["failed_samples"] == 0.0 and 6 <= rows[0]["paused_samples"] <= 8
    trained = [r for r in rows[1:] if "loss" in r]
    assert trained and all(r["num_samples"] % 2 == 0 and r["num_samples"] >= 2 for r in trained)
    assert rows[-1]["policy_version"] == len(trained)
    for r in trained:  # updates between each trained sample's oldest weights and the update that trains it
        samples = [
            json.loads(line)
            for line in (tmp_path / "trajectories" / f"step_{r['step']:06d}.jsonl").read_text().splitlines()
        ]
        lags = [r["policy_version"] - 1 - min(s["policy_versions"]) for s in samples]
        assert r["policy_lag_mean"] == pytest.approx(sum(lags) / len(lags))
    data = (tmp_path / "data").glob("python_math-train-*.jsonl")
    assert "tiderl/python_math" in next(data).read_text()


def test_dynamic_sampling_drops_groups_without_signal_and_refills(tmp_path: Path, make_cfg) -> None:
    """The untrained policy never answers right: every group's rewards are all 0, so DAPO's dynamic sampling drops
    each group and draws new prompts, round after round, then skips the step; with a varying reward it keeps them."""
    common = [
        "algorithm.dynamic_sampling=true",
        "algorithm.dynamic_sampling_max_rounds=2",
        "trainer.steps=1",
        "eval.enabled=false",
    ]
    train(make_cfg(IN_PROCESS, *common), tmp_path / "flat")
    (row,) = _metrics(tmp_path / "flat")
    assert (row["dropped_groups"], row["sampling_rounds"], row["skipped_step"]) == (12.0, 3.0, 1.0)
    cursor = json.loads((tmp_path / "flat" / "checkpoints/step_000001/controller_state.json").read_text())[
        "data_cursor"
    ]
    assert cursor["position"] == 12  # 3 rounds x 4 prompts drawn
    train(make_cfg(IN_PROCESS, *common, f"reward.functions=[{{name: '{LENGTH_REWARD}'}}]"), tmp_path / "varied")
    (row,) = _metrics(tmp_path / "varied")
    assert row["num_samples"] == 8 and "loss" in row  # 4 groups with signal, refilled if any was dropped


def test_learner_with_kl_and_corrections_reports_them(tiny_policy_dir, make_cfg) -> None:
    cfg = make_cfg(
        "algorithm.kl_coef=0.1",
        "algorithm.rollout_correction=tis",
        "algorithm.token_mask=[-0.01, 0.01]",
        "algorithm.entropy_coef=0.01",
        "algorithm.loss=cispo",
        f"reward.functions=[{{name: '{LENGTH_REWARD}'}}]",
    )
    worker, learner = (
        RolloutWorker(str(tiny_policy_dir), cfg.worker_spec(), 0),
        Learner(str(tiny_policy_dir), cfg.learner_spec()),
    )
    scored = RewardScorer(cfg.reward).score(worker.generate(calculator_rows(4), 2)).scored
    rewards, groups = torch.tensor([s.reward for s in scored]), torch.tensor([s.trajectory.group_id for s in scored])
    batch = TrainBatch.from_scored(scored, grpo(rewards, groups), pad_token_id=worker.pad_token_id())
    first = learner.train_step(batch)
    assert first["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)  # the learner starts at the reference
    assert first["rollout_is_weight_mean"] == pytest.approx(1.0, abs=1e-3) and first["token_mask_fraction"] == 0.0
    with torch.no_grad():  # the tokens whose log(pi/pi_rollout) left the band after one update: the ones masked next
        logp, _ = learner.sequence_logprobs(batch.input_ids, batch.attention_mask)
    outside = float(
        (batch.loss_mask - token_band_mask(logp, batch.rollout_logprobs, batch.loss_mask, (-0.01, 0.01))).sum()
    )
    second = learner.train_step(batch)
    assert second["kl_to_reference"] > 0 and outside > 0
    assert second["token_mask_fraction"] == pytest.approx(outside / float(batch.loss_mask.sum()))


def test_ptx_loss_lowers_the_nll_of_its_examples(tiny_policy_dir, make_cfg, tmp_path: Path) -> None:
    ptx = tmp_path / "ptx.jsonl"
    ptx.write_text(
        "\n".join(
            json.dumps(x)
            for x in [
                {
                    "messages": [
                        {"role": "user", "content": "Compute 2*3."},
                        {"role": "assistant", "content": "<think>easy</think>The answer is 6."},
                    ]
                },
                {"text": "The answer is 42."},
            ]
        )
        + "\n"
    )
    cfg = make_cfg(
        "algorithm.ptx_coef=1.0",
        f"algorithm.ptx_files=[{ptx}]",
        "algorithm.ptx_batch_size=4",
        "trainer.lr=1e-2",
        "reward.functions=[{name: calculator}]",
    )
    worker, learner = (
        RolloutWorker(str(tiny_policy_dir), cfg.worker_spec(), 0),
        Learner(str(tiny_policy_dir), cfg.learner_spec()),
    )
    _ids, mask = learner.ptx.examples[0]
    assert 0 < sum(mask) < len(mask)  # only the assistant turn is trained on in a chat example
    scored = RewardScorer(cfg.reward).score(worker.generate(calculator_rows(2), 2)).scored
    batch = TrainBatch.from_scored(scored, torch.zeros(len(scored)), pad_token_id=worker.pad_token_id())  # no RL signal
    losses = [learner.train_step(batch)["ptx_loss"] for _ in range(6)]
    assert losses[-1] < 0.8 * losses[0]
    with pytest.raises(FileNotFoundError, match="algorithm.ptx_files"):
        Learner(
            str(tiny_policy_dir),
            make_cfg("algorithm.ptx_coef=1.0", f"algorithm.ptx_files=[{tmp_path / 'nope.jsonl'}]").learner_spec(),
        )


def test_temperature_schedule_reaches_rollouts_and_learner(tmp_path: Path, make_cfg) -> None:
    train(
        make_cfg(
            IN_PROCESS,
            "rollout.temperature_final=0.5",
            "rollout.temperature_decay_steps=2",
            "trainer.steps=3",
            "eval.enabled=false",
        ),
        tmp_path,
    )
    rows = _metrics(tmp_path)
    assert [r["temperature"] for r in rows] == [1.0, 0.75, 0.5]
    # the learner scores each batch at its own temperature: rollout and learner logprobs still agree
    assert all(r["mismatch_abs_logp"] < 1e-4 for r in rows)


def test_kl_in_the_reward_penalizes_drift_from_the_reference(tmp_path: Path, make_cfg) -> None:
    train(
        make_cfg(
            IN_PROCESS,
            "algorithm.kl_coef=0.5",
            "algorithm.kl_in=reward",
            f"reward.functions=[{{name: '{LENGTH_REWARD}'}}]",
            "trainer.lr=5e-3",
            "trainer.steps=3",
            "eval.enabled=false",
        ),
        tmp_path,
    )
    rows = _metrics(tmp_path)
    assert abs(rows[0]["kl_reward_penalty"]) < 1e-4  # step 1 samples come from the reference itself
    assert (
        abs(rows[2]["kl_reward_penalty"]) > 1e-3 and "kl_to_reference" not in rows[0]
    )  # k1 per sample can be negative
