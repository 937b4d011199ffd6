"""Planning a `tiderl submit` without a cluster: the entrypoint and runtime environment, local paths rewritten
relative to the working directory, the run directory, errors that name the field and the fix, and where the
cluster address and auth token come from. (The submission itself, against a real cluster: test_cluster_jobs.py.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from rl.config import load_config
from rl.launch.jobs import JobsError, cluster_path, local_token, plan_submission, resolve_address


def _plan(tmp_path: Path, *overrides: str, config: str = "job.yaml", **kwargs):
    path = tmp_path / "wd" / config
    return plan_submission(
        path, list(overrides), load_config(path, list(overrides)), working_dir=tmp_path / "wd", **kwargs
    )


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    wd = tmp_path / "wd"
    (wd / "data").mkdir(parents=True)
    (wd / "job.yaml").write_text("model: {}\n")
    (wd / "data" / "train.jsonl").write_text("{}\n")
    (wd / "reward.py").write_text("def score(*a): return 1.0\n")
    (tmp_path / "outside.jsonl").write_text("{}\n")
    monkeypatch.chdir(wd)
    return wd


def test_plan_builds_the_entrypoint_and_runtime_env(workdir: Path, tmp_path: Path):
    plan = _plan(
        tmp_path, "trainer.steps=3", "cluster.env_vars={HF_HOME: /data/hf}", "cluster.pip=[bm25s]", submission_id="j1"
    )
    assert plan.submission_id == "j1" and plan.run_dir == "~/tiderl-runs/j1"
    assert plan.entrypoint == (
        "python -m rl.launch.cli train job.yaml trainer.steps=3 'cluster.env_vars={HF_HOME: /data/hf}' "
        "'cluster.pip=[bm25s]' "
        '--run-dir "$HOME"/tiderl-runs/j1'
    )
    env = plan.runtime_env
    assert env["working_dir"] == str(workdir) and env["env_vars"] == {"HF_HOME": "/data/hf"} and env["pip"] == ["bm25s"]
    assert {".venv", ".git", "runs", ".oracles", "__pycache__", "*.egg-info"} <= set(env["excludes"])
    assert "pip" not in _plan(tmp_path).runtime_env and "env_vars" not in _plan(tmp_path).runtime_env
    resumed = _plan(tmp_path, resume="/runs/a")
    assert resumed.entrypoint.endswith("--resume /runs/a") and resumed.run_dir == "/runs/a"
    assert re.fullmatch(r"job-\d{8}-\d{6}-[0-9a-f]{4}", _plan(tmp_path).submission_id)


def test_plan_rewrites_local_paths_relative_to_the_working_dir(workdir: Path, tmp_path: Path):
    plan = _plan(
        tmp_path,
        f"data.train_files=[{workdir / 'data' / 'train.jsonl'}]",
        "data.task=null",
        "eval.enabled=false",
        f"reward.functions=[{{name: '{workdir / 'reward.py'}:score', weight: 0.5}}]",
        "algorithm.ptx_coef=0.1",
        "algorithm.ptx_files=[/mnt/shared/ptx.jsonl]",  # not here: a path on the cluster, passed on as written
    )
    cfg = _as_on_the_cluster(plan, workdir)
    assert cfg.data.train_files == ["data/train.jsonl"]
    assert (cfg.reward.functions[0].name, cfg.reward.functions[0].weight) == ("reward.py:score", 0.5)
    assert cfg.algorithm.ptx_files == ["/mnt/shared/ptx.jsonl"]
    assert plan.notes == [
        "algorithm.ptx_files[0]: /mnt/shared/ptx.jsonl is not on this machine; the job uses it on the cluster as "
        "written"
    ]
    # already relative to the working dir: no override added
    plain = _plan(tmp_path, "data.train_files=[data/train.jsonl]", "data.task=null", "eval.enabled=false")
    assert plain.entrypoint.count("train_files") == 1


def _as_on_the_cluster(plan, workdir: Path):
    """The config the job's driver loads: the entrypoint's config and overrides, read from the working dir."""
    args = shlex.split(plan.entrypoint)
    assert args[:4] == ["python", "-m", "rl.launch.cli", "train"] and args[-2] in ("--run-dir", "--resume")
    return load_config(workdir / args[4], args[5:-2])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.eval_files=[{outside}]", "data.eval_files[0]: {outside} is outside the working directory"),
        ("env.name={outside_py}:Env", "env.name: {outside_py} is outside the working directory"),
        ("data.eval_files=[data/missing.jsonl]", "data.eval_files[0]: data/missing.jsonl does not exist"),
        (
            "data.eval_files=[runs/x.jsonl]",
            "data.eval_files[0]: runs/x.jsonl is inside the working directory but is excluded",
        ),
        ("data.eval_files=[secret/x.jsonl]", "secret/x.jsonl is inside the working directory but is ignored by"),
        ("cluster.env_vars={{TOKENIZERS_PARALLELISM: 'true'}}", "cluster.env_vars sets TOKENIZERS_PARALLELISM"),
    ],
)
def test_plan_errors_name_the_field_and_the_fix(workdir: Path, tmp_path: Path, override: str, message: str):
    for rel in ("runs/x.jsonl", "secret/x.jsonl"):
        (workdir / rel).parent.mkdir(exist_ok=True)
        (workdir / rel).write_text("{}\n")
    (workdir / ".gitignore").write_text("secret/\n")
    (tmp_path / "env.py").write_text("")
    fill = {"outside": tmp_path / "outside.jsonl", "outside_py": tmp_path / "env.py"}
    with pytest.raises(JobsError) as e:
        _plan(tmp_path, override.format(**fill))
    assert message.format(**fill) in str(e.value)
    if "outside" in message:
        assert "move it into the working directory, or point --working-dir" in str(e.value)


def test_config_outside_the_working_dir_and_relative_run_dirs(workdir: Path, tmp_path: Path):
    (tmp_path / "job.yaml").write_text("model: {}\n")
    with pytest.raises(JobsError, match="the config file: .* is outside the working directory"):
        plan_submission(tmp_path / "job.yaml", [], load_config(tmp_path / "job.yaml"), working_dir=workdir)
    with pytest.raises(JobsError, match="--run-dir runs/x is relative"):
        _plan(tmp_path, run_dir="runs/x")
    with pytest.raises(JobsError, match="drop --run-dir"):
        _plan(tmp_path, run_dir="/a", resume="/b")
    assert cluster_path("~/runs/my run", "--run-dir") == "\"$HOME\"/'runs/my run'"
    assert cluster_path("/abs/dir", "--run-dir") == "/abs/dir"


def test_address_and_token_lookup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    for key in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(JobsError, match="no cluster address"):
        resolve_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address: not the Jobs API
    with pytest.raises(JobsError):
        resolve_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265")
    assert resolve_address(None) == "http://10.0.0.1:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "10.0.0.2:8265")
    assert resolve_address(None) == "http://10.0.0.2:8265"
    assert resolve_address("http://head:8265/") == "http://head:8265"

    assert local_token() == (None, "~/.ray/auth_token")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert local_token() == ("home-token", "~/.ray/auth_token")
    (tmp_path / "tok").write_text("file-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert local_token()[0] == "file-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert local_token() == ("env-token", "RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(JobsError, match="RAY_AUTH_TOKEN_PATH is set to .*missing"):
        local_token()
