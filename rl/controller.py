"""The RL job, top to bottom: generate -> score -> advantages -> update -> sync, each timed under its own name.

Everything that is not the loop lives elsewhere: the policy and its warm start (`rl.warmstart`), prompt data
(`rl.data`), rollouts (`rollouts.worker`), rewards (`rewards.scoring`), the update (`rl.learner`), weight sync
(`rl.weights`), checkpoints (`rl.checkpoint`) and metrics (`rl.metrics`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import ray
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from rl.advantages import ADVANTAGES
from rl.checkpoint import latest_checkpoint, restore_checkpoint, save_checkpoint
from rl.cluster import ray_session
from rl.config import JobConfig, dump_config
from rl.data import PromptSampler, load_split
from rl.evaluation import evaluate
from rl.learner import LearnerActor
from rl.metrics import MetricsLogger, StageTimer, rollout_metrics, save_trajectories
from rl.records import TrainBatch
from rl.warmstart import prepare_policy
from rl.weights import WeightSync
from rewards.models import fetch_model_scores, start_reward_models
from rewards.scoring import RewardScorer, ScoringResult
from rollouts.worker import RolloutWorkerActor, generate_step_on_workers

console = Console()


def train(cfg: JobConfig, run_dir: Path, resume: bool = False) -> dict:
    """Run the job into `run_dir`; with `resume`, continue from its latest checkpoint. Returns eval.json's content."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    policy_dir = prepare_policy(cfg, log=console.print)
    with ray_session(cfg.cluster):
        _check_resources(cfg)
        train_rows = load_split(cfg, "train", run_dir / "data")
        eval_rows = load_split(cfg, "eval", run_dir / "data") if cfg.eval.enabled else []
        sampler = PromptSampler(train_rows, cfg.seed, cfg.data.shuffle, cfg.data.sampling, cfg.data.success_ema)
        sampler.check()
        learner = LearnerActor.options(num_cpus=cfg.trainer.learner_cpus).remote(str(policy_dir), cfg)
        workers = [
            RolloutWorkerActor.options(num_cpus=cfg.rollout.cpus_per_worker).remote(str(policy_dir), cfg, i)
            for i in range(cfg.rollout.num_workers)
        ]
        reward_models = start_reward_models(cfg.reward.models)
        if reward_models and cfg.reward.models_async:
            ray.get([w.set_reward_models.remote(reward_models) for w in workers])
        try:
            return _loop(cfg, run_dir, resume, learner, workers, reward_models, sampler, eval_rows)
        finally:
            for actor in [learner, *workers, *reward_models.values()]:
                ray.kill(actor)


def _loop(cfg: JobConfig, run_dir: Path, resume: bool, learner, workers, reward_models: dict, sampler: PromptSampler, eval_rows) -> dict:
    scorer = RewardScorer(cfg.reward)
    advantage_fn = ADVANTAGES.get(cfg.algorithm.advantage)
    sync = WeightSync(workers)
    pad_id = ray.get(workers[0].pad_token_id.remote())
    first_step = 1
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:
        console.print(f"[yellow]--resume: no checkpoint in {run_dir}; starting from step 1")
    if checkpoint is not None:
        state = restore_checkpoint(checkpoint, learner, workers)
        sampler.load_state_dict(state["data_cursor"])
        first_step = state["step"] + 1
        console.print(f"resuming from {checkpoint} (step {state['step']})")
        if cfg.rollout.partial_rollout_budget:
            console.print("[yellow]partial rollouts paused before the checkpoint are not saved in it yet; their prompts are dropped")
    sync.publish(learner.get_weights.remote(), ray.get(learner.get_version.remote()))
    if cfg.quant.enabled:
        _report_sync_payload(run_dir, ray.get(learner.weight_sync_bytes.remote()))

    eval_path = run_dir / "eval.json"
    evals: dict = json.loads(eval_path.read_text()) if checkpoint is not None and eval_path.is_file() else {}
    if cfg.eval.enabled and "before" not in evals:
        evals["before"] = evaluate(workers, scorer, eval_rows, cfg)
        eval_path.write_text(json.dumps(evals, indent=2))
        console.print(f"eval before RL: {_accuracies(evals['before'])}")

    logger = MetricsLogger(run_dir, cfg.logging.tensorboard)
    columns = [TextColumn("RL step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not cfg.logging.progress) as progress:
        bar = progress.add_task("rl", total=cfg.trainer.steps, completed=first_step - 1, status="")
        for step in range(first_step, cfg.trainer.steps + 1):
            timer = StageTimer()
            result, sampling_metrics = _rollouts(cfg, step, sampler, workers, reward_models, scorer, timer)
            if cfg.logging.save_trajectories and result.scored:
                save_trajectories(run_dir / "trajectories" / f"step_{step:06d}.jsonl", result.scored)
            if result.scored:
                metrics = _learn(cfg, result.scored, advantage_fn, pad_id, learner, sync, timer, rollout_temperature(cfg, step))
            else:  # every sample failed (each counted and logged by the scorer): nothing to learn from this step
                metrics = {"skipped_step": 1.0}  # also: every group still paused (partial rollouts)
            metrics.update({"failed_samples": float(result.failed), **result.metrics, **sampling_metrics, **timer.times, "time_step_s": sum(timer.times.values())})
            if cfg.rollout.partial_rollout_budget:
                metrics["paused_samples"] = float(sum(ray.get([w.num_paused.remote() for w in workers])))
            if cfg.eval.enabled and cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.trainer.steps:
                metrics.update({f"eval/{k}": v for k, v in evaluate(workers, scorer, eval_rows, cfg).items()})
            logger.log(step, metrics)
            progress.update(bar, advance=1, status=_status(metrics))
            if step == cfg.trainer.steps or (cfg.trainer.checkpoint_every and step % cfg.trainer.checkpoint_every == 0):
                save_checkpoint(run_dir, step, learner, workers, {"data_cursor": sampler.state_dict()}, cfg.trainer.keep_checkpoints)
    logger.close()

    if cfg.eval.enabled:
        evals["after"] = evaluate(workers, scorer, eval_rows, cfg)
        eval_path.write_text(json.dumps(evals, indent=2))
        console.print(f"held-out accuracy before RL: {_accuracies(evals['before'])}; after RL: {_accuracies(evals['after'])}")
    console.print(f"run directory: {run_dir}")
    return evals


def _rollouts(cfg: JobConfig, step: int, sampler: PromptSampler, workers, reward_models: dict, scorer: RewardScorer, timer: StageTimer) -> tuple[ScoringResult, dict[str, float]]:
    """Generate and score one step's batch.

    With `algorithm.dynamic_sampling` (DAPO), groups whose samples all got the same reward (no learning signal)
    are dropped and new prompts are drawn to replace them, for at most `dynamic_sampling_max_rounds` extra rounds;
    the batch keeps at most `trainer.prompts_per_step` groups.
    """
    want, rounds = cfg.trainer.prompts_per_step, cfg.algorithm.dynamic_sampling_max_rounds if cfg.algorithm.dynamic_sampling else 0
    kept: list = []
    failed, dropped, counts = 0, 0, Counter()
    for round_ in range(rounds + 1):
        missing = want - len({s.trajectory.group_id for s in kept})
        if missing <= 0:
            break
        rows = sampler.next(missing)
        with timer("generate"):
            first_group = ((step - 1) * (rounds + 1) + round_) * want  # unique across steps and rounds
            trajectories = generate_step_on_workers(
                workers, rows, first_group, cfg.rollout.samples_per_prompt, cfg.rollout.partial_rollout_budget, rollout_temperature(cfg, step)
            )
        with timer("score"):
            fetch_model_scores(trajectories, reward_models, cfg.reward.models_async)
            result = scorer.score(trajectories, step)
        if cfg.data.sampling == "prioritized":
            sampler.update(_accuracy_by_row(result.scored))
        failed += result.failed
        counts.update(result.metrics)
        groups: dict[int, list] = {}
        for s in result.scored:
            groups.setdefault(s.trajectory.group_id, []).append(s)
        for members in groups.values():
            if cfg.algorithm.dynamic_sampling and len({s.reward for s in members}) == 1:
                dropped += 1
            else:
                kept.extend(members)
        if not cfg.algorithm.dynamic_sampling:
            break
    keep_ids = set(list(dict.fromkeys(s.trajectory.group_id for s in kept))[:want])
    kept = [s for s in kept if s.trajectory.group_id in keep_ids]
    extra = {"dropped_groups": float(dropped), "sampling_rounds": float(round_ + 1)} if cfg.algorithm.dynamic_sampling else {}
    return ScoringResult(scored=kept, failed=failed, metrics=dict(counts)), extra


def _learn(cfg: JobConfig, scored, advantage_fn, pad_id: int, learner, sync: WeightSync, timer: StageTimer, temperature: float) -> dict[str, float]:
    """Advantages -> one learner update -> weights pushed to the rollout workers; returns the step's metrics."""
    extra: dict[str, float] = {}
    with timer("advantages"):
        rewards = torch.tensor([s.reward for s in scored])
        groups = torch.tensor([s.trajectory.group_id for s in scored])
        lengths = torch.tensor([s.trajectory.response_length for s in scored])
        batch = TrainBatch.from_scored(scored, torch.zeros(len(scored)), pad_id, temperature)
        if cfg.algorithm.kl_coef > 0 and cfg.algorithm.kl_in == "reward":  # KL to the reference as a reward penalty
            kl = ray.get(learner.reference_kl.remote(batch))  # [batch], summed over each sample's policy tokens
            rewards = rewards - cfg.algorithm.kl_coef * kl
            extra["kl_reward_penalty"] = float(cfg.algorithm.kl_coef * kl.mean())
        advantages = advantage_fn(rewards, groups, normalize_by_std=cfg.algorithm.normalize_by_std, lengths=lengths)
        batch.advantages = advantages.to(torch.float32)[:, None] * batch.loss_mask
    with timer("update"):
        train_metrics = ray.get(learner.train_step.remote(batch))
    with timer("sync"):
        sync.publish(learner.get_weights.remote(), int(train_metrics["policy_version"]))
    return {**rollout_metrics(scored), **train_metrics, **extra, "temperature": temperature}


def _check_resources(cfg: JobConfig) -> None:
    """Fail before starting actors that could never all be placed (Ray would wait for them forever)."""
    needs = {
        "CPU": {"trainer.learner_cpus": cfg.trainer.learner_cpus, "rollout.cpus_per_worker x num_workers": cfg.rollout.cpus_per_worker * cfg.rollout.num_workers,
                **{f"reward.models[{m.name}].num_cpus": m.num_cpus for m in cfg.reward.models}},
        "GPU": {f"reward.models[{m.name}].num_gpus": m.num_gpus for m in cfg.reward.models if m.num_gpus},
    }
    have = ray.cluster_resources()
    for resource, parts in needs.items():
        need = sum(parts.values())
        if need > have.get(resource, 0.0) + 1e-9:
            detail = ", ".join(f"{k} {v:g}" for k, v in parts.items())
            raise RuntimeError(
                f"the job needs {need:g} {resource}s ({detail}) but the Ray cluster has {have.get(resource, 0.0):g}: lower those, "
                f"or give the local instance more with cluster.num_cpus (logical CPUs may exceed the cores)"
            )


def rollout_temperature(cfg: JobConfig, step: int) -> float:
    """The sampling temperature of RL step `step` (1-based): constant, or the linear decay of the schedule."""
    r = cfg.rollout
    if r.temperature_final is None:
        return r.temperature
    progress = min(1.0, (step - 1) / r.temperature_decay_steps)
    return r.temperature + (r.temperature_final - r.temperature) * progress


def _accuracy_by_row(scored) -> dict[int, float]:
    """Share of each prompt's scored samples judged correct (prompts by their row index)."""
    hits: dict[int, list[bool]] = {}
    for s in scored:
        hits.setdefault(s.trajectory.row.index, []).append(s.correct)
    return {i: sum(h) / len(h) for i, h in hits.items()}


def _report_sync_payload(run_dir: Path, sizes: dict[str, int]) -> None:
    """Write weight_sync.json: bytes per push, INT4 part against the same weights in bf16."""
    sizes = {**sizes, "int4_vs_bf16": sizes["int4_bytes"] / max(sizes["int4_weights_bf16_bytes"], 1)}
    (run_dir / "weight_sync.json").write_text(json.dumps(sizes, indent=2))
    console.print(
        f"weight sync: INT4 weights {sizes['int4_bytes'] / 1e6:.2f} MB ({sizes['int4_vs_bf16']:.3f}x their bf16 size), "
        f"other weights {sizes['dense_bytes'] / 1e6:.2f} MB"
    )


def _status(metrics: dict[str, float]) -> str:
    if "skipped_step" in metrics:
        if metrics["failed_samples"]:
            return f"step skipped: all {metrics['failed_samples']:.0f} samples failed"
        return f"step skipped: no group finished ({metrics.get('paused_samples', 0):.0f} samples paused)"
    return f"reward {metrics['reward_mean']:.3f}  acc {metrics['accuracy']:.3f}  |Δlogp| {metrics['mismatch_abs_logp']:.1e}"


def _accuracies(result: dict) -> str:
    text = f"greedy {result['accuracy']:.3f}"
    return text + (f", sampled {result['accuracy_sampled']:.3f}" if "accuracy_sampled" in result else "")
