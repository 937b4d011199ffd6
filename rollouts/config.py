"""The rollout layer's config sections: `model:` (the policy the engine loads), `rollout:` (sampling, budgets, workers)
and `quant:` (the INT4 definition the engine runs and the learner trains through)."""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import Field, model_validator

from envs.config import Section


class TinyModelConfig(Section):
    """Sizes of the built-in DeepseekV3-architecture policy (used when `model.path` is not set)."""

    vocab_size: int = Field(
        640,
        ge=300,
        description="Upper bound on the vocabulary of the locally trained BPE tokenizer (training stops when no merge "
        "is left).",
    )
    hidden_size: int = Field(128, ge=16, description="Model width.")
    num_layers: int = Field(2, ge=1, description="Transformer layers (depth costs more than width on a CPU).")
    num_heads: int = Field(
        8, ge=1, description="Attention heads (more heads: copying is learned sooner and more reliably)."
    )
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


class ModelConfig(Section):
    """The policy."""

    path: str | None = Field(
        None,
        description="A Hugging Face causal-LM directory ($VARS and ~ are expanded); unset = the built-in tiny "
        "K2-style model.",
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


class EndpointConfig(Section):
    """The OpenAI-compatible endpoint each rollout worker serves when its environment is an agent function
    (`env.name=agent.py:run`, `rollouts.endpoint`), and `tiderl serve`'s."""

    host: str = Field("127.0.0.1", description="Address the endpoint listens on (127.0.0.1: this machine only).")
    port: int = Field(0, ge=0, le=65535, description="Port (0 = a free port per worker; agents get the URL).")
    max_concurrent_requests: int = Field(
        64, ge=1, description="Requests generated at once (engine slots); more wait their turn."
    )
    max_concurrent_episodes: int = Field(
        256, ge=1, description="Agent episodes a worker runs at once; the rest start as earlier ones end."
    )
    request_timeout_s: float = Field(
        120.0, gt=0, description="A request not answered within this gets a timeout error (its agent decides)."
    )
    episode_timeout_s: float = Field(
        600.0, gt=0, description="An agent episode still running after this fails its sample (counted)."
    )


class RolloutConfig(Section):
    """Generation."""

    num_workers: int = Field(2, ge=1, description="RolloutWorker actors.")
    cpus_per_worker: float = Field(0.5, gt=0, description="Ray CPUs reserved per rollout worker.")
    gpus_per_worker: float = Field(
        0.0, ge=0, description="Ray GPUs per rollout worker (the worker then generates on the GPU)."
    )
    threads_per_worker: int = Field(1, ge=1, description="torch threads inside each rollout worker.")
    samples_per_prompt: int = Field(8, ge=1, description="Samples per prompt (the GRPO group size).")
    temperature: float = Field(
        1.0, gt=0, description="Sampling temperature; the learner scores at the same temperature."
    )
    top_p: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Nucleus sampling: draw from the smallest set of tokens holding this much probability (1 = off).",
    )
    top_k: int = Field(
        0,
        ge=0,
        description="Draw from the k most likely tokens (0 = off). With top-k or top-p, the rollout logprob is of the "
        "distribution drawn from (renormalized over the kept tokens), and the learner scores under the same "
        "truncation (`sampling_mask_replay`).",
    )
    sampling_mask_replay: bool | None = Field(
        None,
        description="Sampling-mask replay: record the ids each draw kept under top-k / top-p, and the learner "
        "renormalizes its logprob over them, so ratio and mismatch compare the same distribution (null = on "
        "whenever top_p < 1 or top_k > 0). Off: the learner scores the full distribution, which differs from the "
        "rollout's by the kept mass's log (docs/algorithms.md).",
    )
    sampling_mask_max_kept: int = Field(
        512,
        ge=1,
        description="Sampling-mask replay keeps at most this many tokens per draw: top-p alone samples under "
        "top_k = this bound (it rarely binds at top_p <= 0.95), so the record is exact; a larger top_k is an error.",
    )
    max_staleness: int = Field(
        1,
        ge=0,
        description="Async pipeline: start each step's rollouts up to N steps ahead, so generation overlaps the "
        "learner's update; samples are then up to N policy versions old (`policy_lag_mean`). 0 = "
        "synchronous.",
    )
    matmul_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="What the engine's matmuls (projections and the head) run in for a float32 model: bfloat16 "
        "casts each weight once per weight push and the activations per call, norms, attention and logprobs "
        "staying float32 (the learner's mixed precision); auto = trainer.compute_dtype, so that the engine "
        "computes as the learner does. On CPUs with AMX or AVX-512-BF16 and on GPUs bf16 matmuls are several "
        "times faster; the price is bf16 rounding in the rollout-vs-learner mismatch.",
    )
    max_num_seqs: int = Field(
        256,
        ge=1,
        description="Sequences a worker decodes at once (KV-cache slots); more wait and join as others finish.",
    )
    prefix_reuse: bool = Field(
        True,
        description="A multi-turn episode's next turn continues in its cache slot and prefills only its new tokens "
        "(the tool's result), not its whole history (SGLang's / vLLM's prefix caching, per episode).",
    )
    temperature_final: float | None = Field(
        None,
        gt=0,
        description="Temperature schedule (K2): decay linearly from `temperature` to this over "
        "`temperature_decay_steps` RL steps; null = constant.",
    )
    temperature_decay_steps: int = Field(1, ge=1, description="RL steps of the temperature decay.")
    max_new_tokens_per_turn: int = Field(40, ge=1, description="Token budget of one assistant turn.")
    max_tokens_per_sample: int = Field(
        256, ge=16, description="Budget of a whole sample (prompt + turns + observations)."
    )
    token_budgets: dict[str, int] = Field(
        default_factory=dict,
        description="Per-task budgets of generated tokens per sample, by `data_source` (K2's per-task budgets); a "
        "row's `extra_info.token_budget` overrides them. A sample that reaches its budget is truncated "
        "(see reward.truncation_penalty).",
    )
    tool_call_format: Literal["hermes", "kimi_k2"] = Field(
        "hermes",
        description="How the model writes tool calls: hermes = `<tool_call>{json}</tool_call>` (Qwen, Hermes, the "
        "built-in model); kimi_k2 = `<|tool_calls_section_begin|>` ... "
        "`functions.NAME:IDX<|tool_call_argument_begin|>{json}` ...",
    )
    repeat_window: int = Field(
        64,
        ge=0,
        description="Stop a generation as looping when one unit of at most `repeat_max_period` tokens repeats over "
        "its last N tokens (0 = off).",
    )
    repeat_max_period: int = Field(
        16, ge=1, description="Longest repeating unit (in tokens) the loop detector looks for."
    )
    partial_rollout_budget: int = Field(
        0,
        ge=0,
        description="Partial rollouts (K1.5): tokens a sample may generate per RL step; a sample that reaches it is "
        "paused (tokens, logprobs, policy version per segment, environment) and resumed next step, and "
        "its group trains once all its samples are done. 0 = off (every sample finishes within its step).",
    )
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)

    @property
    def kept_per_token(self) -> int:
        """Kept ids recorded per sampled token (0: sampling-mask replay is off)."""
        truncated = self.top_p < 1.0 or self.top_k > 0
        return self.sampling_mask_max_kept if truncated and self.sampling_mask_replay is not False else 0

    @model_validator(mode="after")
    def _check_sampling_mask(self) -> RolloutConfig:
        if self.sampling_mask_replay and not (self.top_p < 1.0 or self.top_k > 0):
            raise ValueError(
                "rollout.sampling_mask_replay=true replays a top-k / top-p truncation, but sampling is not truncated "
                "(top_p=1, top_k=0): set rollout.top_p < 1 or rollout.top_k > 0, or leave sampling_mask_replay unset"
            )
        if self.kept_per_token and self.top_k > self.sampling_mask_max_kept:
            raise ValueError(
                f"rollout.top_k={self.top_k} keeps more tokens than sampling-mask replay records "
                f"(rollout.sampling_mask_max_kept={self.sampling_mask_max_kept}): raise sampling_mask_max_kept or "
                "set sampling_mask_replay=false"
            )
        return self

    @model_validator(mode="after")
    def _check_budgets(self) -> RolloutConfig:
        bad = {k: v for k, v in self.token_budgets.items() if v < 1}
        if bad:
            raise ValueError(f"token_budgets must be positive, got {bad}")
        return self


class QuantConfig(Section):
    """INT4-aware training: one weight-only INT4 spec for the learner's fake-quant, the weight sync, the rollout
    engine and the export (see `rollouts.quant.QuantSpec`)."""

    enabled: bool = Field(
        False, description="Quantize the targeted weights to INT4 for rollouts, weight sync and export."
    )
    mode: Literal["qat", "ptq"] = Field(
        "qat",
        description="qat: the learner trains through fake-quant (straight-through), so it optimizes the INT4 policy "
        "the rollouts run; ptq: the learner trains the full-precision weights, rollouts still run INT4 (the baseline).",
    )
    fake_quant_start_step: int = Field(
        1, ge=1, description="qat: first RL step whose update runs through fake-quant (earlier steps train as ptq)."
    )
    modules: Literal["routed_experts", "all_linear"] = Field(
        "routed_experts",
        description="routed_experts: only routed MoE experts, as Kimi K2 Thinking (attention, shared experts, dense "
        "MLP, router, embeddings, lm_head stay full precision); all_linear: every linear weight except "
        "lm_head and embeddings.",
    )
    targets: list[str] | None = Field(
        None, description="Regexes over parameter names to quantize, instead of `modules`' preset."
    )
    ignore: list[str] = Field(
        default_factory=list, description="Regexes over parameter names never quantized (applied after targets)."
    )
    group_size: Literal[32, 64, 128, 256] = Field(
        32, description="Input channels sharing one scale (the INT4 kernels take 32, 64, 128, 256)."
    )
    scale_rule: Literal["amax/7", "amax/7.5"] = Field(
        "amax/7",
        description="amax/7: q in [-7, 7], the grid reported for K2 Thinking, no weight clipped; amax/7.5: q in [-8, "
        "7], compressed-tensors' minmax observer (the extreme positive weight clips to 7).",
    )
    scale_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype scales are rounded to and stored in (K2 Thinking ships bf16)."
    )
    rollout_activation_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Activations the INT4 kernels run on. auto: the policy's dtype (model.dtype), so the engine "
        "differs from the learner by quantization only; float32: exact products, but torch's CPU INT4 "
        "kernel is slow with them on large matrices; bfloat16: the fast kernels (CPU and GPU), adding "
        "bf16 rounding to the mismatch.",
    )
    dense_min_rows: int | None = Field(
        None,
        ge=1,
        description="Rows (tokens) at or above which an INT4 product unpacks its weight on the fly and runs a dense "
        "matmul instead of the INT4 kernel; unset = 8 for float32 activations (where torch's CPU INT4 "
        "kernel loses), never for bfloat16.",
    )
    measure_attribution: bool = Field(
        True,
        description="Also score the batch with the other learner mode (with/without fake-quant) to report the "
        "quantization part of the mismatch.",
    )
    attribution_every: int = Field(
        10,
        ge=1,
        description="Measure the attribution every N updates (steps 1, N+1, ...): an extra forward pass over the "
        "batch each time it runs.",
    )


class LoraConfig(Section):
    """LoRA (`trainer.lora`): the policy's weights stay frozen and low-rank adapters are trained (peft); only the
    adapters travel to the rollout workers, which add them to their copy of the frozen base (see docs/lora.md)."""

    rank: int = Field(8, ge=1, description="Rank r of each adapter (B [out, r] @ A [r, in]).")
    alpha: float = Field(16.0, gt=0, description="Scale: the adapter adds (alpha / rank) x B @ A to its weight.")
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout on the adapters' input in the learner (0 with fused MoE experts as targets: peft "
        "cannot apply it there); > 0 makes the learner's logprobs noisy, which the mismatch then shows.",
    )
    targets: list[str] = Field(
        default_factory=lambda: ["."],
        description="Regexes searched in the names of the linear weights (`...q_proj.weight`) and fused MoE expert "
        "tensors (`...mlp.experts.gate_up_proj`, `...down_proj`) to adapt; lm_head is never adapted. Default: "
        "all of them.",
    )

    @model_validator(mode="after")
    def _check_targets(self) -> LoraConfig:
        if not self.targets:
            raise ValueError("targets is empty: give at least one regex (e.g. ['self_attn', 'experts'])")
        for pattern in self.targets:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"targets: {pattern!r} is not a valid regex ({e})") from e
        return self
