"""The `env:` section of a job config, and `Section`, the base every section of every layer is built on.

Each package owns the config of its own components (`rollouts.config`, `rewards.config`, `rl.trainer.config`);
`rl.config.JobConfig` composes them. These modules import only pydantic, so a bad config fails in well under a
second, before Ray or torch are touched.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """A config section: unknown keys are errors (a typo names its closest valid key), assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SandboxConfig(Section):
    """Limits of the python tool's sandbox (`envs.sandbox`), per call."""

    cpu_seconds: int = Field(5, ge=1, description="CPU time per process (RLIMIT_CPU).")
    wall_seconds: float = Field(10.0, gt=0, description="Wall-clock time; the whole sandbox is killed after it.")
    memory_mb: int = Field(512, ge=32, description="Address space per process (RLIMIT_AS).")
    max_processes: int = Field(
        32, ge=1, description="Processes of the sandbox user (RLIMIT_NPROC; fork bombs stop here)."
    )
    max_output_bytes: int = Field(16384, ge=256, description="stdout/stderr kept per call; more is cut and reported.")
    max_file_mb: int = Field(16, ge=1, description="Largest file the code may write (RLIMIT_FSIZE).")
    python: str | None = Field(
        None, description="Interpreter for model code (default: /usr/bin/python3, else this one)."
    )
    allow_unisolated: bool = Field(
        False,
        description="Without bubblewrap, run model code with rlimits only (no network/filesystem isolation) instead "
        "of refusing.",
    )


class ContextConfig(Section):
    """Context management on long horizons (K2 Thinking's on its long tool runs): once an episode's context passes
    `budget_tokens`, older tool results are hidden behind `placeholder`, and when that is not enough every exchange
    (an assistant turn and its results) but the last `keep_last` is dropped. Each rewrite starts a new training
    sequence of the episode (`rollouts.context`); nothing is re-tokenized."""

    budget_tokens: int = Field(
        0,
        ge=0,
        description="Context length (tokens) past which the context is rewritten after a tool step; 0 = off (the "
        "context only grows, up to rollout.max_tokens_per_sample).",
    )
    keep_last: int = Field(
        2, ge=1, description="The most recent tool steps (an assistant turn and its results) always kept verbatim."
    )
    placeholder: str = Field(
        "[tool result hidden]",
        min_length=1,
        description="What a hidden tool result's content becomes; dropped exchanges leave this text as a user "
        "message after the opening prompt.",
    )
    drop_turns: bool = Field(
        True,
        description="When hiding older tool results does not bring the context under the budget, drop every step "
        "but the last `keep_last` too (the context then stays within the budget + one turn); false = hide results "
        "only.",
    )


class EnvConfig(Section):
    """The tool environment the agent loop runs against."""

    name: str = Field(
        "calculator",
        description="Registered environment name, 'path/to/file.py:Class', or an agent function "
        "'path/to/agent.py:run' (`async def run(client: openai.AsyncOpenAI, row)`, docs/agents.md).",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for the environment's constructor (your own environments)."
    )
    max_turns: int = Field(4, ge=1, description="Assistant turns per sample before it is truncated.")
    max_tool_calls: int = Field(4, ge=0, description="Tool calls per sample before it is truncated.")
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    context: ContextConfig = Field(default_factory=ContextConfig)
