"""Held-out evaluation through the rollout workers: greedy accuracy, and sampled accuracy at the rollout temperature.

Accuracy is over the samples that could be scored; samples that failed (the rollout errored, the reward could not be
computed) are counted apart with their reasons (`failed_samples`, `failures`), and a part whose samples all failed
has no accuracy at all: it is reported as failed, not as 0.000 (`rl.loop.failures`).

`evaluate_run` is `tiderl eval RUN_DIR`: a finished (or checkpointed) run's policy evaluated again on its held-out
prompts, with heavy mode (`rl.loop.heavy`) when asked, on rollout workers started for it alone (no learner).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from envs.base import PromptRow
from rewards.scoring import RewardScorer, ScoringResult
from rl.config import JobConfig, load_config
from rl.loop.actors import runtime
from rl.loop.checkpoint import checkpoint_dir, latest_checkpoint
from rl.loop.data import load_split
from rl.loop.failures import reasons
from rl.loop.heavy import heavy_eval
from rl.loop.metrics import rollout_metrics
from rollouts.backend import InProcessBackend, RolloutBackend
from rollouts.pool import RolloutPool
from rollouts.shipping import ship_dir
from rollouts.worker import RolloutWorkerActor


def evaluate(workers: RolloutBackend, scorer: RewardScorer, rows: list[PromptRow], cfg: JobConfig) -> dict[str, Any]:
    """One greedy sample per prompt (`accuracy`, ...) and, if enabled, one sampled one (`accuracy_sampled`, ...)."""
    greedy = scorer.score(workers.generate(rows, 1, greedy=True, seed=cfg.seed))
    out = {**_part(greedy, ""), "num_prompts": float(len(rows))}
    if cfg.eval.sampled:
        sampled = scorer.score(workers.generate(rows, 1, greedy=False, seed=cfg.seed))
        out |= _part(sampled, "sampled_")
        if "sampled_accuracy" in out:
            out["accuracy_sampled"] = out.pop("sampled_accuracy")
    return out


def _part(result: ScoringResult, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = rollout_metrics(result.scored, prefix) if result.scored else {}
    out[f"{prefix}failed_samples"] = float(result.failed)
    if result.left_out:
        out[f"{prefix}failures"] = reasons(result.left_out)
    return out


def evaluate_run(
    run_dir: Path,
    overrides: list[str] | None = None,
    step: int | None = None,
    heavy: int | None = None,
    reflect_greedy: bool = False,
) -> dict[str, Any]:
    """Evaluate the policy of `run_dir`'s latest checkpoint (or `step`'s) with the run's config (plus `overrides`),
    as the job's held-out eval does (`checkpoint` in eval.json); with `heavy`, heavy mode with that many samples per
    prompt (`heavy`). Writes both into the run's eval.json, next to the training's `before` / `after`."""
    cfg = load_config(run_dir / "config.yaml", overrides or [])
    cfg.trainer.lora = None  # a LoRA run's checkpoint policy is the merged model: evaluated as exported
    checkpoint = checkpoint_dir(run_dir) / f"step_{step:06d}" if step is not None else latest_checkpoint(run_dir)
    if checkpoint is None or not (checkpoint / "policy").is_dir():
        which = f"for step {step} " if step is not None else ""
        raise FileNotFoundError(f"no checkpoint {which}with a policy in {checkpoint_dir(run_dir)}")
    step_done = int(checkpoint.name.removeprefix("step_"))
    with runtime(cfg):
        rows = load_split(cfg, "eval", run_dir / "data")
        workers = start_workers(cfg, checkpoint / "policy")
        try:
            scorer = RewardScorer(cfg.reward)
            out: dict[str, Any] = {"checkpoint": {"step": step_done, **evaluate(workers, scorer, rows, cfg)}}
            if heavy is not None:
                out["heavy"] = {"step": step_done, **heavy_eval(workers, scorer, rows, cfg, heavy, reflect_greedy)}
        finally:
            workers.kill()
    path = run_dir / "eval.json"
    evals = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps(evals | out, indent=2))
    return out


def start_workers(cfg: JobConfig, policy_dir: Path) -> RolloutBackend:
    """The job's rollout workers alone, on `policy_dir` (they quantize its targets to INT4 themselves): in this
    process with `cluster.backend: in_process`, else Ray actors with the workers' resources."""
    spec = cfg.worker_spec()
    r = cfg.rollout
    if cfg.cluster.backend == "in_process":
        return InProcessBackend(str(policy_dir), spec, r.num_workers)
    policy = ship_dir(policy_dir, int(cfg.cluster.ship_max_mb * 2**20))
    return RolloutPool(
        lambda i: RolloutWorkerActor.options(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker).remote(
            policy, spec, i
        ),
        r.num_workers,
        cfg.cluster.max_worker_restarts,
    )
