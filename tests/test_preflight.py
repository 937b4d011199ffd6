"""What a config refers to is checked before Ray starts (`rl.launch.preflight`): each class of mistake fails
`tiderl train` (and `config`, `submit`) in under 5 s with exit 2, a message naming the key, the value and what to
do, no traceback, no Ray process, no run directory. The cluster's side of `tiderl submit` (its nodes, its python)
is tested against a real cluster in test_cluster_jobs.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rl.config import load_config
from rl.launch.preflight import GROUP_BASELINE_ADVANTAGES, PreflightError, preflight

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "calculator.yaml")


def refused(cwd: Path, *overrides: str, command: str = "train", extra: tuple[str, ...] = ()) -> str:
    """Run `tiderl <command> configs/calculator.yaml <overrides>` in `cwd`; assert it is refused the way every
    preflight failure must be, and return its stderr. Ray was not started: a Ray instance writes its session under
    RAY_TMPDIR (counting Ray processes instead would race with other jobs on a shared machine)."""
    ray_tmp = cwd / "ray-tmp"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "rl.launch.cli", command, CONFIG, *overrides, *extra],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "RAY_TMPDIR": str(ray_tmp)},
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert "the job cannot start" in proc.stderr and "nothing was started" in proc.stderr, proc.stderr
    assert elapsed < 5.0, f"{elapsed:.1f} s"
    assert not ray_tmp.exists()
    assert not (cwd / "runs").exists()
    return " ".join(proc.stderr.split())  # the terminal wraps long lines


def test_unknown_names_of_every_kind(tmp_path: Path) -> None:
    err = refused(
        tmp_path,
        "env.name=calculatr",
        "reward.functions=[{name: mathh}]",
        "algorithm.advantage=grpoo",
        "algorithm.loss=ppo_clipp",
    )
    assert "env.name = 'calculatr': unknown environment; did you mean 'calculator'?" in err
    assert "known: calculator, long_horizon, python, search, single_turn" in err
    assert "reward.functions[0].name = 'mathh': unknown reward function; did you mean 'math'?" in err
    assert "algorithm.advantage = 'grpoo': unknown advantage estimator; did you mean 'grpo'?" in err
    assert "algorithm.loss = 'ppo_clipp': unknown policy loss; did you mean 'ppo_clip'?" in err
    assert "an entry point in group 'tiderl.rewards'" in err
    # a task name is the config layer's (rl.config: DataConfig), equally fast and clear
    proc = subprocess.run(
        [sys.executable, "-m", "rl.launch.cli", "train", CONFIG, "data.task=calculater"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "unknown task 'calculater'. Did you mean 'calculator'?" in proc.stderr


def test_plugin_files_must_exist_import_define_the_name_and_take_the_call(tmp_path: Path) -> None:
    (tmp_path / "rewards_ok.py").write_text(
        "def two_args(data_source, solution_str):\n    return 1.0\n\n"
        "def trl_no_kwargs(prompts, completions):\n    return [1.0] * len(completions)\n\n"
        "def verl(data_source, solution_str, ground_truth, extra_info=None):\n    return 1.0\n"
    )
    (tmp_path / "broken.py").write_text("import os\n\nraise RuntimeError('no GPU here')\n")
    (tmp_path / "syntax.py").write_text("def f(:\n    pass\n")
    (tmp_path / "algo.py").write_text(
        "def adv(rewards):\n    return rewards\n\ndef loss(a, b, c, d, **kw):\n    pass\n"
    )
    (tmp_path / "envs_user.py").write_text(
        "class NoStep:\n    async def reset(self, row): ...\n    async def close(self): ...\n\n"
        "class Needs:\n    def __init__(self, size):\n        pass\n"
        "    async def reset(self, row): ...\n    async def step(self, calls): ...\n    async def close(self): ...\n"
    )
    err = refused(
        tmp_path,
        "reward.functions=[{name: missing.py:f}, {name: broken.py:f}, {name: syntax.py:f}, {name: rewards_ok.py:nope},"
        " {name: rewards_ok.py:two_args}, {name: rewards_ok.py:trl_no_kwargs},"
        " {name: rewards_ok.py:verl, kwargs: {scale: 2}}]",
        "algorithm.advantage=algo.py:adv",
        "algorithm.loss=algo.py:loss",
        "env.name=envs_user.py:NoStep",
    )
    assert f"reward.functions[0].name = 'missing.py:f': file {tmp_path}/missing.py does not exist" in err
    assert (
        "reward.functions[1].name = 'broken.py:f': importing broken.py failed: RuntimeError: no GPU here (line 3)"
        in err
    )
    assert "reward.functions[2].name = 'syntax.py:f': importing syntax.py failed: SyntaxError at line 1" in err
    assert (
        f"reward.functions[3].name = 'rewards_ok.py:nope': reward function reference "
        f"'rewards_ok.py:nope': {tmp_path}/rewards_ok.py defines no 'nope'"
    ) in err
    assert (
        "reward.functions[4].name = 'rewards_ok.py:two_args': reward function "
        "'rewards_ok.py:two_args' takes (data_source, solution_str): use verl's compute_score"
    ) in err
    assert (
        "reward.functions[5].name = 'rewards_ok.py:trl_no_kwargs': takes (prompts, completions) without **kwargs"
    ) in err
    assert (
        "reward.functions[6].name = 'rewards_ok.py:verl': takes (data_source, solution_str, "
        "ground_truth, extra_info=None), but tiderl calls it as verl(data_source, solution_str, "
        "ground_truth, extra_info, scale=...): got an unexpected keyword argument 'scale'"
    ) in err
    assert (
        "algorithm.advantage = 'algo.py:adv': takes (rewards), but tiderl calls it as adv(rewards, "
        "group_ids, normalize_by_std=..., lengths=...)"
    ) in err
    assert "algorithm.loss" not in err  # it takes the call
    assert (
        "env.name = 'envs_user.py:NoStep': lacks step: an environment has async reset(row), step(calls) and close()"
    ) in err
    err = refused(tmp_path, "env.name=envs_user.py:Needs", "env.kwargs={sise: 3}")
    assert (
        'env.kwargs = {"sise": 3}: envs_user.py:Needs is built as Needs(**env.kwargs), which does '
        "not take them: missing a required argument: 'size'; its parameters are (size)"
    ) in err
    # a task file holding something else than a Task
    (tmp_path / "task.py").write_text("TASK = 3\n")
    err = refused(tmp_path, "data.task=task.py:TASK")
    assert "data.task = 'task.py:TASK': is a int, not an rl.tasks.Task" in err


def test_model_paths_name_the_users_path(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    err = refused(tmp_path, "model.path=./not-here", "reward.models=[{name: rm, kind: classifier, path: empty}]")
    assert f"model.path = './not-here': no such directory (looked for {tmp_path}/not-here)" in err
    assert "Hub ids are not downloaded" in err
    assert "reward.models[0].path = 'empty': holds no config.json" in err
    assert "cache" not in err  # the user's path, not an internal copy
    err = refused(tmp_path, "model.path=bad")
    assert "model.path = 'bad': its config.json says model_type 'no_such_arch', which transformers" in err
    err = refused(tmp_path, "model.path=empty", "model.gguf_file=SmolLM2.gguf")
    assert "model.gguf_file = 'SmolLM2.gguf': not in empty (GGUF files there: none)" in err


def test_data_files_need_verls_columns(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "questions.jsonl").write_text(json.dumps({"question": "1+1", "answer": "2"}) + "\n")
    pq.write_table(pa.table({"prompt": ["1+1"], "reward_model": [{"style": "rule"}]}), tmp_path / "no_truth.parquet")
    good = {"prompt": [{"role": "user", "content": "1+1"}], "reward_model": {"ground_truth": "2"}}
    (tmp_path / "good.jsonl").write_text(json.dumps(good) + "\n")
    (tmp_path / "rows.csv").write_text("prompt,answer\n")
    (tmp_path / "ptx.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")
    err = refused(
        tmp_path,
        "data.task=null",
        "data.train_files=[questions.jsonl, no_truth.parquet, good.jsonl, rows.csv]",
        "data.eval_files=[held_out.jsonl]",
        "algorithm.ptx_coef=0.1",
        "algorithm.ptx_files=[ptx.jsonl]",
    )
    assert (
        "data.train_files[0] = 'questions.jsonl': lacks prompt, reward_model.ground_truth (it has answer, question)"
    ) in err
    assert "data.train_files[1] = 'no_truth.parquet': lacks reward_model.ground_truth" in err
    assert "data.train_files[2]" not in err
    assert "data.train_files[3] = 'rows.csv': unsupported format" in err
    assert f"data.eval_files[0] = 'held_out.jsonl': does not exist (looked for {tmp_path}/held_out.jsonl)" in err
    assert "algorithm.ptx_files[0] = 'ptx.jsonl': each line must be a JSON object with `messages`" in err


def test_resources_beyond_this_machine(tmp_path: Path) -> None:
    err = refused(tmp_path, "rollout.cpus_per_worker=64")
    assert "rollout.cpus_per_worker/gpus_per_worker = '64 CPU': a rollout actor needs 64 CPU" in err
    assert "this machine (a local Ray instance" in err
    err = refused(tmp_path, "rollout.num_workers=3", "rollout.cpus_per_worker=1", "cluster.num_cpus=2")
    assert "resources = '4 CPU': the job needs 4 CPUs" in err and "the Ray cluster has 2" in err
    err = refused(tmp_path, "trainer.learner_gpus=1")
    assert "a learner actor needs 1 CPU, 1 GPU (trainer.learner_cpus/learner_gpus)" in err
    # the in-process backend starts no Ray: nothing to place
    assert load_config(CONFIG, ["cluster.backend=in_process", "rollout.cpus_per_worker=64"]) is not None


def test_algorithm_preconditions(tmp_path: Path) -> None:
    err = refused(tmp_path, "rollout.samples_per_prompt=1")
    assert "rollout.samples_per_prompt = 1: algorithm.advantage=grpo compares each sample with the other samples" in err
    assert "or use algorithm.advantage=reinforce_pp" in err
    err = refused(
        tmp_path,
        "rollout.max_tokens_per_sample=600",
        "rollout.max_new_tokens_per_turn=700",
        "rollout.token_budgets={calculator: 900}",
    )
    assert "rollout.max_new_tokens_per_turn = 700: a sample holds at most rollout.max_tokens_per_sample = 600" in err
    assert "rollout.token_budgets.calculator = 900" in err
    assert "rollout.max_tokens_per_sample = 600: the model has 512 positions" in err
    err = refused(
        tmp_path,
        "quant.enabled=false",
        "quant.group_size=64",
        "rollout.temperature_decay_steps=10",
        "eval.enabled=false",
        "eval.every=5",
    )
    assert "quant.group_size = 64: applies only with quant.enabled=true" in err
    assert "rollout.temperature_decay_steps = 10: applies only with rollout.temperature_final set" in err
    assert "eval.every = 5: applies only with eval.enabled=true" in err


def test_config_and_submit_run_the_same_checks(tmp_path: Path) -> None:
    assert "unknown reward function" in refused(tmp_path, "reward.functions=[{name: nope}]", command="config")
    # submit refuses before contacting the cluster (nothing listens at this address)
    err = refused(
        tmp_path, "reward.functions=[{name: nope}]", command="submit", extra=("--address", "http://127.0.0.1:9")
    )
    assert "unknown reward function" in err and "cannot reach" not in err


def test_every_shipped_config_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if "smollm2" in path.name:
            continue  # they need SmolLM2's files (make smollm2)
        preflight(load_config(path, []), nodes=[{"CPU": 2.0}])


def test_the_group_baseline_estimators_are_those_that_give_a_lone_sample_nothing() -> None:
    import torch

    from rl.trainer.advantages import ADVANTAGES

    rewards, groups, lengths = torch.tensor([1.0, 0.0, 3.0]), torch.tensor([0, 1, 2]), torch.tensor([4, 5, 6])
    lone = {
        name
        for name in ADVANTAGES.names()
        if torch.all(ADVANTAGES.get(name)(rewards, groups, normalize_by_std=True, lengths=lengths) == 0)
    }
    assert lone == GROUP_BASELINE_ADVANTAGES


def test_problems_are_listed_together() -> None:
    cfg = load_config(CONFIG, ["env.name=nope", "rollout.samples_per_prompt=1"])
    with pytest.raises(PreflightError) as info:
        preflight(cfg, nodes=[{"CPU": 2.0}])
    assert [p.key for p in info.value.problems] == ["env.name", "rollout.samples_per_prompt"]


def test_the_built_in_name_tables_match_what_the_modules_register() -> None:
    from envs.registry import BUILT_IN_ENVS, ENVS, load_builtin_envs
    from rewards.registry import BUILT_IN_REWARDS, REWARDS, get_reward

    load_builtin_envs()
    get_reward("calculator")
    assert {n: ENVS.get(n).__module__ for n in BUILT_IN_ENVS} == BUILT_IN_ENVS
    assert {n: REWARDS.get(n).__module__ for n in BUILT_IN_REWARDS} == BUILT_IN_REWARDS
    assert set(ENVS.names()) >= set(BUILT_IN_ENVS) and set(REWARDS.names()) >= set(BUILT_IN_REWARDS)
