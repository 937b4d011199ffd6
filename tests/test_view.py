"""The samples a run keeps (trajectories/step_N.jsonl with the learner's per-token values) and `tiderl view`'s data,
server and export, on a real tiny job (in process, ~10 s). The page in a real browser: tests/test_view_browser.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rewards.records import ScoredTrajectory
from rl.loop.samples import keep_samples
from rollouts.records import Sample, Trajectory, TrajectoryStatus


def _records(run_dir: Path, step: int) -> list[dict]:
    lines = (run_dir / "trajectories" / f"step_{step:06d}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_kept_samples_carry_the_learners_per_token_values_that_its_metrics_average(view_run: Path) -> None:
    for row in _metrics(view_run):
        records = _records(view_run, row["step"])
        assert len(records) == 8 and all("tokens" in r for r in records)
        gaps, policy, cut = [], 0, 0
        for r in records:
            t = r["tokens"]
            n = len(t["text"])
            assert all(len(t[k]) == n for k in ("policy", "rollout_logprob", "advantage", "dlogp", "token_mask"))
            assert sum(t["policy"]) == r["response_length"]
            assert all((d is None) == (not p) for d, p in zip(t["dlogp"], t["policy"], strict=True))
            gaps += [abs(d) for d in t["dlogp"] if d is not None]
            policy += sum(t["policy"])
            cut += sum(p and not m for p, m in zip(t["policy"], t["token_mask"], strict=True))
            # GRPO: every policy token carries its sample's advantage
            assert {a for a, p in zip(t["advantage"], t["policy"], strict=True) if p} <= {r["advantage"]}
        # the per-token values are the ones the learner's metrics average, over every token of the step
        assert sum(gaps) / len(gaps) == pytest.approx(row["mismatch_abs_logp"], rel=1e-2)
        assert cut / policy == pytest.approx(row["token_mask_fraction"], abs=1e-9)
        assert 0 < cut < policy  # the band cut some tokens and kept others (a gap of exactly 0 stays in it)


def test_keep_samples_takes_the_best_and_the_worst_of_each_prompt() -> None:
    def scored(group: int, reward: float) -> ScoredTrajectory:
        sample = Sample(f"{group}-{reward}", group, row=None)  # type: ignore[arg-type]
        empty = torch.zeros(0)
        trajectory = Trajectory(sample, empty.long(), empty, empty, 0, TrajectoryStatus.FINISHED)
        return ScoredTrajectory(trajectory, reward, {}, reward > 0)

    batch = [scored(0, 0.0), scored(0, 0.0), scored(1, 0.5), scored(1, 1.0), scored(1, 0.0), scored(2, 1.0)]
    assert keep_samples(batch, 2) == [3, 4]  # group 1 (rewards differ): best, worst
    assert keep_samples(batch, 4) == [3, 4, 0, 5]  # then one of each group of equal rewards
    assert keep_samples(batch, 6) == [3, 4, 0, 5, 1, 2]  # then the rest in batch order
    assert keep_samples(batch, 0) == []


def test_failed_samples_are_saved_with_why(make_cfg, tmp_path: Path) -> None:
    from rl.loop.controller import train
    from rl.loop.failures import JobFailed

    raising = str(Path(__file__).parent / "data" / "raising_reward.py") + ":compute_score"
    reward = f"reward.functions=[{{name: '{raising}'}}]"
    cfg = make_cfg("cluster.backend=in_process", reward, "trainer.steps=1", "eval.enabled=false")
    with pytest.raises(JobFailed):  # every step failed: the job says so (and the step's samples say why)
        train(cfg, tmp_path)
    records = _records(tmp_path, 1)
    assert len(records) == 8 and all(r["failed"] and r["reward"] is None for r in records)
    assert all(r["failure"].endswith("raised RuntimeError: grader unavailable") for r in records), records[0]


def test_view_data_follows_a_run_that_is_still_going(view_run: Path, tmp_path: Path) -> None:
    from rl.view.data import run_summary, step_samples

    run = tmp_path / "run"
    shutil.copytree(view_run, run)
    metrics = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(metrics[0] + "\n" + metrics[1][:20])  # step 2 half written
    (run / "trajectories" / "step_000003.jsonl").unlink()
    summary = run_summary(run)
    assert [r["step"] for r in summary["metrics"]] == [1]
    assert [s["step"] for s in summary["steps"]] == [1, 2]
    assert summary["total_steps"] == 3 and not summary["finished"]
    (run / "metrics.jsonl").write_text("\n".join(metrics) + "\n")
    shutil.copy(view_run / "trajectories" / "step_000003.jsonl", run / "trajectories")
    summary = run_summary(run)
    assert [r["step"] for r in summary["metrics"]] == [1, 2, 3] and summary["finished"]
    assert step_samples(run, 3)["samples"] == _records(view_run, 3)
    assert step_samples(run, 9)["samples"] == []


def test_view_server_and_export(view_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("plotly", reason="tiderl view needs the view extra: pip install -e '.[view]'")
    pytest.importorskip("starlette", reason="tiderl view needs the view extra: pip install -e '.[view]'")
    from starlette.testclient import TestClient

    from rl.view.server import create_app

    client = TestClient(create_app(view_run))
    page = client.get("/")
    assert page.status_code == 200 and "window.TIDERL_EMBED = null" in page.text
    assert client.get("/plotly.min.js").text.startswith("/**")
    run = client.get("/api/run").json()
    assert [r["step"] for r in run["metrics"]] == [1, 2, 3] and run["name"] == "run"
    assert client.get("/api/step/2").json()["samples"] == _records(view_run, 2)

    from typer.testing import CliRunner

    from rl.launch.cli import app

    out = tmp_path / "run.html"
    result = CliRunner().invoke(app, ["view", str(view_run), "--export", str(out)])
    assert result.exit_code == 0, result.output
    html = out.read_text()
    assert "<script src=" not in html and "<link" not in html  # plotly and the data inline (the browser test checks
    # that the page makes no request at all)
    embedded = json.loads(html.split("window.TIDERL_EMBED = ")[1].split(";</script>")[0].replace("<\\/", "</"))
    assert embedded["steps"]["3"]["samples"] == _records(view_run, 3)
    missing = CliRunner().invoke(app, ["view", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no such directory" in missing.output
