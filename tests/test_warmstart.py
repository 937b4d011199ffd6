"""The built-in policy's warm start: cached by config hash, stops once the copy target is met."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rl.config import load_config
from rl.policy.warmstart import policy_key, prepare_policy

ROOT = Path(__file__).resolve().parents[1]


def test_warm_start_anneals_once_the_copy_target_is_met_and_is_cached(make_cfg, tmp_path) -> None:
    overrides = [
        f"warm_start.cache_dir={tmp_path}",
        "warm_start.enabled=true",
        "warm_start.steps=40",
        "warm_start.batch_size=4",
        "warm_start.check_every=10",
        "warm_start.anneal_steps=5",
        "logging.progress=false",
    ]
    # target 0 stops the constant phase at the first check (step 10, then 5 annealing steps); an untrained
    # model's digit accuracy is far below 0.999, so the second target is never met (the cap: 40)
    easy = make_cfg(*overrides, "warm_start.target_copy_accuracy=0")
    path = prepare_policy(easy, log=lambda *_: None)
    report = json.loads((path / "warm_start.json").read_text())
    assert report["steps"] == 15 and 0.0 <= report["copy_accuracy"] <= 1.0
    hard = make_cfg(*overrides, "warm_start.target_copy_accuracy=0.999")
    assert json.loads((prepare_policy(hard, log=lambda *_: None) / "warm_start.json").read_text())["steps"] == 40
    messages: list[str] = []
    assert prepare_policy(easy, log=messages.append) == path and messages[0].startswith("using cached")
    assert policy_key(easy) != policy_key(hard)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_default_job_learns_to_use_the_tool(tmp_path) -> None:
    """The acceptance run: the default job, as `make run` runs it (~3.5 minutes on 2 cores)."""
    from rl.loop.controller import train

    cfg = load_config(
        ROOT / "configs" / "calculator.yaml", [f"warm_start.cache_dir={tmp_path / 'cache'}", "logging.progress=false"]
    )
    evals = train(cfg, tmp_path / "run")
    assert evals["after"]["accuracy"] - evals["before"]["accuracy"] >= 0.30
    assert evals["after"]["accuracy_sampled"] - evals["before"]["accuracy_sampled"] >= 0.30
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["mismatch_abs_logp"] < 1e-4 and rows[-1]["tool_calls_per_sample"] > 0.9
