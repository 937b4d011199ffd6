"""Shared fixtures: one local Ray instance per test session, and a tiny built-in policy built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rl.config import JobConfig, load_config

# A policy small enough that a whole RL step takes a second or two on two cores. The warm start is skipped:
# tests need real weights and a real tokenizer, not a policy that has learned the task.
TINY_OVERRIDES = [
    "model.tiny.hidden_size=32",
    "model.tiny.num_heads=2",
    "model.tiny.n_routed_experts=4",
    "model.tiny.moe_intermediate_size=32",
    "model.tiny.kv_lora_rank=16",
    "model.tiny.qk_rope_head_dim=8",
    "model.tiny.qk_nope_head_dim=8",
    "model.tiny.v_head_dim=8",
    "warm_start.enabled=false",
    "warm_start.num_demos=300",
    "data.train_size=64",
    "data.eval_size=8",
    "rollout.num_workers=1",
    "rollout.cpus_per_worker=1",
    "rollout.samples_per_prompt=2",
    "rollout.max_new_tokens_per_turn=12",
    "trainer.prompts_per_step=4",
    "trainer.steps=2",
    "trainer.learner_threads=1",
    "logging.progress=false",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiderl-cache")


@pytest.fixture(scope="session")
def make_cfg(cache_dir: Path):
    def make(*overrides: str) -> JobConfig:
        return load_config(None, ["model={}", f"warm_start.cache_dir={cache_dir}", *TINY_OVERRIDES, *overrides])

    return make


@pytest.fixture(scope="session")
def tiny_policy_dir(make_cfg) -> Path:
    from rl.policy.warmstart import prepare_policy

    return prepare_policy(make_cfg(), log=lambda *_: None)


@pytest.fixture(scope="session")
def tool_policy_dir(make_cfg) -> Path:
    """The tiny policy after a 60-step warm start on tool-calling demonstrations (~6 s): it calls `calc`, reads
    the result and answers (often wrongly), so multi-turn episodes with real tool calls come from a real model."""
    from rl.policy.warmstart import prepare_policy

    cfg = make_cfg(
        "warm_start.enabled=true",
        "warm_start.steps=60",
        "warm_start.batch_size=16",
        "warm_start.tool_use_rate=1.0",
        "warm_start.target_copy_accuracy=0",
        "warm_start.check_every=60",
        "warm_start.anneal_steps=10",
        "warm_start.lr=1e-2",
    )
    return prepare_policy(cfg, log=lambda *_: None)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    os.environ["RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"] = "1"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


VIEW_OVERRIDES = (
    "cluster.backend=in_process",
    "trainer.steps=3",
    "eval.enabled=false",
    "logging.samples_per_step=8",  # every sample of the tiny job's steps (4 prompts x 2)
    "algorithm.token_mask=[-1e-9, 1e-9]",  # a band the float gap leaves: the mask cuts tokens, to see it recorded
    "rollout.max_new_tokens_per_turn=24",
)


@pytest.fixture(scope="session")
def view_run(make_cfg, tmp_path_factory) -> Path:
    """A finished tiny job's run directory (in process, 3 steps, every sample kept with its tokens, a token mask that
    cuts some tokens): what `tiderl view` shows, for tests/test_view.py and tests/test_view_browser.py."""
    from rl.loop.controller import train

    run_dir = tmp_path_factory.mktemp("view") / "run"
    train(make_cfg(*VIEW_OVERRIDES), run_dir)
    return run_dir
