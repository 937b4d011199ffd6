"""Config validation: every mistake names its key; the CLI fails fast and starts nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rl.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def _error(tmp_path: Path, text: str, *overrides: str) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


def test_default_config_is_valid() -> None:
    cfg = load_config(ROOT / "configs" / "calculator.yaml")
    assert cfg.model.path is None and cfg.rollout.samples_per_prompt == 8 and cfg.algorithm.advantage == "grpo"


def test_unknown_key_names_the_closest_valid_key(tmp_path: Path) -> None:
    msg = _error(tmp_path, "model: {}\nrollout:\n  samples_per_promt: 4\n")
    assert "rollout.samples_per_promt: unknown key" in msg
    assert "did you mean 'rollout.samples_per_prompt'" in msg


def test_unknown_section_and_nested_list_keys(tmp_path: Path) -> None:
    msg = _error(tmp_path, "model: {}\ntrainr: {}\nreward:\n  functions:\n    - {name: calculator, wieght: 2}\n")
    assert "trainr: unknown key; did you mean 'trainer'?" in msg
    assert "reward.functions.0.wieght: unknown key; did you mean 'reward.functions.0.weight'?" in msg


def test_out_of_range_and_wrong_type(tmp_path: Path) -> None:
    msg = _error(tmp_path, "model: {}\ntrainer:\n  prompts_per_step: -4\n  lr: fast\n")
    assert "trainer.prompts_per_step: Input should be greater than or equal to 1 (got -4)" in msg
    assert "trainer.lr:" in msg and "'fast'" in msg


def test_missing_model_section(tmp_path: Path) -> None:
    assert "model: required section or key is missing" in _error(tmp_path, "trainer:\n  steps: 3\n")


def test_overrides_are_typed_and_validated(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("model: {}\n")
    cfg = load_config(
        path, ["trainer.steps=40", "trainer.lr=1e-4", "eval.sampled=false", "data.train_files=[a.jsonl, b.jsonl]"]
    )
    assert (cfg.trainer.steps, cfg.trainer.lr, cfg.eval.sampled, cfg.data.train_files) == (
        40,
        1e-4,
        False,
        ["a.jsonl", "b.jsonl"],
    )
    assert "trainer.stepz: unknown key; did you mean 'trainer.steps'?" in _error(
        tmp_path, "model: {}\n", "trainer.stepz=3"
    )
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(path, ["trainer.steps"])


def test_model_path_expands_environment_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDERL_TEST_MODEL", "/models/smol")
    assert load_config(None, ["model.path=${TIDERL_TEST_MODEL}/v1"]).model.path == "/models/smol/v1"
    monkeypatch.setenv("TIDERL_TEST_MODEL", "")
    for unset in ["${TIDERL_TEST_MODEL}", "${TIDERL_TEST_UNSET_VARIABLE}"]:
        with pytest.raises(ConfigError, match="model: .*environment variable that is not set or is empty"):
            load_config(None, [f"model.path={unset}"])


def test_cross_field_checks(tmp_path: Path) -> None:
    msg = _error(tmp_path, "model:\n  tiny: {n_routed_experts: 2, experts_per_token: 4}\n")
    assert "model.tiny" in msg and "experts_per_token must not exceed n_routed_experts" in msg
    assert "data" in _error(tmp_path, "model: {}\ndata: {task: null}\n")
    assert "set `data.eval_files`" in _error(tmp_path, "model: {}\ndata: {task: null, train_files: [a.jsonl]}\n")
    assert (
        load_config(
            None, ["model={}", "data.task=null", "data.train_files=[a.jsonl]", "eval.enabled=false"]
        ).eval.enabled
        is False
    )


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("model: {}\ntrainer:\n  stepz: 3\n", "trainer.stepz: unknown key; did you mean 'trainer.steps'?"),
        ("model: {}\ntrainer:\n  prompts_per_step: -1\n", "trainer.prompts_per_step"),
        ("trainer:\n  steps: 3\n", "model: required section or key is missing"),
    ],
)
def test_cli_rejects_bad_yaml_fast_without_starting_ray(tmp_path: Path, yaml_text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    ray_tmp = tmp_path / "ray-tmp"  # a Ray instance would write its session here (other jobs' Ray may be running)
    # no timed assert (a shared machine's load decides the seconds): no Ray session, no run directory
    proc = subprocess.run(
        [sys.executable, "-m", "rl.launch.cli", "train", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "RAY_TMPDIR": str(ray_tmp)},
    )
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert not ray_tmp.exists()
    assert not (tmp_path / "runs").exists()


def test_in_process_backend_rejects_what_needs_ray() -> None:
    with pytest.raises(ConfigError, match="trainer.num_learners, reward.models need the ray backend"):
        load_config(
            None,
            [
                "model={}",
                "cluster.backend=in_process",
                "trainer.num_learners=2",
                "reward.models=[{name: rm, kind: classifier, path: x}]",
            ],
        )
    assert load_config(None, ["model={}", "cluster.backend=in_process"]).cluster.backend == "in_process"


def test_a_setting_of_another_algorithm_variant_is_an_error_naming_what_it_needs() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(
            None,
            [
                "model={}",
                "algorithm.k2_tau=0.5",
                "algorithm.kl_estimator=k1",
                "algorithm.dynamic_sampling_max_rounds=2",
            ],
        )
    text = str(e.value)
    assert (
        "algorithm.k2_tau applies to loss: k2" in text
        and "algorithm.kl_estimator applies only with kl_coef > 0" in text
    )
    assert "algorithm.dynamic_sampling_max_rounds applies only with dynamic_sampling: true" in text
    with pytest.raises(ConfigError, match="algorithm.clip_ratio_high applies to the clipped losses"):
        load_config(
            None,
            ["model={}", "algorithm.loss=k2", "algorithm.advantage=mean_baseline", "algorithm.clip_ratio_high=0.28"],
        )
    ok = load_config(
        None,
        ["model={}", "algorithm.loss=k2", "algorithm.k2_tau=0.5", "algorithm.kl_coef=0.1", "algorithm.kl_estimator=k1"],
    )
    assert (ok.algorithm.k2_tau, ok.algorithm.kl_estimator) == (0.5, "k1")
    # a default written out (a run's resolved config.yaml, which `tiderl export` and `--resume` read) is not a setting
    resolved = load_config(
        None, ["model={}", "algorithm.k2_tau=0.1", "algorithm.kl_estimator=k3", "algorithm.ptx_files=[]"]
    )
    assert resolved.algorithm.k2_tau == 0.1
    # a user's own loss from a file may take k2_tau: not rejected
    assert (
        load_config(None, ["model={}", "algorithm.loss=my_loss.py:loss", "algorithm.k2_tau=0.3"]).algorithm.k2_tau
        == 0.3
    )
