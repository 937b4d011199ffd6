"""Agent functions: a user's agent, written against the OpenAI API, as an environment.

An agent function is `async def run(client, row) -> float | dict[str, float]`: `client` is an `openai.AsyncOpenAI`
pointed at the rollout worker's own OpenAI-compatible endpoint (`rollouts.endpoint`), `row` the `PromptRow` of the
sample. The agent talks to the policy exactly as it would to any server (chat completions with `tools`, its own
tool execution, its own history management); the worker records every request's tokens at the endpoint, and the
value the agent returns is the reward of the episode's training sequences: a number, or named components
(`{"correct": 1.0, "format": 0.1}`) that are summed and logged one by one.

`env.name=my_agent.py:run` selects one; the registry resolves it like any plugin. This module holds the protocol
and the checks both sides rely on, and nothing else: it imports neither `openai` nor anything of the upper layers
(the worker builds the client; environment hub adapters build agent functions on this same contract).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from envs.base import PromptRow

AgentFn = Callable[[Any, PromptRow], Awaitable[float | Mapping[str, float]]]
"""`async def run(client: openai.AsyncOpenAI, row: PromptRow) -> float | dict[str, float]`."""


class AgentResultError(ValueError):
    """An agent function returned something that is not a reward."""


def is_agent_function(obj: Any) -> bool:
    """Whether a resolved `env.name` is an agent function (a coroutine function) rather than an environment class."""
    return inspect.iscoroutinefunction(obj) or (
        not inspect.isclass(obj) and inspect.iscoroutinefunction(getattr(obj, "__call__", None))
    )


def agent_signature_problem(obj: Any) -> str | None:
    """Why `obj` cannot be called as `run(client, row)` (None: it can): checked before any actor starts."""
    if not is_agent_function(obj):
        return "is not an async function (an agent is `async def run(client, row) -> float | dict`)"
    try:
        inspect.signature(obj).bind(object(), object())
    except TypeError as e:
        return f"cannot be called as run(client, row): {e}"
    except ValueError:  # a builtin without a signature: let the call decide
        return None
    return None


def agent_reward(value: Any, where: str) -> tuple[float, dict[str, float]]:
    """(reward, components) from what an agent returned: a finite number (no components), or a non-empty mapping of
    names to finite numbers (the reward is their sum). `where` names the agent and the sample in the error."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Mapping)):
        raise AgentResultError(
            f"{where} returned {type(value).__name__} {value!r:.80}; an agent returns a number or a dict of numbers"
        )
    if not isinstance(value, Mapping):
        if not math.isfinite(float(value)):
            raise AgentResultError(f"{where} returned {value}; the reward must be finite")
        return float(value), {}
    if not value:
        raise AgentResultError(f"{where} returned an empty dict; name at least one reward component")
    parts: dict[str, float] = {}
    for name, part in value.items():
        if not isinstance(name, str) or isinstance(part, bool) or not isinstance(part, (int, float)):
            raise AgentResultError(
                f"{where} returned component {name!r}: {part!r:.80}; components map names to numbers"
            )
        if not math.isfinite(float(part)):
            raise AgentResultError(f"{where} returned component {name!r} = {part}; rewards must be finite")
        parts[name] = float(part)
    return sum(parts.values()), parts
