"""Faults, made real: rollout workers, reward models and learners are SIGKILLed mid-work (their processes found
by Ray's process titles among this session's Ray processes), and the job must go on with exact sample counts
and, after a learner restore, the same parameters as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from rewards.models import RewardModelPool, fetch_model_scores
from rl.loop.controller import train
from rl.trainer.learner import Learner
from rollouts.pool import RolloutPool
from rollouts.worker import RolloutWorkerActor
from tests.test_rewards import classifier_dir  # noqa: F401  (a fixture)
from tests.test_rl_step import LENGTH_REWARD, calculator_rows

pytestmark = pytest.mark.usefixtures("ray_local")


def actor_processes(title: str) -> list[psutil.Process]:
    """This session's Ray worker processes (descendants of the test process) whose title starts `ray::<title>`."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if cmd and cmd[0].startswith(f"ray::{title}"):
            found.append(p)
    return found


def kill_when(title: str, condition=lambda: True, timeout_s: float = 120.0) -> dict:
    """In a thread: once `condition()` holds and a process titled `ray::<title>` runs, SIGKILL it. The returned
    dict gets the killed `pid` (and `at`, the time)."""
    killed: dict = {}

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                procs = actor_processes(title)
                if procs:
                    os.kill(procs[0].pid, signal.SIGKILL)
                    killed.update(pid=procs[0].pid, at=time.monotonic())
                    return
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()
    return killed


def test_a_worker_killed_mid_step_is_replaced_and_its_groups_come_back_whole(tool_policy_dir, make_cfg) -> None:
    cfg = make_cfg(
        f"model.path={tool_policy_dir}", "rollout.max_new_tokens_per_turn=40", "rollout.samples_per_prompt=4"
    )
    pool = RolloutPool(
        lambda i: RolloutWorkerActor.options(num_cpus=0.5).remote(str(tool_policy_dir), cfg.worker_spec(), i),
        2,
        max_restarts=2,
    )
    pool.publish(
        Learner(str(tool_policy_dir), cfg.learner_spec()).get_weights(), 7
    )  # a restarted worker must get these, not its starting ones
    killed = kill_when("RolloutWorker.generate_step")
    trajectories = pool.generate_step(calculator_rows(8), 100, 4, iteration_budget=0)
    assert killed, "no worker was seen mid-step"
    assert pool.restarts == 1 and pool.in_flight == [{}, {}]
    groups = Counter(t.group_id for t in trajectories)
    assert len(trajectories) == 32 and groups == {gid: 4 for gid in range(100, 108)}  # none lost, none twice
    assert len({(t.group_id, t.sample_id) for t in trajectories}) == 32
    assert {t.policy_version for t in trajectories} == {7}
    assert not psutil.pid_exists(killed["pid"]) or psutil.Process(killed["pid"]).status() == psutil.STATUS_ZOMBIE
    assert len(pool.generate_step(calculator_rows(2), 200, 4, iteration_budget=0)) == 8  # the replacement keeps working
    pool.kill()


def test_a_worker_killed_with_two_steps_queued_regenerates_each_steps_groups_with_that_step(
    tool_policy_dir, make_cfg
) -> None:
    """The async pipeline's case: step B is queued behind step A on every worker when one dies inside A's call.
    Both of its calls are lost; each step must get back exactly its own groups (it once gave all of them to A)."""
    cfg = make_cfg(
        f"model.path={tool_policy_dir}", "rollout.max_new_tokens_per_turn=40", "rollout.samples_per_prompt=4"
    )
    pool = RolloutPool(
        lambda i: RolloutWorkerActor.options(num_cpus=0.5).remote(str(tool_policy_dir), cfg.worker_spec(), i),
        2,
        max_restarts=2,
    )
    pool.publish(Learner(str(tool_policy_dir), cfg.learner_spec()).get_weights(), 3)
    killed = kill_when("RolloutWorker.generate_step")
    a = pool.submit_step(calculator_rows(8), 100, 4, iteration_budget=0)
    b = pool.submit_step(calculator_rows(6), 200, 4, iteration_budget=0)
    step_a = pool.collect(a)
    assert killed and pool.restarts == 1, "the death must be met while collecting step A"
    step_b = pool.collect(b)
    assert Counter(t.group_id for t in step_a) == {gid: 4 for gid in range(100, 108)}
    assert Counter(t.group_id for t in step_b) == {gid: 4 for gid in range(200, 206)}
    assert pool.restarts == 1 and pool.in_flight == [{}, {}] and pool.outstanding == []
    assert {t.policy_version for t in step_a + step_b} == {3}
    pool.kill()


KILLING_ENV = '''
import os
import signal
from pathlib import Path

from envs.calculator import CalculatorEnv

COUNTER, KILL_AT = Path({counter!r}), {kill_at}


class KillsItsWorkerOnce(CalculatorEnv):
    """The {kill_at}th reset anywhere SIGKILLs the rollout worker process it runs in."""

    async def reset(self, row):
        with COUNTER.open("a") as f:
            f.write(".")
        if COUNTER.stat().st_size == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        return await super().reset(row)
'''


def test_a_job_whose_rollout_worker_dies_mid_step_completes_with_exact_counts(tmp_path: Path, make_cfg) -> None:
    env = tmp_path / "killing_env.py"
    env.write_text(KILLING_ENV.format(counter=str(tmp_path / "resets"), kill_at=8 + 5))  # the 5th reset of step 2
    cfg = make_cfg(
        f"env.name={env}:KillsItsWorkerOnce",
        "rollout.num_workers=2",
        "rollout.cpus_per_worker=0.5",
        "trainer.steps=3",
        "eval.enabled=false",
    )
    train(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # async (staleness 1): step 2's rollouts run while step 1 trains, and the weight push does not wait for the
    # workers, so the death is met by the next call that needs the worker: step 2's collect, which restarts it and
    # regenerates step 2's and step 3's groups (each with its own step; counted at step 2), or step 1's collect
    # when the kill came before step 1's result left the worker (counted at step 1)
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["worker_restarts"] for r in rows] in (
        [1.0, 1.0, 1.0],
        [0.0, 1.0, 1.0],
    )
    assert all(r["num_samples"] == 8 and r["failed_samples"] == 0 for r in rows)
    step2 = [
        json.loads(line) for line in (tmp_path / "run" / "trajectories" / "step_000002.jsonl").read_text().splitlines()
    ]
    assert Counter(s["group_id"] for s in step2) == {gid: 2 for gid in range(4, 8)}


def test_a_reward_model_killed_before_scoring_is_restarted_and_scores_the_same(
    classifier_dir,  # noqa: F811  (the fixture imported from test_rewards)
    tiny_policy_dir,
    make_cfg,
) -> None:
    from rollouts.worker import RolloutWorker

    cfg = make_cfg(f"reward.models=[{{name: rm, kind: classifier, path: '{classifier_dir}', num_cpus: 0.5}}]")
    trajectories = RolloutWorker(str(tiny_policy_dir), cfg.worker_spec(), 0).generate(calculator_rows(3), 2)
    models = RewardModelPool(cfg.reward.models)
    fetch_model_scores(trajectories, models, score_in_workers=False)
    expected = [t.model_scores["rm"] for t in trajectories]
    assert all(isinstance(s, float) for s in expected)
    (proc,) = actor_processes("RewardModel")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    fetch_model_scores(trajectories, models, score_in_workers=False)
    assert models.restarts == 1 and [t.model_scores["rm"] for t in trajectories] == pytest.approx(expected, abs=1e-6)
    models.kill()


def _optimizer_tensors(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a (nested) optimizer state dict, by its path."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            out[f"{prefix}{key}"] = value
        elif isinstance(value, dict):
            out |= _optimizer_tensors(value, f"{prefix}{key}/")
    return out


def _final_state(run: Path, step: int) -> tuple[dict, dict, dict]:
    ckpt = run / "checkpoints" / f"step_{step:06d}"
    learner = torch.load(ckpt / "learner_state.pt", weights_only=False)
    return (
        load_file(ckpt / "policy" / "model.safetensors"),
        _optimizer_tensors(learner["optimizer"]),
        json.loads((ckpt / "controller_state.json").read_text()),
    )


def test_a_learner_killed_mid_update_is_restored_from_the_last_checkpoint(tmp_path: Path, make_cfg) -> None:
    cfg = make_cfg(
        f"reward.functions=[{{name: '{LENGTH_REWARD}'}}]",
        "trainer.steps=4",
        "trainer.checkpoint_every=2",
        "eval.enabled=false",
    )
    train(cfg, tmp_path / "straight")
    metrics = tmp_path / "killed" / "metrics.jsonl"
    killed = kill_when("Learner.train_step", lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2)
    train(cfg, tmp_path / "killed")
    assert killed, "the learner was never seen updating after step 2"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1][
        "learner_restarts"
    ] == 1.0  # steps after the checkpoint logged once
    (pa, oa, ca), (pb, ob, cb) = _final_state(tmp_path / "straight", 4), _final_state(tmp_path / "killed", 4)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert (
        len(oa) > 10 and oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)
    )  # AdamW moments and steps
    assert ca == cb and ca["data_cursor"]["position"] == 16
