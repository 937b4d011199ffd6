"""Failures are failures (`rl.loop.failures`): a real job whose samples all fail (a plugin reward that raises, an
environment that raises) says so in the terminal, metrics.jsonl and eval.json, with counts and reasons instead of
a reward or an accuracy of 0, and ends with a non-zero exit and a summary of what failed and where to look. The
in-process backend keeps the jobs fast."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rl.loop.controller import train
from rl.loop.failures import JobFailed, eval_status
from tests.conftest import TINY_OVERRIDES

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[1]
RAISING_REWARD = f"{DATA / 'raising_reward.py'}:compute_score"
REASON = f"reward function '{RAISING_REWARD}' raised RuntimeError: grader unavailable"


def test_a_job_whose_reward_always_raises_reports_failures_and_exits_nonzero(tmp_path: Path, cache_dir: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable, "-m", "rl.launch.cli", "train", "configs/calculator.yaml", *TINY_OVERRIDES,
            f"warm_start.cache_dir={cache_dir}", "cluster.backend=in_process", "quant.enabled=false",
            "data.eval_size=4",
            f"reward.functions=[{{name: '{RAISING_REWARD}'}}]", "--run-dir", str(run),
        ],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    out, err = " ".join(proc.stdout.split()), " ".join(proc.stderr.split())  # the console wraps long lines
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    # the terminal: each evaluation and each step says what failed, never an accuracy of 0
    assert f"eval before RL: greedy all 4 samples failed (4x {REASON}), sampled all 4 samples failed" in out
    assert f"step 1: all 8 samples failed, nothing trained: 8x {REASON}" in out
    assert f"step 2: all 8 samples failed, nothing trained: 8x {REASON}" in out
    assert "0.000" not in out
    # the exit: a summary of what failed and where to look
    assert "error: every one of the 2 RL steps failed: all their samples (16) were left out" in err
    assert f"Why: 16x {REASON}." in err
    assert f"{run}/trajectories" in err and f"{run}/metrics.jsonl" in err
    # metrics.jsonl: counts and reasons
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_step"], r["failed_samples"], r["failures"]) for r in rows] == [
        (1, 1.0, 8.0, {REASON: 8}),
        (2, 1.0, 8.0, {REASON: 8}),
    ]
    assert all("accuracy" not in r and "reward_mean" not in r for r in rows)
    # eval.json: counts and reasons, no accuracy
    evals = json.loads((run / "eval.json").read_text())
    for when in ("before", "after"):
        assert evals[when] == {
            "failed_samples": 4.0,
            "failures": {REASON: 4},
            "num_prompts": 4.0,
            "sampled_failed_samples": 4.0,
            "sampled_failures": {REASON: 4},
        }
    # each failed sample is kept with its reason
    saved = [json.loads(line) for line in (run / "trajectories" / "step_000001.jsonl").read_text().splitlines()]
    assert len(saved) == 8 and all(s["failed"] for s in saved)


def test_a_job_whose_environment_always_raises_fails_with_the_environments_error(tmp_path: Path, make_cfg) -> None:
    cfg = make_cfg("cluster.backend=in_process", f"env.name={DATA / 'raising_env.py'}:OfflineEnv", "eval.enabled=false")
    with pytest.raises(JobFailed) as info:
        train(cfg, tmp_path)
    reason = "rollout error: env reset failed: ConnectionError: index service offline"
    assert "every one of the 2 RL steps failed: all their samples (16) were left out" in str(info.value)
    assert f"Why: 16x {reason}." in str(info.value)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["failures"] for r in rows] == [{reason: 8}, {reason: 8}] and rows[0]["rollout_errors"] == 8.0


def test_evaluations_with_some_failures_report_accuracy_over_the_scored_and_the_failures_apart() -> None:
    result = {"accuracy": 0.5, "failed_samples": 2.0, "failures": {"reward function 'f' timed out after 1 s": 2}}
    assert eval_status(result) == "0.500 (2 samples failed: 2x reward function 'f' timed out after 1 s)"
    assert eval_status({"accuracy_sampled": 0.25, "sampled_failed_samples": 0.0}, "sampled_") == "0.250"
    assert eval_status({"failed_samples": 3.0, "failures": {"x": 3}}) == "all 3 samples failed (3x x)"
