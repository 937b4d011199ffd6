"""The `reward:` section: reward functions and reward models, and how their scores are summed."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from envs.config import Section


class RewardFunctionConfig(Section):
    name: str = Field(
        description="Registered reward name or 'path/to/file.py:fn' (verl's compute_score or a TRL reward function, "
        "sync or async)."
    )
    weight: float = Field(1.0, description="Weight in the summed reward.")
    timeout_s: float = Field(
        30.0,
        gt=0,
        description="Per call (a sample for verl-style functions, a batch for TRL-style); a call past it fails its "
        "samples.",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments passed to the function (e.g. a built-in's settings)."
    )


class RewardModelConfig(Section):
    """A reward model served by its own Ray actor (`rewards.models`)."""

    name: str = Field(description="Name in metrics (`reward/<name>`) and the breakdown.")
    kind: Literal["classifier", "judge"] = Field(
        description="classifier: AutoModelForSequenceClassification; judge: a causal LM prompted with a rubric."
    )
    path: str = Field(description="Hugging Face model directory.")
    weight: float = Field(1.0, description="Weight in the summed reward.")
    mode: Literal["pointwise", "pairwise"] = Field(
        "pointwise",
        description="judge: rate each response (Score: N of 10), or compare it with its group's first sample "
        "([[A]]/[[B]]/[[C]]).",
    )
    rubric: str | None = Field(
        None, description="judge: the system prompt (default: a correctness-first grading rubric)."
    )
    max_new_tokens: int = Field(64, ge=1, description="judge: tokens for the critique and verdict.")
    max_length: int = Field(1024, ge=16, description="Tokens of conversation kept (the end) per item.")
    batch_size: int = Field(16, ge=1, description="Items per forward pass.")
    num_cpus: float = Field(1.0, gt=0, description="Ray CPUs reserved for the actor.")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs reserved for the actor.")
    threads: int = Field(1, ge=1, description="torch threads inside the actor.")


class RewardConfig(Section):
    functions: list[RewardFunctionConfig] = Field(
        default_factory=lambda: [RewardFunctionConfig(name="calculator")],
        description="Reward functions; the first is the task verifier that `accuracy` reports. Empty only with an "
        "agent function as the environment (`env.name=agent.py:run`), whose returned reward then stands alone.",
    )
    models: list[RewardModelConfig] = Field(
        default_factory=list, description="Reward models (classifier or judge actors), added to the functions' sum."
    )
    models_async: bool = Field(
        True,
        description="Rollout workers send each finished group to the reward models while the step is still "
        "generating; false = score the whole batch after generation.",
    )
    truncation_penalty: float = Field(
        0.0,
        description="Added to the reward of a truncated sample (token budget, sequence length, loop, turn or "
        "tool-call limit), e.g. -1.",
    )

    @model_validator(mode="after")
    def _check_names(self) -> RewardConfig:
        names = [f.name for f in self.functions] + [m.name for m in self.models]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"reward names must be unique across functions and models (each is a metric): {repeated}")
        return self
