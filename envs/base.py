"""The environment API: a small async protocol the agent loop drives.

An environment is created per sample (`envs.registry.make_env`). `reset(row)` returns the opening chat messages and
the tools offered (as JSON-schema function specs, the format chat templates take); `step(calls)` executes the tool
calls the model made in its last turn and returns observation messages; `close()` frees what the environment
holds. Malformed calls never reach `step`: the agent loop turns them into an error observation itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class PromptRow:
    """One prompt in verl's parquet layout, as the environment and the reward functions see it."""

    index: int
    """Position of the row in its dataset; with `data_source` it identifies the prompt in logs."""
    messages: list[dict[str, Any]]
    """Opening chat messages (`[{"role": ..., "content": ...}]`)."""
    data_source: str
    """Which task the row comes from; reward functions may dispatch on it (verl convention)."""
    ground_truth: Any
    """`reward_model.ground_truth`: what the verifier checks the answer against."""
    extra_info: dict[str, Any] = field(default_factory=dict)
    """Free-form per-row data passed through to environments and reward functions."""


@dataclass
class ToolCall:
    """One parsed tool call from the model's turn."""

    name: str
    arguments: dict[str, Any]


@dataclass
class StepResult:
    """What the environment returns for one turn's tool calls."""

    observations: list[dict[str, Any]]
    """Chat messages appended to the conversation (role `tool`), one per call."""
    done: bool = False
    """The episode ends here (the model gets no further turn)."""
    reward: float | None = None
    """The environment's own score of the episode, if it has one (logged as the `env` reward, added to the sum)."""
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Env(Protocol):
    async def reset(self, row: PromptRow) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Opening messages and the tool specs offered for this row."""
        ...

    async def step(self, calls: list[ToolCall]) -> StepResult:
        """Execute the calls of one assistant turn."""
        ...

    async def close(self) -> None: ...
