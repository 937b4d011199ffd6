"""Job configuration: one YAML per job, validated into nested typed models before anything starts.

`load_config(path, overrides)` reads the YAML, applies `key.sub=value` overrides, and validates. Every mistake
(unknown key, wrong type, out-of-range value, missing section) raises `ConfigError` naming the dotted key and,
for an unknown key, the closest valid spelling. This module imports only pydantic and yaml, so a bad config
fails in well under a second, before Ray or torch are touched.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """The job config is invalid; the message names the key and what to do."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(_Section):
    """Sizes of the built-in DeepseekV3-architecture policy (used when `model.path` is not set)."""

    vocab_size: int = Field(640, ge=300, description="Upper bound on the vocabulary of the locally trained BPE tokenizer (training stops when no merge is left).")
    hidden_size: int = Field(128, ge=16, description="Model width.")
    num_layers: int = Field(2, ge=1, description="Transformer layers (depth costs more than width on a CPU).")
    num_heads: int = Field(8, ge=1, description="Attention heads (more heads: copying is learned sooner and more reliably).")
    n_routed_experts: int = Field(8, ge=1, description="Routed MoE experts per layer.")
    experts_per_token: int = Field(2, ge=1, description="Routed experts each token is sent to (top-k).")
    n_shared_experts: int = Field(1, ge=0, description="Always-on shared experts per layer.")
    moe_intermediate_size: int = Field(128, ge=8, description="Hidden size of each expert's MLP.")
    kv_lora_rank: int = Field(64, ge=4, description="MLA compressed KV rank.")
    qk_rope_head_dim: int = Field(16, ge=2, description="MLA rotary part of each query/key head.")
    qk_nope_head_dim: int = Field(16, ge=2, description="MLA non-rotary part of each query/key head.")
    v_head_dim: int = Field(16, ge=2, description="MLA value head size.")
    max_position_embeddings: int = Field(512, ge=64, description="Longest sequence the model supports.")
    experts_implementation: Literal["eager", "grouped_mm", "batched_mm"] = Field(
        "grouped_mm", description="transformers MoE kernel; grouped_mm was the fastest on these CPUs."
    )

    @model_validator(mode="after")
    def _check_topk(self) -> TinyModelConfig:
        if self.experts_per_token > self.n_routed_experts:
            raise ValueError("experts_per_token must not exceed n_routed_experts")
        return self


class ModelConfig(_Section):
    """The policy."""

    path: str | None = Field(
        None, description="A Hugging Face causal-LM directory ($VARS and ~ are expanded); unset = the built-in tiny K2-style model."
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside `path`, loaded offline with transformers.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Parameter dtype.")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)

    @model_validator(mode="after")
    def _expand_path(self) -> ModelConfig:
        if self.path:
            expanded = os.path.expanduser(os.path.expandvars(self.path))
            if "$" in expanded or not expanded.strip():
                raise ValueError(f"path {self.path!r} names an environment variable that is not set or is empty")
            self.__dict__["path"] = expanded
        return self


class WarmStartConfig(_Section):
    """Supervised warm start on generated demonstrations, built once and cached."""

    enabled: bool = Field(True, description="Run the warm start before RL (built-in task and model only).")
    num_demos: int = Field(6000, ge=1, description="Generated demonstrations.")
    tool_use_rate: float = Field(
        0.3, ge=0.0, le=1.0, description="Share of demonstrations that call the tool; the rest answer unaided (imperfect on purpose)."
    )
    steps: int = Field(1200, ge=1, description="Most optimizer steps (the warm start stops earlier once the policy copies numbers).")
    target_copy_accuracy: float = Field(
        0.9, ge=0, le=1.0, description="Held-out teacher-forced accuracy on the digits the policy writes that ends the constant-LR phase (0: anneal from the first check)."
    )
    check_every: int = Field(50, ge=1, description="Steps between copy-accuracy checks.")
    anneal_steps: int = Field(150, ge=1, description="Linear learning-rate decay to zero once the target is reached.")
    batch_size: int = Field(32, ge=1, description="Demonstrations per optimizer step.")
    lr: float = Field(4e-3, gt=0, description="AdamW learning rate (20 warmup steps, constant, then the anneal).")
    cache_dir: str | None = Field(None, description="Where built policies are cached; default $TIDERL_CACHE or ~/.cache/tiderl.")


class DataConfig(_Section):
    """Prompts, in verl's layout (`prompt`, `data_source`, `reward_model.ground_truth`, `extra_info`)."""

    task: Literal["calculator", "python_math", "search_qa"] | None = Field(
        "calculator", description="Built-in generated task (pair it with its environment, see README); null when `train_files` is set."
    )
    train_files: list[str] = Field(default_factory=list, description="jsonl/parquet files or saved datasets for training.")
    eval_files: list[str] = Field(default_factory=list, description="Held-out files for eval.")
    train_size: int = Field(20000, ge=1, description="Generated training prompts (built-in task).")
    eval_size: int = Field(256, ge=1, description="Held-out prompts for eval (built-in task, or a cap on eval_files).")
    shuffle: bool = Field(True, description="Reshuffle training prompts every epoch.")
    sampling: Literal["epoch", "prioritized", "curriculum"] = Field(
        "epoch",
        description="epoch: every prompt once per epoch; prioritized (K1.5): draw prompts with probability proportional to "
        "1 - their tracked success rate (unseen prompts count as 0), so solved prompts fade and hard ones return; "
        "curriculum (K1.5): each epoch walks the prompts from easy to hard by `extra_info.difficulty` (a number).",
    )
    success_ema: float = Field(0.5, gt=0, le=1, description="prioritized: weight of the newest step's accuracy in a prompt's tracked success rate.")

    @model_validator(mode="after")
    def _check_source(self) -> DataConfig:
        if self.task is None and not self.train_files:
            raise ValueError("set `data.task` to a built-in task or give `data.train_files`")
        return self


class SandboxConfig(_Section):
    """Limits of the python tool's sandbox (`envs.sandbox`), per call."""

    cpu_seconds: int = Field(5, ge=1, description="CPU time per process (RLIMIT_CPU).")
    wall_seconds: float = Field(10.0, gt=0, description="Wall-clock time; the whole sandbox is killed after it.")
    memory_mb: int = Field(512, ge=32, description="Address space per process (RLIMIT_AS).")
    max_processes: int = Field(32, ge=1, description="Processes of the sandbox user (RLIMIT_NPROC; fork bombs stop here).")
    max_output_bytes: int = Field(16384, ge=256, description="stdout/stderr kept per call; more is cut and reported.")
    max_file_mb: int = Field(16, ge=1, description="Largest file the code may write (RLIMIT_FSIZE).")
    python: str | None = Field(None, description="Interpreter for model code (default: /usr/bin/python3, else this one).")
    allow_unisolated: bool = Field(
        False, description="Without bubblewrap, run model code with rlimits only (no network/filesystem isolation) instead of refusing."
    )


class EnvConfig(_Section):
    """The tool environment the agent loop runs against."""

    name: str = Field("calculator", description="Registered environment name or 'path/to/file.py:Class'.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the environment's constructor (your own environments).")
    max_turns: int = Field(4, ge=1, description="Assistant turns per sample before it is truncated.")
    max_tool_calls: int = Field(4, ge=0, description="Tool calls per sample before it is truncated.")
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)


class RewardFunctionConfig(_Section):
    name: str = Field(description="Registered reward name or 'path/to/file.py:fn' (verl's compute_score or a TRL reward function, sync or async).")
    weight: float = Field(1.0, description="Weight in the summed reward.")
    timeout_s: float = Field(30.0, gt=0, description="Per call (a sample for verl-style functions, a batch for TRL-style); a call past it fails its samples.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments passed to the function (e.g. a built-in's settings).")


class RewardModelConfig(_Section):
    """A reward model served by its own Ray actor (`rewards.models`)."""

    name: str = Field(description="Name in metrics (`reward/<name>`) and the breakdown.")
    kind: Literal["classifier", "judge"] = Field(description="classifier: AutoModelForSequenceClassification; judge: a causal LM prompted with a rubric.")
    path: str = Field(description="Hugging Face model directory.")
    weight: float = Field(1.0, description="Weight in the summed reward.")
    mode: Literal["pointwise", "pairwise"] = Field("pointwise", description="judge: rate each response (Score: N of 10), or compare it with its group's first sample ([[A]]/[[B]]/[[C]]).")
    rubric: str | None = Field(None, description="judge: the system prompt (default: a correctness-first grading rubric).")
    max_new_tokens: int = Field(64, ge=1, description="judge: tokens for the critique and verdict.")
    max_length: int = Field(1024, ge=16, description="Tokens of conversation kept (the end) per item.")
    batch_size: int = Field(16, ge=1, description="Items per forward pass.")
    num_cpus: float = Field(1.0, gt=0, description="Ray CPUs reserved for the actor.")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs reserved for the actor.")
    threads: int = Field(1, ge=1, description="torch threads inside the actor.")


class RewardConfig(_Section):
    functions: list[RewardFunctionConfig] = Field(
        default_factory=lambda: [RewardFunctionConfig(name="calculator")],
        min_length=1,
        description="Reward functions; the first is the task verifier that `accuracy` reports.",
    )
    models: list[RewardModelConfig] = Field(default_factory=list, description="Reward models (classifier or judge actors), added to the functions' sum.")
    models_async: bool = Field(
        True, description="Rollout workers send each finished group to the reward models while the step is still generating; false = score the whole batch after generation."
    )
    truncation_penalty: float = Field(
        0.0, description="Added to the reward of a truncated sample (token budget, sequence length, loop, turn or tool-call limit), e.g. -1."
    )

    @model_validator(mode="after")
    def _check_names(self) -> RewardConfig:
        names = [f.name for f in self.functions] + [m.name for m in self.models]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"reward names must be unique across functions and models (each is a metric): {repeated}")
        return self


class RolloutConfig(_Section):
    """Generation."""

    num_workers: int = Field(2, ge=1, description="RolloutWorker actors.")
    cpus_per_worker: float = Field(0.5, gt=0, description="Ray CPUs reserved per rollout worker.")
    gpus_per_worker: float = Field(0.0, ge=0, description="Ray GPUs per rollout worker (the worker then generates on the GPU).")
    threads_per_worker: int = Field(1, ge=1, description="torch threads inside each rollout worker.")
    samples_per_prompt: int = Field(8, ge=1, description="Samples per prompt (the GRPO group size).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; the learner scores at the same temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: draw from the smallest set of tokens holding this much probability (1 = off).")
    top_k: int = Field(0, ge=0, description="Draw from the k most likely tokens (0 = off). Logprobs stay the full tempered distribution's, the one the learner scores.")
    max_staleness: int = Field(
        1,
        ge=0,
        description="Async pipeline: start each step's rollouts up to N steps ahead, so generation overlaps the learner's "
        "update; samples are then up to N policy versions old (`policy_lag_mean`). 0 = synchronous.",
    )
    max_num_seqs: int = Field(256, ge=1, description="Sequences a worker decodes at once (KV-cache slots); more wait and join as others finish.")
    prefix_reuse: bool = Field(
        True,
        description="A multi-turn episode's next turn continues in its cache slot and prefills only its new tokens (the tool's result), "
        "not its whole history (SGLang's / vLLM's prefix caching, per episode).",
    )
    temperature_final: float | None = Field(None, gt=0, description="Temperature schedule (K2): decay linearly from `temperature` to this over `temperature_decay_steps` RL steps; null = constant.")
    temperature_decay_steps: int = Field(1, ge=1, description="RL steps of the temperature decay.")
    max_new_tokens_per_turn: int = Field(40, ge=1, description="Token budget of one assistant turn.")
    max_tokens_per_sample: int = Field(256, ge=16, description="Budget of a whole sample (prompt + turns + observations).")
    token_budgets: dict[str, int] = Field(
        default_factory=dict,
        description="Per-task budgets of generated tokens per sample, by `data_source` (K2's per-task budgets); a row's "
        "`extra_info.token_budget` overrides them. A sample that reaches its budget is truncated (see reward.truncation_penalty).",
    )
    tool_call_format: Literal["hermes", "kimi_k2"] = Field(
        "hermes",
        description="How the model writes tool calls: hermes = `<tool_call>{json}</tool_call>` (Qwen, Hermes, the built-in model); "
        "kimi_k2 = `<|tool_calls_section_begin|>` ... `functions.NAME:IDX<|tool_call_argument_begin|>{json}` ...",
    )
    repeat_window: int = Field(
        64, ge=0, description="Stop a generation as looping when one unit of at most `repeat_max_period` tokens repeats over its last N tokens (0 = off)."
    )
    repeat_max_period: int = Field(16, ge=1, description="Longest repeating unit (in tokens) the loop detector looks for.")
    partial_rollout_budget: int = Field(
        0,
        ge=0,
        description="Partial rollouts (K1.5): tokens a sample may generate per RL step; a sample that reaches it is paused "
        "(tokens, logprobs, policy version per segment, environment) and resumed next step, and its group trains once all "
        "its samples are done. 0 = off (every sample finishes within its step).",
    )

    @model_validator(mode="after")
    def _check_budgets(self) -> RolloutConfig:
        bad = {k: v for k, v in self.token_budgets.items() if v < 1}
        if bad:
            raise ValueError(f"token_budgets must be positive, got {bad}")
        return self


class AlgorithmConfig(_Section):
    """Advantage estimator and policy loss (formulas and sources: rl/advantages.py, rl/losses.py)."""

    advantage: str = Field(
        "grpo", description="Registered advantage estimator: grpo (normalize_by_std=false: Dr.GRPO), rloo, mean_baseline (K1.5/K2), reinforce_pp, reinforce_pp_baseline."
    )
    normalize_by_std: bool = Field(True, description="GRPO: divide by the group's std (False = Dr.GRPO).")
    loss: str = Field("ppo_clip", description="Registered policy loss: ppo_clip (DAPO clip-higher: clip_ratio_high > clip_ratio_low), gspo, cispo, k2 (with advantage: mean_baseline, as Kimi).")
    loss_agg_mode: Literal["auto", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = Field(
        "auto", description="How token losses make the batch loss; auto: token-mean, gspo: seq-mean-token-mean, k2: seq-mean-token-sum."
    )
    clip_ratio_low: float = Field(0.2, ge=0, description="ratio >= 1 - clip_ratio_low (GSPO's paper: 3e-4).")
    clip_ratio_high: float = Field(0.2, ge=0, description="ratio <= 1 + clip_ratio_high (DAPO: 0.28; GSPO's paper: 4e-4).")
    k2_tau: float = Field(0.1, gt=0, description="k2 loss: weight of the pull toward the sampling policy, (A - tau log(pi/pi_old))^2 / (2 tau).")
    token_mask: tuple[float, float] | None = Field(
        None, description="K2.5 token mask [alpha, beta]: tokens whose log(pi/pi_rollout) leaves this band get no gradient (null = off)."
    )
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus: coef x mean token entropy is subtracted from the loss.")
    kl_coef: float = Field(0.0, ge=0, description="KL penalty to the reference policy (the job's starting weights); 0 = off, no reference copy kept.")
    kl_in: Literal["loss", "reward"] = Field(
        "loss", description="loss: coef x per-token KL estimate added to the loss (GRPO); reward: coef x the sample's summed log-ratio subtracted from its reward before advantages (PPO/RLOO style)."
    )
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="Per-token KL estimator (Schulman's k1 = log ratio, k2 = half squared, k3 = exp(-x) - 1 + x).")
    ptx_coef: float = Field(0.0, ge=0, description="PTX loss (K1.5/K2): weight of an auxiliary NLL on curated examples (algorithm.ptx_files); 0 = off.")
    ptx_files: list[str] = Field(default_factory=list, description="JSONL files of {messages: [...]} (loss on assistant turns) or {text: ...} for the PTX loss.")
    ptx_batch_size: int = Field(8, ge=1, description="PTX examples per learner step.")
    dynamic_sampling: bool = Field(False, description="DAPO: drop groups whose rewards are all equal (no signal) and draw new prompts to refill the batch.")
    dynamic_sampling_max_rounds: int = Field(3, ge=1, description="DAPO: extra generate-and-score rounds a step may take to refill.")
    rollout_correction: Literal["none", "tis", "mis"] = Field(
        "none",
        description="Train-inference mismatch: none = the loss's ratio is taken against the rollout logprobs; tis/mis = against "
        "the learner's own, times the truncated (tis) or masked (mis) importance weight pi_learner/pi_rollout.",
    )
    rollout_correction_cap: float = Field(2.0, gt=1, description="tis: weights truncated at this; mis: weights outside [1/cap, cap] masked.")

    @model_validator(mode="after")
    def _check_band(self) -> AlgorithmConfig:
        if self.token_mask is not None and not self.token_mask[0] < 0 < self.token_mask[1]:
            raise ValueError(f"token_mask [alpha, beta] needs alpha < 0 < beta, got {list(self.token_mask)}")
        return self


class TrainerConfig(_Section):
    """The RL loop and the learner."""

    steps: int = Field(30, ge=1, description="RL steps.")
    prompts_per_step: int = Field(16, ge=1, description="Prompts per RL step (each sampled `samples_per_prompt` times).")
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay (AdamW and Muon).")
    optimizer: Literal["adamw", "muon"] = Field("adamw", description="adamw, or muon: Muon for hidden 2-D weight matrices, AdamW for the rest (rl/optim.py).")
    reset_optimizer_each_step: bool = Field(False, description="K1.5: fresh optimizer state at every RL iteration (each step's batch is a new problem).")
    grad_clip: float = Field(1.0, gt=0, description="Max global grad norm.")
    micro_batch_size: int = Field(64, ge=1, description="Sequences per learner forward/backward.")
    micro_batch_tokens: int = Field(
        0, ge=0, description="Also cap a micro-batch at this many padded tokens (sequences x the longest), so long samples train in smaller micro-batches; 0 = no cap."
    )
    share_prompt: bool = Field(
        True,
        description="Forward each distinct prompt of a micro-batch once and its samples' continuations on its KV cache "
        "(same logprobs and gradients, fewer positions: rl/forward.py); models that fail the check at start forward whole sequences.",
    )
    skip_zero_advantage_backward: bool = Field(
        True,
        description="Sequences whose every policy token has advantage 0 (a GRPO group of equal rewards) give no gradient "
        "under a loss that vanishes there (checked on the loss; no entropy bonus, no KL in the loss): forward them "
        "without autograd, for the metrics, and skip their backward (same update, less work: rl/learner.py).",
    )
    score_zero_advantage: bool = Field(
        True,
        description="With skip_zero_advantage_backward: still forward the sequences without gradient so that the metrics "
        "(mismatch, entropy, clip fraction, ...) cover every token; false: the metrics cover the trained sequences only "
        "(as with DAPO's filtered groups) and the others cost the learner nothing.",
    )
    num_learners: int = Field(1, ge=1, description="Data-parallel learner actors (torch.distributed: gloo on CPU, NCCL on GPU); each trains on a token-balanced shard of the batch.")
    learner_cpus: float = Field(1.0, gt=0, description="Ray CPUs reserved per learner actor.")
    learner_gpus: float = Field(0.0, ge=0, description="Ray GPUs per learner actor (the learner then trains on the GPU).")
    learner_threads: int = Field(2, ge=1, description="torch threads inside the learner.")
    checkpoint_every: int = Field(10, ge=0, description="Steps between checkpoints (0 = only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Most recent checkpoints kept.")


class EvalConfig(_Section):
    """Held-out evaluation before and after RL."""

    enabled: bool = Field(True, description="Evaluate before and after RL (writes eval.json).")
    every: int = Field(0, ge=0, description="Also evaluate every N steps (0 = never).")
    sampled: bool = Field(True, description="Also report accuracy of one sample per prompt at the rollout temperature.")


class ClusterConfig(_Section):
    """Where the job runs, how its actors are placed, and what `tiderl submit` ships with it."""

    address: str | None = Field(
        None,
        description="Ray cluster (GCS) address to connect to, e.g. HEAD:6379 or auto; unset = the cluster of a submitted job "
        "(RAY_ADDRESS), else start a local Ray instance.",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray instance (default: all).")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement-group strategy for the job's bundles (one per learner, rollout worker and reward model)."
    )
    placement_timeout_s: float = Field(60.0, gt=0, description="Seconds to wait for the placement group before failing with what could not be placed.")
    weight_sync: Literal["object_store", "collective"] = Field(
        "object_store",
        description="How weights reach the rollout workers each step: object_store (put once, every worker pulls; one node, CPU workers) "
        "or collective (learner rank 0 broadcasts one buffer: NCCL when learners and workers have GPUs, else gloo).",
    )
    ship_max_mb: float = Field(
        2048.0, ge=0, description="The driver ships the policy directory to actors through the object store when it is at most this big "
        "(nodes without a shared filesystem); a bigger one must be at the same path on every node.",
    )
    max_worker_restarts: int = Field(3, ge=0, description="Restarts of a dead rollout worker or reward-model actor per RL step before the job fails.")
    max_learner_restarts: int = Field(2, ge=0, description="Times a failed learner is restored from the last checkpoint before the job fails.")
    pip: list[str] = Field(default_factory=list, description="tiderl submit: pip requirements installed in the job's runtime environment.")
    env_vars: dict[str, str] = Field(default_factory=dict, description="tiderl submit: environment variables of the job's processes.")
    excludes: list[str] = Field(
        default_factory=list, description="tiderl submit: extra gitignore-style patterns left out of the uploaded working directory."
    )


class LoggingConfig(_Section):
    tensorboard: bool = Field(True, description="Write TensorBoard event files in the run directory.")
    progress: bool = Field(True, description="Show a progress bar with the live reward.")
    save_trajectories: bool = Field(True, description="Write every step's scored samples to trajectories/step_N.jsonl (conversation, reward breakdown, status).")


class QuantConfig(_Section):
    """INT4-aware training: one weight-only INT4 spec for the learner's fake-quant, the weight sync, the rollout
    engine and the export (see `rl.quant.QuantSpec`)."""

    enabled: bool = Field(False, description="Quantize the targeted weights to INT4 for rollouts, weight sync and export.")
    mode: Literal["qat", "ptq"] = Field(
        "qat",
        description="qat: the learner trains through fake-quant (straight-through), so it optimizes the INT4 policy "
        "the rollouts run; ptq: the learner trains the full-precision weights, rollouts still run INT4 (the baseline).",
    )
    fake_quant_start_step: int = Field(1, ge=1, description="qat: first RL step whose update runs through fake-quant (earlier steps train as ptq).")
    modules: Literal["routed_experts", "all_linear"] = Field(
        "routed_experts",
        description="routed_experts: only routed MoE experts, as Kimi K2 Thinking (attention, shared experts, dense MLP, "
        "router, embeddings, lm_head stay full precision); all_linear: every linear weight except lm_head and embeddings.",
    )
    targets: list[str] | None = Field(None, description="Regexes over parameter names to quantize, instead of `modules`' preset.")
    ignore: list[str] = Field(default_factory=list, description="Regexes over parameter names never quantized (applied after targets).")
    group_size: Literal[32, 64, 128, 256] = Field(32, description="Input channels sharing one scale (the INT4 kernels take 32, 64, 128, 256).")
    scale_rule: Literal["amax/7", "amax/7.5"] = Field(
        "amax/7",
        description="amax/7: q in [-7, 7], the grid reported for K2 Thinking, no weight clipped; amax/7.5: q in [-8, 7], "
        "compressed-tensors' minmax observer (the extreme positive weight clips to 7).",
    )
    scale_dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="dtype scales are rounded to and stored in (K2 Thinking ships bf16).")
    rollout_activation_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Activations the INT4 kernels run on. auto: the policy's dtype (model.dtype), so the engine differs "
        "from the learner by quantization only; float32: exact products, but torch's CPU INT4 kernel is slow with them "
        "on large matrices; bfloat16: the fast kernels (CPU and GPU), adding bf16 rounding to the mismatch.",
    )
    dense_min_rows: int | None = Field(
        None,
        ge=1,
        description="Rows (tokens) at or above which an INT4 product unpacks its weight on the fly and runs a dense "
        "matmul instead of the INT4 kernel; unset = 8 for float32 activations (where torch's CPU INT4 kernel loses), never for bfloat16.",
    )
    measure_attribution: bool = Field(True, description="Also score the batch with the other learner mode (with/without fake-quant) to report the quantization part of the mismatch.")
    attribution_every: int = Field(
        10, ge=1, description="Measure the attribution every N updates (steps 1, N+1, ...): an extra forward pass over the batch each time it runs."
    )


class JobConfig(_Section):
    """A whole RL job."""

    seed: int = Field(0, description="Seed for data order, sampling and initialization.")
    model: ModelConfig
    warm_start: WarmStartConfig = Field(default_factory=WarmStartConfig)
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

    @model_validator(mode="after")
    def _check_eval_data(self) -> JobConfig:
        if self.eval.enabled and self.data.task is None and not self.data.eval_files:
            raise ValueError("eval is enabled but there is no held-out data: set `data.eval_files`, or `eval.enabled=false`")
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
