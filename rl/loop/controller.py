"""The RL job, top to bottom: generate -> score -> advantages -> update -> sync, each timed under its own name.

`rl_step` is one step; `train` sets a job up and runs its steps. Everything that is not the loop lives elsewhere:
the policy and its warm start (`rl.policy.warmstart`), prompt data (`rl.loop.data`), the actors and where they run
(`rl.loop.actors`: Ray or this process), generation behind the rollout-backend protocol (`rollouts.backend`), the
async pipeline (`rl.loop.pipeline`), a step's scored batch (`rl.loop.sampling`), rewards (`rewards.scoring`,
`rewards.models`), the update (`rl.trainer`), checkpoints (`rl.loop.checkpoint`) and metrics (`rl.loop.metrics`).

Faults: a rollout worker or reward model that dies is restarted by its pool within the step (no sample lost or
counted twice); a learner that dies is restarted and the job goes back to the last checkpoint (or its start),
restoring weights, optimizer, RNG states, data position and paused rollouts, then goes on.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from envs.base import PromptRow
from rewards.models import fetch_model_scores
from rewards.records import ScoredTrajectory
from rewards.scoring import RewardScorer, ScoringResult
from rl.config import ConfigError, JobConfig, dump_config
from rl.loop.actors import Actors, runtime
from rl.loop.checkpoint import latest_checkpoint, restore_checkpoint, save_checkpoint
from rl.loop.data import PromptSampler, load_split
from rl.loop.evaluation import evaluate
from rl.loop.failures import FailureLog, eval_status, reasons, step_status
from rl.loop.metrics import MetricsLogger, StageTimer, rollout_metrics
from rl.loop.pipeline import RolloutPipeline
from rl.loop.progress import GenerationDisplay, progress_sink
from rl.loop.samples import keep_samples, step_records, table_rows, write_records
from rl.loop.sampling import collect_batch, first_group_id, rollout_temperature
from rl.loop.trackers import TrackerRun, check_trackers, open_trackers
from rl.policy.recovery import recover_int4, recovered_config
from rl.policy.warmstart import prepare_policy
from rl.trainer.advantages import ADVANTAGES, AdvantageFn
from rl.trainer.batch import TrainBatch
from rl.trainer.trace import TokenTrace
from rollouts.actors import ACTOR_LOST

console = Console()


@dataclass
class Job:
    """What every step of a job uses (the loop's typed context)."""

    cfg: JobConfig
    run_dir: Path
    actors: Actors
    sampler: PromptSampler
    pipeline: RolloutPipeline
    scorer: RewardScorer
    advantage_fn: AdvantageFn
    pad_id: int
    eval_rows: list[PromptRow]
    logger: MetricsLogger
    start: dict[str, Any]
    """The state at step 0, where a learner lost before any checkpoint goes back to."""


def rl_step(job: Job, step: int) -> dict[str, Any]:
    """One RL step: generate -> score -> advantages -> update -> sync; returns its metrics (numbers, and the
    reasons samples failed under `failures`)."""
    cfg, actors, timer = job.cfg, job.actors, StageTimer()
    temperature = rollout_temperature(cfg, step)
    batch, sampling_metrics = collect_batch(cfg, step, job.pipeline, job.sampler, actors, job.scorer, timer)
    kept, train_batch, traces = keep_samples(batch.scored, cfg.logging.samples_per_step), None, []
    if batch.scored:
        with timer("advantages"):
            train_batch, kl_metrics = advantage_batch(job, batch.scored, temperature, kept)
        with timer("update"):
            train_metrics = actors.learner.train_step(train_batch)
            traces = actors.learner.token_traces() if kept else []  # before the weight push queues behind it
        with timer("sync"):
            sync_metrics = actors.sync_weights(cfg, int(train_metrics["policy_version"]))
        metrics = {**rollout_metrics(batch.scored), **train_metrics, **kl_metrics, **sync_metrics}
        metrics["temperature"] = temperature
    else:  # every sample failed (each counted and logged by the scorer), or every group is still paused
        metrics = {"skipped_step": 1.0}
    with timer("samples"):
        save_samples(job, step, batch, train_batch, kept, traces)
    metrics |= {"failed_samples": float(batch.failed), **batch.metrics, **sampling_metrics}
    if batch.left_out:  # how many failed and why, in metrics.jsonl and the terminal (rl.loop.failures)
        metrics["failures"] = reasons(batch.left_out)
    metrics |= {
        **timer.times,
        "time_step_s": sum(timer.times.values()),
        "rollout_steps_ahead": float(job.pipeline.in_flight),
    }
    if cfg.rollout.partial_rollout_budget:
        metrics["paused_samples"] = float(actors.workers.num_paused())
    if cfg.eval.enabled and cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.trainer.steps:
        metrics |= {f"eval/{k}": v for k, v in evaluate(actors.workers, job.scorer, job.eval_rows, cfg).items()}
    return metrics


def advantage_batch(
    job: Job, scored: list[ScoredTrajectory], temperature: float, kept: list[int] | None = None
) -> tuple[TrainBatch, dict[str, float]]:
    """The learner's batch: the trajectories padded, each sequence's advantage on its policy tokens (with
    `algorithm.kl_in: reward`, from rewards less the KL to the reference policy, reported as `kl_reward_penalty`);
    the learner records its per-token values of the `kept` ones (`TrainBatch.trace`)."""
    algo = job.cfg.algorithm
    rewards = torch.tensor([s.reward for s in scored])
    groups = torch.tensor([s.trajectory.group_id for s in scored])
    lengths = torch.tensor([s.trajectory.response_length for s in scored])
    batch = TrainBatch.from_scored(scored, torch.zeros(len(scored)), job.pad_id, temperature)
    extra: dict[str, float] = {}
    if algo.kl_coef > 0 and algo.kl_in == "reward":
        kl = batch.per_episode(job.actors.learner.reference_kl(batch), len(scored))  # summed over its policy tokens
        rewards = rewards - algo.kl_coef * kl
        extra["kl_reward_penalty"] = float(algo.kl_coef * kl.mean())
    advantages = job.advantage_fn(rewards, groups, normalize_by_std=algo.normalize_by_std, lengths=lengths)
    # every sequence of an episode (several after context rewrites) trains with the episode's advantage
    batch.advantages = advantages.to(torch.float32)[batch.rows_of(len(scored))][:, None] * batch.loss_mask
    if kept:  # a kept episode's trace is that of its last sequence, the tokens its record holds
        batch.trace = torch.full((batch.num_sequences,), -1, dtype=torch.long)
        batch.trace[batch.last_rows(len(scored))[kept]] = torch.arange(len(kept))
    return batch, extra


def save_samples(
    job: Job,
    step: int,
    batch: ScoringResult,
    train_batch: TrainBatch | None,
    kept: list[int],
    traces: list[TokenTrace],
) -> None:
    """The step's samples into trajectories/step_N.jsonl, the kept ones with their tokens and the learner's
    per-token values (`traces`), and as a table into the trackers (`rl.loop.samples`)."""
    advantages = None
    if train_batch is not None:  # the row of each sample's last sequence: the tokens its record holds
        advantages = train_batch.advantages[train_batch.last_rows(len(batch.scored))]
    records = step_records(batch.scored, advantages, kept, traces, batch.left_out)
    if job.cfg.logging.save_trajectories and records:
        write_records(job.run_dir / "trajectories" / f"step_{step:06d}.jsonl", records)
    job.logger.log_samples(step, table_rows(records))


def train(cfg: JobConfig, run_dir: Path, resume: bool = False) -> dict:
    """Run the job into `run_dir`; with `resume`, continue from its latest checkpoint. Returns eval.json's content."""
    problems = check_trackers(cfg.logging.trackers)
    if problems:
        raise ConfigError("\n".join(problems))
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        _warn_changed_config(run_dir / "config.yaml", cfg)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    tracked = TrackerRun(run_dir, cfg.logging.project, run_dir.name, cfg.model_dump(mode="json"))
    logger = MetricsLogger(run_dir, open_trackers(cfg.logging.trackers, tracked))
    try:
        return _train(cfg, run_dir, resume, logger)
    finally:
        logger.close()


def _train(cfg: JobConfig, run_dir: Path, resume: bool, logger: MetricsLogger) -> dict:
    """`train` once the run directory and its trackers are open: the policy, the actors, the steps."""
    policy_dir = prepare_policy(cfg, log=console.print)
    train_rows = load_split(cfg, "train", run_dir / "data")
    if cfg.int4_recovery.steps:  # before Ray starts: the distillation has the machine to itself
        policy_dir = recover_int4(cfg, policy_dir, train_rows, log=console.print)
        cfg = recovered_config(cfg, policy_dir)
    with runtime(cfg):
        eval_rows = load_split(cfg, "eval", run_dir / "data") if cfg.eval.enabled else []
        sampler = PromptSampler(train_rows, cfg.seed, cfg.data.shuffle, cfg.data.sampling, cfg.data.success_ema)
        sampler.check()
        actors = Actors.start(cfg, policy_dir)
        try:
            pipeline = RolloutPipeline(
                cfg, actors.workers, sampler, lambda k: first_group_id(cfg, k), lambda k: rollout_temperature(cfg, k)
            )
            start = {
                "step": 0,
                "data_cursor": sampler.state_dict(),
                "workers": actors.workers.state(),
                "pending_rollouts": [],
            }
            job = Job(
                cfg,
                run_dir,
                actors,
                sampler,
                pipeline,
                RewardScorer(cfg.reward),
                ADVANTAGES.get(cfg.algorithm.advantage),
                actors.workers.pad_token_id(),
                eval_rows,
                logger,
                start,
            )
            return _run(job, resume)
        finally:
            actors.kill()


def _run(job: Job, resume: bool) -> dict:
    """Evaluate, run the steps (checkpointing, recovering a lost learner), evaluate again; returns eval.json's
    content."""
    cfg, run_dir = job.cfg, job.run_dir
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:
        console.print(f"[yellow]--resume: no checkpoint in {run_dir}; starting from step 1")
    step = _restore(job, checkpoint) + 1 if checkpoint is not None else 1
    if checkpoint is None:
        job.actors.sync_weights(cfg, job.actors.learner.get_version())
    if cfg.quant.enabled or cfg.trainer.lora is not None:
        delta = cfg.cluster.weight_sync_delta and cfg.trainer.lora is None
        _report_sync_payload(run_dir, job.actors.learner.weight_sync_bytes(), delta)

    eval_path = run_dir / "eval.json"
    evals: dict = json.loads(eval_path.read_text()) if checkpoint is not None and eval_path.is_file() else {}
    if cfg.eval.enabled and "before" not in evals:
        evals["before"] = evaluate(job.actors.workers, job.scorer, job.eval_rows, cfg)
        eval_path.write_text(json.dumps(evals, indent=2))
        job.logger.log_eval(0, evals["before"])
        console.print(f"eval before RL: {_accuracies(evals['before'])}")

    learner_restarts, failures = 0, FailureLog()
    columns = [
        TextColumn("{task.description}"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    ]
    with (
        Progress(*columns, console=console, disable=not cfg.logging.progress) as progress,
        _generation_display(job, progress),
    ):
        bar = progress.add_task("RL step", total=cfg.trainer.steps, completed=step - 1, status="")
        while step <= cfg.trainer.steps:
            try:
                metrics = rl_step(job, step)
                if step == cfg.trainer.steps or (
                    cfg.trainer.checkpoint_every and step % cfg.trainer.checkpoint_every == 0
                ):
                    _checkpoint(job, step)
            except ACTOR_LOST as e:  # a learner is gone (the pools recover workers and reward models themselves)
                learner_restarts += 1
                if learner_restarts > cfg.cluster.max_learner_restarts:
                    raise RuntimeError(
                        f"the learner died {learner_restarts} times (cluster.max_learner_restarts = "
                        f"{cfg.cluster.max_learner_restarts})"
                    ) from e
                checkpoint = latest_checkpoint(run_dir)
                console.print(
                    f"[yellow]learner lost at step {step} ({type(e).__name__}); restarting it from "
                    f"{checkpoint or 'the start of the job'}"
                )
                job.actors.restart_learner(cfg)
                step = _restore(job, checkpoint) + 1
                progress.update(bar, completed=step - 1)
                continue
            metrics |= {**job.actors.restarts(), "learner_restarts": float(learner_restarts)}
            job.logger.log(step, metrics)
            failures.add(step, metrics)
            if status := step_status(metrics):
                console.print(f"[yellow]step {step}: {status}")
            progress.update(bar, completed=step, status=_status(metrics))
            step += 1
    if cfg.eval.enabled:
        evals["after"] = evaluate(job.actors.workers, job.scorer, job.eval_rows, cfg)
        job.logger.log_eval(cfg.trainer.steps, evals["after"])
        eval_path.write_text(json.dumps(evals, indent=2))
        console.print(
            f"held-out accuracy before RL: {_accuracies(evals['before'])}; after RL: {_accuracies(evals['after'])}"
        )
    console.print(f"run directory: {run_dir}")
    failures.check(run_dir)  # every step failed: JobFailed, with what and where to look
    return evals


def _generation_display(job: Job, progress: Progress) -> contextlib.AbstractContextManager:
    """The rollouts' progress during a step under the RL-step bar (`rl.loop.progress`), with `logging.progress`."""
    if not job.cfg.logging.progress:
        return contextlib.nullcontext()
    sink, read = progress_sink(in_process=job.cfg.cluster.backend == "in_process")
    job.actors.workers.set_progress_sink(sink)
    return GenerationDisplay(progress, read)


def _checkpoint(job: Job, step: int) -> None:
    """Save learners, rollout workers, data cursor and the rollouts already started for later steps (their rows
    and samples are drawn, so an exact resume needs them)."""
    pending = job.pipeline.state()
    for _, trajectories in pending:
        fetch_model_scores(trajectories, job.actors.reward_models, job.cfg.reward.models_async)
    controller_state = {"data_cursor": job.sampler.state_dict()}
    save_checkpoint(
        job.run_dir,
        step,
        job.actors.learner,
        job.actors.workers,
        controller_state,
        job.cfg.trainer.keep_checkpoints,
        pending,
    )


def _restore(job: Job, checkpoint: Path | None) -> int:
    """Bring learners, rollout workers, data cursor, the rollouts started ahead and the metrics log back to
    `checkpoint` (None: the job's start); returns its step."""
    actors = job.actors
    actors.workers.drop_in_flight()
    if checkpoint is None:
        actors.workers.load_state(job.start["workers"])
        state = job.start
    else:
        state = restore_checkpoint(checkpoint, actors.learner, actors.workers)
        console.print(f"resuming from {checkpoint} (step {state['step']})")
    job.sampler.load_state_dict(state["data_cursor"])
    job.pipeline.load_state(state.get("pending_rollouts", []))
    job.logger.rewind(state["step"])
    actors.sync_weights(job.cfg, actors.learner.get_version())
    return state["step"]


def _warn_changed_config(path: Path, cfg: JobConfig) -> None:
    """A resume with other settings than the run had is allowed (more steps, a new learning rate) but is no longer
    the same run: say which settings changed (config.yaml then records the new ones)."""
    if not path.is_file():
        return

    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
        return out

    before, now = flat(yaml.safe_load(path.read_text()) or {}), flat(yaml.safe_load(dump_config(cfg)))
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k) and k != "trainer.steps")
    if changed:
        console.print(
            f"[yellow]--resume with settings that differ from the run's config.yaml: "
            f"{', '.join(f'{k}: {before.get(k)!r} -> {now.get(k)!r}' for k in changed)}"
        )


def _report_sync_payload(run_dir: Path, sizes: dict[str, int], delta: bool) -> None:
    """Write weight_sync.json: bytes of a full push, INT4 part against the same weights in bf16 (with LoRA, the
    adapters against a full push of the same model), and whether pushes are deltas (`cluster.weight_sync_delta`:
    each step's bytes are then metrics.jsonl's `sync_bytes`)."""
    sizes = {**sizes, "int4_vs_bf16": sizes["int4_bytes"] / max(sizes["int4_weights_bf16_bytes"], 1), "delta": delta}
    if "lora_adapter_bytes" in sizes:
        sizes["adapter_vs_full"] = sizes["lora_adapter_bytes"] / max(sizes["full_push_bytes"], 1)
    (run_dir / "weight_sync.json").write_text(json.dumps(sizes, indent=2))
    if "lora_adapter_bytes" in sizes:
        console.print(
            f"weight sync: LoRA adapters only, {sizes['lora_adapter_bytes'] / 1e6:.3f} MB per push "
            f"({sizes['adapter_vs_full']:.3f}x a full push of {sizes['full_push_bytes'] / 1e6:.2f} MB)"
        )
        return
    console.print(
        f"weight sync: INT4 weights {sizes['int4_bytes'] / 1e6:.2f} MB ({sizes['int4_vs_bf16']:.3f}x their bf16 size), "
        f"other weights {sizes['dense_bytes'] / 1e6:.2f} MB"
    )


def _status(metrics: dict[str, float]) -> str:
    if "skipped_step" in metrics:
        if metrics["failed_samples"]:
            return f"step skipped: {step_status(metrics)}"
        return f"step skipped: no group finished ({metrics.get('paused_samples', 0):.0f} samples paused)"
    reward, accuracy, mismatch = metrics["reward_mean"], metrics["accuracy"], metrics["mismatch_abs_logp"]
    return f"reward {reward:.3f}  acc {accuracy:.3f}  |Δlogp| {mismatch:.1e}"


def _accuracies(result: dict) -> str:
    text = f"greedy {eval_status(result)}"
    sampled = "accuracy_sampled" in result or "sampled_failed_samples" in result
    return text + (f", sampled {eval_status(result, 'sampled_')}" if sampled else "")
