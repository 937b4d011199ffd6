"""Checkpoints hold paused partial rollouts, and a resumed job continues exactly where the checkpoint left off."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rl.loop.checkpoint import WORKERS_FILE
from rl.loop.controller import train
from rollouts.pool import RolloutPool
from rollouts.worker import RolloutWorkerActor
from tests.test_rl_step import calculator_rows

pytestmark = pytest.mark.usefixtures("ray_local")


def test_paused_groups_move_to_new_workers_and_finish_token_for_token(tool_policy_dir, make_cfg) -> None:
    """A pool's state (sampling RNG + paused episodes with their environments) loaded into fresh workers
    continues exactly as the original pool does."""
    cfg = make_cfg(
        f"model.path={tool_policy_dir}", "rollout.max_new_tokens_per_turn=40", "rollout.samples_per_prompt=2"
    )

    def pool() -> RolloutPool:
        return RolloutPool(
            lambda i: RolloutWorkerActor.options(num_cpus=0.5).remote(str(tool_policy_dir), cfg.worker_spec(), i), 2
        )

    original = pool()
    assert original.generate_step(calculator_rows(4), 0, 2, iteration_budget=6) == [] and original.num_paused() == 8
    state = original.state()
    assert sum(len(p) for p in state["paused"]) == 4 and all(
        blob is not None for p in state["paused"] for _, _, blob in p
    )
    copy = pool()
    assert copy.load_state(state) == 4 and copy.in_flight == original.in_flight and copy.num_paused() == 8

    def finish(p: RolloutPool) -> list:
        out = []
        while p.num_paused():
            out += p.generate_step([], 0, 2, iteration_budget=6)
        return sorted(out, key=lambda t: t.sample_id)

    a, b = finish(original), finish(copy)
    assert len(a) == len(b) == 8
    assert all(
        torch.equal(x.token_ids, y.token_ids) and torch.equal(x.logprobs, y.logprobs) for x, y in zip(a, b, strict=True)
    )
    assert sum(t.num_tool_calls for t in a) > 0 and [t.messages for t in a] == [t.messages for t in b]
    original.kill(), copy.kill()


@pytest.mark.slow  # ~70 s; the mechanism is pinned by the test above, this is the whole job around it
def test_resume_with_paused_rollouts_in_the_checkpoint_is_exact(tool_policy_dir, tmp_path: Path, make_cfg) -> None:
    overrides = [
        f"model.path={tool_policy_dir}",
        "rollout.max_new_tokens_per_turn=40",
        "rollout.partial_rollout_budget=14",
        "trainer.checkpoint_every=1",
        "trainer.keep_checkpoints=5",
        "eval.enabled=false",
        "reward.functions=[{name: calculator}]",
        "rollout.max_staleness=0",
    ]  # this extends a finished run: with rollouts started ahead it would differ (docs/cluster.md)
    train(make_cfg(*overrides, "trainer.steps=4"), tmp_path / "straight")
    train(make_cfg(*overrides, "trainer.steps=2"), tmp_path / "resumed")
    paused = torch.load(tmp_path / "resumed" / "checkpoints" / "step_000002" / WORKERS_FILE, weights_only=False)[
        "paused"
    ]
    assert sum(len(p) for p in paused) > 0, "the test needs groups paused at the checkpoint"
    train(make_cfg(*overrides, "trainer.steps=4"), tmp_path / "resumed", resume=True)
    metrics = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [(r["num_samples"] if "loss" in r else 0, r["paused_samples"]) for r in straight] == [
        (r["num_samples"] if "loss" in r else 0, r["paused_samples"]) for r in resumed
    ]
    a = load_file(tmp_path / "straight" / "checkpoints" / "step_000004" / "policy" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "step_000004" / "policy" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_names_settings_that_differ_from_the_run(tmp_path: Path, capsys) -> None:
    from rl.config import dump_config, load_config
    from rl.loop.controller import _warn_changed_config

    config = Path(__file__).parents[1] / "configs" / "calculator.yaml"
    (tmp_path / "config.yaml").write_text(dump_config(load_config(config, [])))
    _warn_changed_config(
        tmp_path / "config.yaml", load_config(config, ["trainer.steps=99"])
    )  # more steps: the usual resume
    assert capsys.readouterr().out == ""
    _warn_changed_config(
        tmp_path / "config.yaml", load_config(config, ["trainer.lr=1e-3", "rollout.samples_per_prompt=4"])
    )
    out = " ".join(capsys.readouterr().out.split())
    assert (
        "rollout.samples_per_prompt: 8 -> 4" in out
        and "trainer.lr: 0.0002 -> 0.001" in out
        and "trainer.steps" not in out
    )
