"""The learner's config sections: `algorithm:` (advantage estimator, policy loss, corrections) and `trainer:` (the
loop's size and the learner's optimizer, micro-batches and resources)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator, model_validator

from envs.config import Section
from rollouts.config import LoraConfig, ModelConfig, QuantConfig

# The built-in variants whose settings are known (rl/trainer/advantages.py, rl/trainer/losses.py); kept here, not
# imported, so that a config validates without importing torch.
_BUILTIN_LOSSES = {"ppo_clip", "gspo", "cispo", "k2"}
_BUILTIN_ADVANTAGES = {"grpo", "rloo", "mean_baseline", "reinforce_pp", "reinforce_pp_baseline"}


class AlgorithmConfig(Section):
    """Advantage estimator and policy loss (formulas and sources: rl/trainer/advantages.py, rl/trainer/losses.py)."""

    advantage: str = Field(
        "grpo",
        description="Registered advantage estimator: grpo (normalize_by_std=false: Dr.GRPO), rloo, mean_baseline "
        "(K1.5/K2), reinforce_pp, reinforce_pp_baseline.",
    )
    normalize_by_std: bool = Field(True, description="GRPO: divide by the group's std (False = Dr.GRPO).")
    loss: str = Field(
        "ppo_clip",
        description="Registered policy loss: ppo_clip (DAPO clip-higher: clip_ratio_high > clip_ratio_low), gspo, "
        "cispo, k2 (with advantage: mean_baseline, as Kimi).",
    )
    loss_agg_mode: Literal[
        "auto", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
    ] = Field(
        "auto",
        description="How token losses make the batch loss; auto: token-mean, gspo: seq-mean-token-mean, k2: "
        "seq-mean-token-sum.",
    )
    clip_ratio_low: float = Field(0.2, ge=0, description="ratio >= 1 - clip_ratio_low (GSPO's paper: 3e-4).")
    clip_ratio_high: float = Field(
        0.2, ge=0, description="ratio <= 1 + clip_ratio_high (DAPO: 0.28; GSPO's paper: 4e-4)."
    )
    k2_tau: float = Field(
        0.1,
        gt=0,
        description="k2 loss: weight of the pull toward the sampling policy, (A - tau log(pi/pi_old))^2 / (2 tau).",
    )
    token_mask: tuple[float, float] | None = Field(
        None,
        description="K2.5 token mask [alpha, beta]: tokens whose log(pi/pi_rollout) leaves this band get no gradient "
        "(null = off).",
    )
    entropy_coef: float = Field(
        0.0, ge=0, description="Entropy bonus: coef x mean token entropy is subtracted from the loss."
    )
    kl_coef: float = Field(
        0.0,
        ge=0,
        description="KL penalty to the reference policy (the job's starting weights); 0 = off, no reference copy kept.",
    )
    kl_in: Literal["loss", "reward"] = Field(
        "loss",
        description="loss: coef x per-token KL estimate added to the loss (GRPO); reward: coef x the sample's summed "
        "log-ratio subtracted from its reward before advantages (PPO/RLOO style).",
    )
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k3", description="Per-token KL estimator (Schulman's k1 = log ratio, k2 = half squared, k3 = exp(-x) - 1 + x)."
    )
    ptx_coef: float = Field(
        0.0,
        ge=0,
        description="PTX loss (K1.5/K2): weight of an auxiliary NLL on curated examples (algorithm.ptx_files); 0 = "
        "off.",
    )
    ptx_files: list[str] = Field(
        default_factory=list,
        description="JSONL files of {messages: [...]} (loss on assistant turns) or {text: ...} for the PTX loss.",
    )
    ptx_batch_size: int = Field(8, ge=1, description="PTX examples per learner step.")
    dynamic_sampling: bool = Field(
        False,
        description="DAPO: drop groups whose rewards are all equal (no signal) and draw new prompts to refill the "
        "batch.",
    )
    dynamic_sampling_max_rounds: int = Field(
        3, ge=1, description="DAPO: extra generate-and-score rounds a step may take to refill."
    )
    rollout_correction: Literal["none", "tis", "mis"] = Field(
        "none",
        description="Train-inference mismatch: none = the loss's ratio is taken against the rollout logprobs; tis/mis "
        "= against the learner's own, times the truncated (tis) or masked (mis) importance weight "
        "pi_learner/pi_rollout.",
    )
    rollout_correction_cap: float = Field(
        2.0, gt=1, description="tis: weights truncated at this; mis: weights outside [1/cap, cap] masked."
    )
    routing_replay: Literal["off", "record", "replay"] = Field(
        "off",
        description="MoE routing replay (R3, arXiv 2510.11370): record = the rollout engine records each position's "
        "routed experts and the learner reports `routing_agreement` (its routers' own top-k vs the rollout's); "
        "replay = the learner's forward also uses the rollout's experts (gates from its own router logits, so "
        "the router still learns). Needs a DeepSeek-V3-style MoE policy (docs/algorithms.md).",
    )

    @field_validator("routing_replay", mode="before")
    @classmethod
    def _off_is_not_false(cls, value: object) -> object:
        """YAML 1.1 reads a bare `off` (`algorithm.routing_replay=off`, `routing_replay: off`) as false."""
        return "off" if value is False else value

    @model_validator(mode="after")
    def _check_band(self) -> AlgorithmConfig:
        if self.token_mask is not None and not self.token_mask[0] < 0 < self.token_mask[1]:
            raise ValueError(f"token_mask [alpha, beta] needs alpha < 0 < beta, got {list(self.token_mask)}")
        return self

    @model_validator(mode="after")
    def _check_variant_settings(self) -> AlgorithmConfig:
        """A setting of one variant, changed from its default for another, would be silently ignored: it is an error
        naming what it needs (a default written out, as a run's resolved config.yaml does, is not). Built-in
        estimators and losses only (a user's own, from a file, may take any of them)."""
        ignored = [
            f"{key} applies {needs}"
            for key, needs, applies in (
                ("k2_tau", "to loss: k2", self.loss == "k2" or self.loss not in _BUILTIN_LOSSES),
                ("clip_ratio_low", "to the clipped losses (ppo_clip, gspo, cispo)", self.loss != "k2"),
                ("clip_ratio_high", "to the clipped losses (ppo_clip, gspo, cispo)", self.loss != "k2"),
                (
                    "normalize_by_std",
                    "to advantage: grpo",
                    self.advantage == "grpo" or self.advantage not in _BUILTIN_ADVANTAGES,
                ),
                ("kl_in", "only with kl_coef > 0", self.kl_coef > 0),
                (
                    "kl_estimator",
                    "only with kl_coef > 0 and kl_in: loss (kl_in: reward uses the log ratio)",
                    self.kl_coef > 0 and self.kl_in == "loss",
                ),
                ("ptx_files", "only with ptx_coef > 0", self.ptx_coef > 0),
                ("ptx_batch_size", "only with ptx_coef > 0", self.ptx_coef > 0),
                ("dynamic_sampling_max_rounds", "only with dynamic_sampling: true", self.dynamic_sampling),
                (
                    "rollout_correction_cap",
                    "only with rollout_correction: tis or mis",
                    self.rollout_correction != "none",
                ),
            )
            if self._changed(key) and not applies
        ]
        if ignored:
            raise ValueError(
                "settings that do not apply to this algorithm: " + "; ".join(f"algorithm.{x}" for x in ignored)
            )
        return self

    def _changed(self, key: str) -> bool:
        """Whether `key` was set to something other than its default."""
        return key in self.model_fields_set and getattr(self, key) != type(self).model_fields[key].get_default(
            call_default_factory=True
        )


class TrainerConfig(Section):
    """The RL loop and the learner."""

    steps: int = Field(30, ge=1, description="RL steps.")
    prompts_per_step: int = Field(
        16, ge=1, description="Prompts per RL step (each sampled `samples_per_prompt` times)."
    )
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay (AdamW and Muon).")
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw",
        description="adamw, or muon: Muon for hidden 2-D weight matrices, AdamW for the rest (rl/trainer/optim.py).",
    )
    reset_optimizer_each_step: bool = Field(
        False, description="K1.5: fresh optimizer state at every RL iteration (each step's batch is a new problem)."
    )
    grad_clip: float = Field(1.0, gt=0, description="Max global grad norm.")
    micro_batch_size: int = Field(64, ge=1, description="Sequences per learner forward/backward.")
    micro_batch_tokens: int = Field(
        0,
        ge=0,
        description="Also cap a micro-batch at this many padded tokens (sequences x the longest), so long samples "
        "train in smaller micro-batches; 0 = no cap.",
    )
    share_prompt: bool = Field(
        True,
        description="Forward each distinct prompt of a micro-batch once and its samples' continuations on its KV "
        "cache (same logprobs and gradients, fewer positions: rl/trainer/forward.py); models that fail "
        "the check at start forward whole sequences.",
    )
    skip_zero_advantage_backward: bool = Field(
        True,
        description="Sequences whose every policy token has advantage 0 (a GRPO group of equal rewards) give no "
        "gradient under a loss that vanishes there (checked on the loss; no entropy bonus, no KL in the "
        "loss): forward them without autograd, for the metrics, and skip their backward (same update, "
        "less work: rl/trainer/learner.py).",
    )
    score_zero_advantage: bool = Field(
        True,
        description="With skip_zero_advantage_backward: still forward the sequences without gradient so that the "
        "metrics (mismatch, entropy, clip fraction, ...) cover every token; false: the metrics cover the "
        "trained sequences only (as with DAPO's filtered groups) and the others cost the learner nothing.",
    )
    num_learners: int = Field(
        1,
        ge=1,
        description="Data-parallel learner actors (torch.distributed: gloo on CPU, NCCL on GPU); each trains on a "
        "token-balanced shard of the batch.",
    )
    sharding: Literal["replicate", "fsdp"] = Field(
        "replicate",
        description="With num_learners > 1: replicate = every learner holds the whole model and optimizer state "
        "(gradients summed); fsdp = parameters, gradients and optimizer state sharded over the learners with FSDP2 "
        "(rl/trainer/sharding.py, docs/cluster.md).",
    )
    learner_cpus: float = Field(1.0, gt=0, description="Ray CPUs reserved per learner actor.")
    learner_gpus: float = Field(
        0.0, ge=0, description="Ray GPUs per learner actor (the learner then trains on the GPU)."
    )
    learner_threads: int = Field(2, ge=1, description="torch threads inside the learner.")
    compute_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="What the learner's forward and backward compute in. bfloat16 runs them under torch.autocast "
        "(mixed precision, as TRL's bf16=True and verl's FSDP param_dtype): the matmuls in bf16, several times "
        "faster on GPUs and on CPUs with AMX or AVX-512-BF16, while the master weights, gradients, optimizer state "
        "and logprobs stay in model.dtype. It adds bf16 rounding to the rollout-vs-learner mismatch.",
    )
    checkpoint_every: int = Field(10, ge=0, description="Steps between checkpoints (0 = only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Most recent checkpoints kept.")
    lora: LoraConfig | None = Field(
        None,
        description="Train LoRA adapters on a frozen base instead of every parameter ({rank, alpha, dropout, targets}; "
        "with quant.mode qat the base is the INT4 one); null = full-parameter training. See docs/lora.md.",
    )

    @model_validator(mode="after")
    def _check_sharding(self) -> TrainerConfig:
        if self.sharding == "fsdp" and self.num_learners < 2:
            raise ValueError(
                f"trainer.sharding=fsdp shards the model over the learners: it needs trainer.num_learners >= 2 (got "
                f"{self.num_learners}); set trainer.num_learners or trainer.sharding=replicate"
            )
        return self


@dataclass(frozen=True)
class LearnerSpec:
    """What a learner needs of the job: its own sections (`rl.config.JobConfig.learner_spec()` builds it)."""

    model: ModelConfig
    trainer: TrainerConfig
    algorithm: AlgorithmConfig
    quant: QuantConfig
    seed: int
    temperature: float
    """`rollout.temperature`: what a batch is scored at when it carries no temperature of its own."""
    max_tokens_per_sample: int
    """`rollout.max_tokens_per_sample`: the horizon of the seq-mean-token-sum-norm loss and the PTX examples' cut."""
    cache_dir: str | None = None
    """Where a policy shipped through Ray is unpacked on a node that lacks the driver's disk (None: the default)."""
