"""Job configuration: one YAML per job, validated into nested typed models before anything starts.

Each package owns its sections (`envs.config`, `rollouts.config`, `rewards.config`, `rl.trainer.config`); this
module owns the job's own (warm start, data, eval, cluster, logging) and composes them into `JobConfig`.
`load_config(path, overrides)` reads the YAML, applies `key.sub=value` overrides, and validates. Every mistake
(unknown key, wrong type, out-of-range value, missing section) raises `ConfigError` naming the dotted key and,
for an unknown key, the closest valid spelling. These modules import only pydantic and yaml, so a bad config
fails in well under a second, before Ray or torch are touched.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from envs.config import EnvConfig, Section
from envs.registry import RegistryError
from rewards.config import RewardConfig
from rl.tasks.registry import check_task_name
from rl.trainer.config import AlgorithmConfig, LearnerSpec, TrainerConfig
from rollouts.config import ModelConfig, QuantConfig, RolloutConfig

if TYPE_CHECKING:
    from rollouts.worker import WorkerSpec


class ConfigError(ValueError):
    """The job config is invalid; the message names the key and what to do."""


class WarmStartConfig(Section):
    """Supervised warm start on generated demonstrations, built once and cached."""

    enabled: bool = Field(True, description="Run the warm start before RL (built-in task and model only).")
    num_demos: int = Field(6000, ge=1, description="Generated demonstrations.")
    tool_use_rate: float = Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="Share of demonstrations that call the tool; the rest answer unaided (imperfect on purpose).",
    )
    teacher_mistakes: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="A task with a teacher: share of its tool calls made with one digit changed, never trained on "
        "(the environment answers them with an error): the policy learns the correction the teacher makes next.",
    )
    steps: int = Field(
        1200, ge=1, description="Most optimizer steps (the warm start stops earlier once the policy copies numbers)."
    )
    target_copy_accuracy: float = Field(
        0.9,
        ge=0,
        le=1.0,
        description="Held-out teacher-forced accuracy on the digits the policy writes that ends the constant-LR phase "
        "(0: anneal from the first check).",
    )
    check_every: int = Field(50, ge=1, description="Steps between copy-accuracy checks.")
    attempts: int = Field(
        3,
        ge=1,
        description="Tries of the warm start: one that ends at `steps` below the target restarts from a fresh "
        "initialization (seed + 1000 x try); if none reaches it, the best-copying one ships, with a warning.",
    )
    anneal_steps: int = Field(150, ge=1, description="Linear learning-rate decay to zero once the target is reached.")
    batch_size: int = Field(32, ge=1, description="Demonstrations per optimizer step.")
    lr: float = Field(4e-3, gt=0, description="AdamW learning rate (20 warmup steps, constant, then the anneal).")
    cache_dir: str | None = Field(
        None, description="Where built policies are cached; default $TIDERL_CACHE or ~/.cache/tiderl."
    )


class Int4RecoveryConfig(Section):
    """INT4 recovery before RL (`rl.policy.recovery`): the QAT policy is distilled from its own full-precision
    weights on the full-precision model's samples of the training prompts (LLM-QAT's data-free distillation), built
    once and cached. For a model whose INT4 round trip loses the accuracy RL needs to start from."""

    steps: int = Field(
        0, ge=0, description="Distillation steps (0 = off). Needs quant.enabled; QAT and PTQ share the result."
    )
    prompts: int = Field(256, ge=1, description="Training prompts the full-precision model samples once each.")
    batch_size: int = Field(16, ge=1, description="Teacher samples per optimizer step.")
    micro_batch_size: int = Field(
        4,
        ge=1,
        description="Samples per forward: bounds the activations and the sampled tokens' full-vocabulary logits in "
        "memory (the whole sequences' logits for a model whose logits are not its output embedding of its last "
        "hidden state).",
    )
    lr: float = Field(2e-5, gt=0, description="AdamW learning rate, decayed linearly to zero over `steps`.")


class DataConfig(Section):
    """Prompts, in verl's layout (`prompt`, `data_source`, `reward_model.ground_truth`, `extra_info`)."""

    task: str | None = Field(
        "calculator",
        description="Registered generated task (built in: calculator, python_math, search_qa; or "
        "'path/to/file.py:TASK'); pair it with its environment and reward (rl/tasks/); null when "
        "`train_files` is set.",
    )
    train_files: list[str] = Field(
        default_factory=list, description="jsonl/parquet files or saved datasets for training."
    )
    eval_files: list[str] = Field(default_factory=list, description="Held-out files for eval.")
    train_size: int = Field(20000, ge=1, description="Generated training prompts (built-in task).")
    eval_size: int = Field(256, ge=1, description="Held-out prompts for eval (built-in task, or a cap on eval_files).")
    shuffle: bool = Field(True, description="Reshuffle training prompts every epoch.")
    sampling: Literal["epoch", "prioritized", "curriculum"] = Field(
        "epoch",
        description="epoch: every prompt once per epoch; prioritized (K1.5): draw prompts with probability "
        "proportional to 1 - their tracked success rate (unseen prompts count as 0), so solved prompts "
        "fade and hard ones return; curriculum (K1.5): each epoch walks the prompts from easy to hard by "
        "`extra_info.difficulty` (a number).",
    )
    success_ema: float = Field(
        0.5,
        gt=0,
        le=1,
        description="prioritized: weight of the newest step's accuracy in a prompt's tracked success rate.",
    )

    @model_validator(mode="after")
    def _check_source(self) -> DataConfig:
        if self.task is None and not self.train_files:
            raise ValueError("set `data.task` to a built-in task or give `data.train_files`")
        if self.task is not None:
            try:
                check_task_name(self.task)
            except RegistryError as e:
                raise ValueError(str(e)) from None
        return self


class EvalConfig(Section):
    """Held-out evaluation before and after RL."""

    enabled: bool = Field(True, description="Evaluate before and after RL (writes eval.json).")
    every: int = Field(0, ge=0, description="Also evaluate every N steps (0 = never).")
    sampled: bool = Field(True, description="Also report accuracy of one sample per prompt at the rollout temperature.")


class ClusterConfig(Section):
    """Where the job runs, how its actors are placed, and what `tiderl submit` ships with it."""

    backend: Literal["ray", "in_process"] = Field(
        "ray",
        description="ray: rollout workers, learners and reward models are Ray actors (local instance or cluster); "
        "in_process: one learner and the rollout workers as objects of this process, no Ray (debugging, fast tests).",
    )
    address: str | None = Field(
        None,
        description="Ray cluster (GCS) address to connect to, e.g. HEAD:6379 or auto; unset = the cluster of a "
        "submitted job (RAY_ADDRESS), else start a local Ray instance.",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray instance (default: all).")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="Ray placement-group strategy for the job's bundles (one per learner, rollout worker and reward "
        "model).",
    )
    placement_timeout_s: float = Field(
        60.0, gt=0, description="Seconds to wait for the placement group before failing with what could not be placed."
    )
    weight_sync: Literal["object_store", "collective"] = Field(
        "object_store",
        description="How weights reach the rollout workers each step: object_store (put once, every worker pulls; one "
        "node, CPU workers) or collective (learner rank 0 broadcasts one buffer: NCCL when learners and "
        "workers have GPUs, else gloo).",
    )
    weight_sync_delta: bool = Field(
        True,
        description="Push only the INT4 groups and full-precision tensors that changed since the push each rollout "
        "worker holds (a full push to a worker that missed one, a new or restarted worker, a resumed job); the "
        "workers reconstruct the full push bit for bit. LoRA pushes stay adapters only. See docs/speed.md.",
    )
    ship_max_mb: float = Field(
        2048.0,
        ge=0,
        description="The driver ships the policy directory to actors through the object store when it is at most this "
        "big (nodes without a shared filesystem); a bigger one must be at the same path on every node.",
    )
    max_worker_restarts: int = Field(
        3, ge=0, description="Restarts of a dead rollout worker or reward-model actor per RL step before the job fails."
    )
    max_learner_restarts: int = Field(
        2, ge=0, description="Times a failed learner is restored from the last checkpoint before the job fails."
    )
    pip: list[str] = Field(
        default_factory=list, description="tiderl submit: pip requirements installed in the job's runtime environment."
    )
    env_vars: dict[str, str] = Field(
        default_factory=dict, description="tiderl submit: environment variables of the job's processes."
    )
    excludes: list[str] = Field(
        default_factory=list,
        description="tiderl submit: extra gitignore-style patterns left out of the uploaded working directory.",
    )


class LoggingConfig(Section):
    """Where a job's metrics and samples go besides metrics.jsonl (`rl.loop.trackers`, `rl.loop.samples`)."""

    trackers: list[Literal["tensorboard", "wandb", "trackio", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Experiment trackers that receive every step's metrics, the resolved config and the kept samples "
        "as a table, offline by default: tensorboard (event files in the run directory), wandb (offline run in "
        "RUN_DIR/wandb unless WANDB_MODE is set), trackio (local project), mlflow (file store RUN_DIR/mlruns unless "
        "MLFLOW_TRACKING_URI is set). All but tensorboard are extras: pip install -e '.[wandb]'.",
    )
    project: str = Field("tiderl", description="The W&B / trackio project and MLflow experiment the run logs to.")
    progress: bool = Field(
        True, description="Show a progress bar with the live reward, and the rollouts' progress during a step."
    )
    save_trajectories: bool = Field(
        True,
        description="Write every step's samples to trajectories/step_N.jsonl (conversation, reward breakdown, "
        "status, advantage; the failed ones with why), what `tiderl view` shows.",
    )
    samples_per_step: int = Field(
        8,
        ge=0,
        description="Samples per step kept with their tokens (the best and the worst of a few prompts): the rollout's "
        "and the learner's logprob of each token, its advantage and what the token mask or IS correction cut; "
        "in trajectories/ and the trackers' sample tables.",
    )

    @model_validator(mode="before")
    @classmethod
    def _tensorboard_flag(cls, data: Any) -> Any:
        """`tensorboard: true/false`, the key before `trackers` (run directories of older versions keep it)."""
        if isinstance(data, dict) and "tensorboard" in data:
            data = dict(data)
            flag = data.pop("tensorboard")
            trackers = [t for t in data.get("trackers", ["tensorboard"]) if t != "tensorboard"]
            data["trackers"] = (["tensorboard"] if flag else []) + trackers
        return data


class JobConfig(Section):
    """A whole RL job."""

    seed: int = Field(0, description="Seed for data order, sampling and initialization.")
    model: ModelConfig
    warm_start: WarmStartConfig = Field(default_factory=WarmStartConfig)
    int4_recovery: Int4RecoveryConfig = Field(default_factory=Int4RecoveryConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    def learner_spec(self) -> LearnerSpec:
        """The sections a learner reads (it never sees the rest of the job)."""
        r = self.rollout
        return LearnerSpec(
            model=self.model,
            trainer=self.trainer,
            algorithm=self.algorithm,
            quant=self.quant,
            seed=self.seed,
            temperature=r.temperature,
            max_tokens_per_sample=r.max_tokens_per_sample,
            cache_dir=self.warm_start.cache_dir,
        )

    def worker_spec(self) -> WorkerSpec:
        """The sections a rollout worker reads (it never sees the rest of the job)."""
        from rollouts.worker import WorkerSpec  # torch and the engine load only when a worker is built

        rollout = self.rollout
        if rollout.matmul_dtype == "auto":  # the engine computes as the learner does
            rollout = rollout.model_copy(update={"matmul_dtype": self.trainer.compute_dtype})
        return WorkerSpec(
            model=self.model,
            rollout=rollout,
            env=self.env,
            quant=self.quant,
            seed=self.seed,
            cache_dir=self.warm_start.cache_dir,
            lora=self.trainer.lora,
            record_routing=self.algorithm.routing_replay != "off",
        )

    @model_validator(mode="after")
    def _check_in_process(self) -> JobConfig:
        if self.cluster.backend != "in_process":
            return self
        needs_ray = {
            "trainer.num_learners": self.trainer.num_learners != 1,
            "reward.models": bool(self.reward.models),
            "cluster.weight_sync": self.cluster.weight_sync != "object_store",
            "cluster.address": self.cluster.address is not None,
        }
        if any(needs_ray.values()):
            keys = ", ".join(k for k, v in needs_ray.items() if v)
            raise ValueError(f"cluster.backend=in_process runs without Ray; {keys} need the ray backend")
        return self

    @model_validator(mode="after")
    def _check_int4_recovery(self) -> JobConfig:
        # Recovery distils the INT4 round trip (through fake-quant) whatever the RL learner does after it, so PTQ
        # may start from the same recovered weights as QAT: the two then differ only in the learner's fake-quant.
        if self.int4_recovery.steps and not self.quant.enabled:
            raise ValueError(
                f"int4_recovery.steps={self.int4_recovery.steps} distils the INT4 policy; it needs quant.enabled=true: "
                "set int4_recovery.steps=0 for a full-precision job"
            )
        return self

    @model_validator(mode="after")
    def _check_eval_data(self) -> JobConfig:
        if self.eval.enabled and self.data.task is None and not self.data.eval_files:
            raise ValueError(
                "eval is enabled but there is no held-out data: set `data.eval_files`, or `eval.enabled=false`"
            )
        return self


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read a YAML job config, apply `key.sub=value` overrides, validate. Raises ConfigError."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded or {}
    for item in overrides:
        apply_override(raw, item)
    return validate_config(raw, source=str(path) if path else "<overrides>")


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `key.sub=value` in the raw mapping; the value is parsed as YAML (`3`, `1e-4`, `true`, `[a, b]`)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, value_text = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty key segment in {key!r}")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot parse value: {e}") from e
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def validate_config(raw: dict[str, Any], source: str = "<config>") -> JobConfig:
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as e:
        lines = [_describe(err) for err in e.errors()]
        raise ConfigError(f"invalid job config {source}:\n" + "\n".join(f"  - {line}" for line in lines)) from None


def _describe(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        valid = _valid_keys(loc[:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = f"; did you mean {'.'.join(loc[:-1] + [close[0]])!r}?" if close else ""
        return f"{key}: unknown key{hint} Valid keys here: {', '.join(valid)}"
    if kind == "missing":
        return f"{key}: required section or key is missing"
    return f"{key}: {err['msg']} (got {err.get('input')!r})"


def _valid_keys(loc: list[str]) -> list[str]:
    """Field names of the model at `loc` (a path of field names and list indices) in JobConfig."""
    model: Any = JobConfig
    for part in loc:
        if part.isdigit():
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        model = _model_of(field.annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _model_of(annotation: Any) -> Any:
    """Unwrap list[X] / X | None to the BaseModel X, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def dump_config(cfg: JobConfig) -> str:
    """The resolved config as YAML (what is written to the run directory)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
