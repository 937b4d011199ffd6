"""The RL job, top to bottom: generate -> score -> advantages -> update -> sync, each timed under its own name.

Everything that is not the loop lives elsewhere: the policy and its warm start (`rl.warmstart`), prompt data
(`rl.data`), actor placement (`rl.placement`), rollouts and their recovery (`rollouts.pool`), rewards
(`rewards.scoring`, `rewards.models`), the update (`rl.learner_group`, `rl.learner`), checkpoints
(`rl.checkpoint`) and metrics (`rl.metrics`).

Faults: a rollout worker or reward model that dies is restarted by its pool within the step (no sample lost or
counted twice); a learner that dies is restarted and the job goes back to the last checkpoint (or its start),
restoring weights, optimizer, RNG states, data position and paused rollouts, then goes on.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from rewards.models import RewardModelPool, fetch_model_scores, reward_model_item
from rewards.scoring import RewardScorer, ScoringResult
from rl.config import JobConfig, dump_config
from rl.launch.cluster import ray_session
from rl.launch.placement import Placement, place
from rl.loop.checkpoint import latest_checkpoint, restore_checkpoint, save_checkpoint
from rl.loop.data import PromptSampler, load_split
from rl.loop.evaluation import evaluate
from rl.loop.metrics import MetricsLogger, StageTimer, rollout_metrics, save_trajectories
from rl.loop.pipeline import RolloutPipeline
from rl.policy.warmstart import prepare_policy
from rl.trainer.advantages import ADVANTAGES
from rl.trainer.batch import TrainBatch
from rl.trainer.learner_group import LearnerGroup
from rollouts.actors import ACTOR_LOST
from rollouts.pool import RolloutPool
from rollouts.shipping import ShippedDir, ship_dir
from rollouts.worker import RolloutWorkerActor

console = Console()


@dataclass
class Actors:
    """The job's actors, placed in one placement group."""

    learner: LearnerGroup
    workers: RolloutPool
    reward_models: RewardModelPool
    placement: Placement
    policy: ShippedDir

    @staticmethod
    def start(cfg: JobConfig, policy_dir: Path, placement: Placement) -> Actors:
        policy = ship_dir(policy_dir, int(cfg.cluster.ship_max_mb * 2**20))  # actors on nodes without the driver's disk
        learner = LearnerGroup(policy, cfg, placement)
        start_worker = lambda i: RolloutWorkerActor.options(**placement.options("rollout", i)).remote(policy, cfg.worker_spec(), i)  # noqa: E731
        workers = RolloutPool(start_worker, cfg.rollout.num_workers, cfg.cluster.max_worker_restarts)
        reward_models = RewardModelPool(cfg.reward.models, lambda i: placement.options("reward_model", i), cfg.cluster.max_worker_restarts)
        if reward_models.actors and cfg.reward.models_async:
            workers.set_reward_models(reward_models.actors, reward_model_item)
        return Actors(learner, workers, reward_models, placement, policy)

    def sync_weights(self, cfg: JobConfig, version: int) -> None:
        """Push the learners' weights (rank 0's) to every rollout worker as policy `version`."""
        if cfg.cluster.weight_sync == "collective":
            backend = "nccl" if cfg.trainer.learner_gpus > 0 and cfg.rollout.gpus_per_worker > 0 else "gloo"
            self.workers.broadcast_from(self.learner.actors[0], version, backend)
        else:
            self.workers.publish(self.learner.get_weights(), version)

    def restart_learner(self, cfg: JobConfig) -> None:
        self.learner.kill()
        self.learner = LearnerGroup(self.policy, cfg, self.placement)

    def kill(self) -> None:
        for part in (self.learner, self.workers, self.reward_models):
            part.kill()
        self.placement.remove()


def train(cfg: JobConfig, run_dir: Path, resume: bool = False) -> dict:
    """Run the job into `run_dir`; with `resume`, continue from its latest checkpoint. Returns eval.json's content."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        _warn_changed_config(run_dir / "config.yaml", cfg)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    policy_dir = prepare_policy(cfg, log=console.print)
    with ray_session(cfg.cluster):
        train_rows = load_split(cfg, "train", run_dir / "data")
        eval_rows = load_split(cfg, "eval", run_dir / "data") if cfg.eval.enabled else []
        sampler = PromptSampler(train_rows, cfg.seed, cfg.data.shuffle, cfg.data.sampling, cfg.data.success_ema)
        sampler.check()
        actors = Actors.start(cfg, policy_dir, place(cfg))
        try:
            return _loop(cfg, run_dir, resume, actors, sampler, eval_rows)
        finally:
            actors.kill()


def _loop(cfg: JobConfig, run_dir: Path, resume: bool, actors: Actors, sampler: PromptSampler, eval_rows) -> dict:
    scorer = RewardScorer(cfg.reward)
    advantage_fn = ADVANTAGES.get(cfg.algorithm.advantage)
    pad_id = actors.workers.pad_token_id()
    logger = MetricsLogger(run_dir, cfg.logging.tensorboard)
    start = {"step": 0, "data_cursor": sampler.state_dict(), "workers": actors.workers.state(), "pending_rollouts": []}  # where a learner lost before any checkpoint goes back to
    pipeline = RolloutPipeline(cfg, actors.workers, sampler, lambda k: first_group_id(cfg, k), lambda k: rollout_temperature(cfg, k))
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:
        console.print(f"[yellow]--resume: no checkpoint in {run_dir}; starting from step 1")
    step = _restore(cfg, checkpoint, actors, sampler, pipeline, logger, start) + 1 if checkpoint is not None else 1
    if checkpoint is None:
        actors.sync_weights(cfg, actors.learner.get_version())
    if cfg.quant.enabled:
        _report_sync_payload(run_dir, actors.learner.weight_sync_bytes())

    eval_path = run_dir / "eval.json"
    evals: dict = json.loads(eval_path.read_text()) if checkpoint is not None and eval_path.is_file() else {}
    if cfg.eval.enabled and "before" not in evals:
        evals["before"] = evaluate(actors.workers, scorer, eval_rows, cfg)
        eval_path.write_text(json.dumps(evals, indent=2))
        console.print(f"eval before RL: {_accuracies(evals['before'])}")

    learner_restarts = 0
    columns = [TextColumn("RL step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not cfg.logging.progress) as progress:
        bar = progress.add_task("rl", total=cfg.trainer.steps, completed=step - 1, status="")
        while step <= cfg.trainer.steps:
            try:
                metrics = _step(cfg, step, run_dir, actors, sampler, pipeline, scorer, advantage_fn, pad_id, eval_rows)
                if step == cfg.trainer.steps or (cfg.trainer.checkpoint_every and step % cfg.trainer.checkpoint_every == 0):
                    pending = pipeline.state()  # the steps already started: their rows and samples are drawn
                    for _, trajectories in pending:
                        fetch_model_scores(trajectories, actors.reward_models, cfg.reward.models_async)
                    save_checkpoint(
                        run_dir, step, actors.learner, actors.workers, {"data_cursor": sampler.state_dict()}, cfg.trainer.keep_checkpoints, pending
                    )
            except ACTOR_LOST as e:  # a learner is gone (the pools recover workers and reward models themselves)
                learner_restarts += 1
                if learner_restarts > cfg.cluster.max_learner_restarts:
                    raise RuntimeError(f"the learner died {learner_restarts} times (cluster.max_learner_restarts = {cfg.cluster.max_learner_restarts})") from e
                checkpoint = latest_checkpoint(run_dir)
                console.print(f"[yellow]learner lost at step {step} ({type(e).__name__}); restarting it from {checkpoint or 'the start of the job'}")
                actors.restart_learner(cfg)
                step = _restore(cfg, checkpoint, actors, sampler, pipeline, logger, start) + 1
                progress.update(bar, completed=step - 1)
                continue
            metrics |= {"worker_restarts": float(actors.workers.restarts), "reward_model_restarts": float(actors.reward_models.restarts), "learner_restarts": float(learner_restarts)}
            logger.log(step, metrics)
            progress.update(bar, completed=step, status=_status(metrics))
            step += 1
    logger.close()

    if cfg.eval.enabled:
        evals["after"] = evaluate(actors.workers, scorer, eval_rows, cfg)
        eval_path.write_text(json.dumps(evals, indent=2))
        console.print(f"held-out accuracy before RL: {_accuracies(evals['before'])}; after RL: {_accuracies(evals['after'])}")
    console.print(f"run directory: {run_dir}")
    return evals


def _step(
    cfg: JobConfig, step: int, run_dir: Path, actors: Actors, sampler: PromptSampler, pipeline: RolloutPipeline, scorer: RewardScorer, advantage_fn, pad_id: int, eval_rows
) -> dict[str, float]:
    """One RL step; returns its metrics."""
    timer = StageTimer()
    result, sampling_metrics = _rollouts(cfg, step, sampler, pipeline, actors, scorer, timer)
    if cfg.logging.save_trajectories and result.scored:
        save_trajectories(run_dir / "trajectories" / f"step_{step:06d}.jsonl", result.scored)
    if result.scored:
        metrics = _learn(cfg, result.scored, advantage_fn, pad_id, actors, timer, rollout_temperature(cfg, step))
    else:  # every sample failed (each counted and logged by the scorer): nothing to learn from this step
        metrics = {"skipped_step": 1.0}  # also: every group still paused (partial rollouts)
    metrics.update({"failed_samples": float(result.failed), **result.metrics, **sampling_metrics, **timer.times, "time_step_s": sum(timer.times.values())})
    metrics["rollout_steps_ahead"] = float(pipeline.in_flight)
    if cfg.rollout.partial_rollout_budget:
        metrics["paused_samples"] = float(actors.workers.num_paused())
    if cfg.eval.enabled and cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.trainer.steps:
        metrics.update({f"eval/{k}": v for k, v in evaluate(actors.workers, scorer, eval_rows, cfg).items()})
    return metrics


def _restore(
    cfg: JobConfig, checkpoint: Path | None, actors: Actors, sampler: PromptSampler, pipeline: RolloutPipeline, logger: MetricsLogger, start: dict[str, Any]
) -> int:
    """Bring learners, rollout workers, data cursor, the rollouts started ahead and the metrics log back to
    `checkpoint` (None: the job's start); returns its step."""
    actors.workers.drop_in_flight()
    if checkpoint is None:
        actors.workers.load_state(start["workers"])
        state = start
    else:
        state = restore_checkpoint(checkpoint, actors.learner, actors.workers)
        console.print(f"resuming from {checkpoint} (step {state['step']})")
    sampler.load_state_dict(state["data_cursor"])
    pipeline.load_state(state.get("pending_rollouts", []))
    logger.rewind(state["step"])
    actors.sync_weights(cfg, actors.learner.get_version())
    return state["step"]


def _rollouts(
    cfg: JobConfig, step: int, sampler: PromptSampler, pipeline: RolloutPipeline, actors: Actors, scorer: RewardScorer, timer: StageTimer
) -> tuple[ScoringResult, dict[str, float]]:
    """Collect (the pipeline started them, up to `rollout.max_staleness` steps ago) and score one step's batch.

    With `algorithm.dynamic_sampling` (DAPO), groups whose samples all got the same reward (no learning signal)
    are dropped and new prompts are drawn to replace them, for at most `dynamic_sampling_max_rounds` extra rounds
    (generated at once, with the current weights); the batch keeps at most `trainer.prompts_per_step` groups.
    """
    want, rounds = cfg.trainer.prompts_per_step, cfg.algorithm.dynamic_sampling_max_rounds if cfg.algorithm.dynamic_sampling else 0
    kept: list = []
    failed, dropped, counts = 0, 0, Counter()
    for round_ in range(rounds + 1):
        missing = want - len({s.trajectory.group_id for s in kept})
        if missing <= 0:
            break
        with timer("generate"):
            if round_ == 0:
                trajectories = pipeline.take(step)
            else:
                trajectories = actors.workers.generate_step(
                    sampler.next(missing), first_group_id(cfg, step, round_), cfg.rollout.samples_per_prompt, cfg.rollout.partial_rollout_budget, rollout_temperature(cfg, step)
                )
        with timer("score"):
            fetch_model_scores(trajectories, actors.reward_models, cfg.reward.models_async)
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


def _learn(cfg: JobConfig, scored, advantage_fn, pad_id: int, actors: Actors, timer: StageTimer, temperature: float) -> dict[str, float]:
    """Advantages -> one learner update -> weights pushed to the rollout workers; returns the step's metrics."""
    extra: dict[str, float] = {}
    with timer("advantages"):
        rewards = torch.tensor([s.reward for s in scored])
        groups = torch.tensor([s.trajectory.group_id for s in scored])
        lengths = torch.tensor([s.trajectory.response_length for s in scored])
        batch = TrainBatch.from_scored(scored, torch.zeros(len(scored)), pad_id, temperature)
        if cfg.algorithm.kl_coef > 0 and cfg.algorithm.kl_in == "reward":  # KL to the reference as a reward penalty
            kl = actors.learner.reference_kl(batch)  # [batch], summed over each sample's policy tokens
            rewards = rewards - cfg.algorithm.kl_coef * kl
            extra["kl_reward_penalty"] = float(cfg.algorithm.kl_coef * kl.mean())
        advantages = advantage_fn(rewards, groups, normalize_by_std=cfg.algorithm.normalize_by_std, lengths=lengths)
        batch.advantages = advantages.to(torch.float32)[:, None] * batch.loss_mask
    with timer("update"):
        train_metrics = actors.learner.train_step(batch)
    with timer("sync"):
        actors.sync_weights(cfg, int(train_metrics["policy_version"]))
    return {**rollout_metrics(scored), **train_metrics, **extra, "temperature": temperature}


def first_group_id(cfg: JobConfig, step: int, round_: int = 0) -> int:
    """Group id of the first prompt of RL step `step` (1-based), dynamic-sampling round `round_`: unique across
    steps and rounds."""
    rounds = cfg.algorithm.dynamic_sampling_max_rounds + 1 if cfg.algorithm.dynamic_sampling else 1
    return ((step - 1) * rounds + round_) * cfg.trainer.prompts_per_step


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


def _warn_changed_config(path: Path, cfg: JobConfig) -> None:
    """A resume with other settings than the run had is allowed (more steps, a new learning rate) but is no longer
    the same run: say which settings changed (config.yaml then records the new ones)."""
    if not path.is_file():
        return
    import yaml

    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
        return out

    before, now = flat(yaml.safe_load(path.read_text()) or {}), flat(yaml.safe_load(dump_config(cfg)))
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k) and k != "trainer.steps")
    if changed:
        console.print(f"[yellow]--resume with settings that differ from the run's config.yaml: {', '.join(f'{k}: {before.get(k)!r} -> {now.get(k)!r}' for k in changed)}")


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
