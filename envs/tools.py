"""Tools from plain typed methods: `@tool` marks them, `ToolEnv` offers and runs them.

A tool's JSON schema (what chat templates show the model) is derived from its signature and Google-style
docstring by transformers' `get_json_schema`, the function the chat templates' own `tools=[fn]` path uses, so
the schema the model sees is exactly what a Hugging Face user would get for the same function. Arguments the model
writes are validated against that schema (`jsonschema`) before the tool runs; every failure (unknown tool, bad
arguments, a `ToolError` or any other exception from the tool) becomes an `Error: ...` observation the model
reads, counted in `info["tool_errors"]`, never an exception out of `step`.

`ToolEnv` is a convenience, not a requirement: anything with the three async methods of `envs.base.Env` is an
environment. Subclassing it is one level deep; override `start(row)` for the opening messages (default: the
row's prompt) and `close()` for cleanup, call `self.finish(reward)` from a tool to end the episode.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from typing import Any, TypeVar

import jsonschema
from transformers.utils import get_json_schema

from envs.base import PromptRow, StepResult, ToolCall

F = TypeVar("F", bound=Callable[..., Any])
_MARK = "__tiderl_tool__"


class ToolError(Exception):
    """Raised by a tool for an expected failure; the model sees `Error: <message>`."""


def tool(fn: F | None = None, *, spec: dict[str, Any] | None = None) -> Any:
    """Mark a method (sync or async) as a tool: `@tool`, or `@tool(spec=...)` to give the spec by hand.

    By default its type hints and docstring `Args:` section become its schema. A hand-written `spec` (the
    chat-template format) is for a prompt that must stay byte-identical, e.g. one a policy was trained on.
    """

    def mark(f: F) -> F:
        setattr(f, _MARK, spec if spec is not None else True)
        return f

    return mark(fn) if fn is not None else mark


def tool_spec(fn: Callable[..., Any]) -> dict[str, Any]:
    """The chat-template tool spec of a typed function (`{"type": "function", "function": {...}}`).

    Raises ValueError naming the function when a parameter lacks a type hint or a docstring description.
    """
    try:
        spec = get_json_schema(fn)
    except Exception as e:  # transformers raises TypeHintParsingException / DocstringParsingException
        raise ValueError(
            f"tool {fn.__name__!r}: {e}. Give every parameter a type hint and an `Args:` line in the docstring."
        ) from e
    spec["function"].pop("return", None)  # templates do not show it; it only lengthens the prompt
    return spec


class ToolEnv:
    """An environment whose tools are its `@tool` methods."""

    row: PromptRow
    done: bool = False
    reward: float | None = None

    async def reset(self, row: PromptRow) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        self.row, self.done, self.reward = row, False, None
        messages = self.start(row)
        if inspect.isawaitable(messages):
            messages = await messages
        return list(messages), self.tool_specs()

    def start(self, row: PromptRow) -> list[dict[str, Any]]:
        """The opening messages for `row` (may be async); default: the row's prompt."""
        return list(row.messages)

    async def step(self, calls: list[ToolCall]) -> StepResult:
        observations, errors = [], 0
        for call in calls:
            try:
                content = await self._run(call)
            except ToolError as e:
                content, errors = f"Error: {e}", errors + 1
            observations.append({"role": "tool", "name": call.name, "content": content})
        return StepResult(
            observations=observations,
            done=self.done,
            reward=self.reward if self.done else None,
            info={"tool_errors": errors},
        )

    async def close(self) -> None:
        return None

    def finish(self, reward: float | None = None) -> None:
        """End the episode after this turn's calls; `reward`, if given, is the environment's score of it."""
        self.done, self.reward = True, reward

    def tools(self) -> dict[str, Callable[..., Any]]:
        """The bound `@tool` methods by name."""
        return {name: getattr(self, name) for name in _tool_names(type(self))}

    def tool_specs(self) -> list[dict[str, Any]]:
        return [_cached_spec(type(self), name, fn) for name, fn in self.tools().items()]

    async def _run(self, call: ToolCall) -> str:
        tools = self.tools()
        fn = tools.get(call.name)
        if fn is None:
            raise ToolError(f"unknown tool {call.name!r}; available: {', '.join(sorted(tools)) or '(none)'}")
        schema = _cached_spec(type(self), call.name, fn)["function"]["parameters"]
        unexpected = sorted(set(call.arguments) - set(schema.get("properties", {})))
        if unexpected:
            raise ToolError(
                f"unexpected argument(s) for {call.name}: {', '.join(unexpected)}; it takes "
                f"{', '.join(schema.get('properties', {})) or 'none'}"
            )
        error = jsonschema.exceptions.best_match(
            _validator(type(self), call.name, fn).iter_errors(call.arguments)
        )  # what jsonschema.validate raises
        if error is not None:
            where = ".".join(str(p) for p in error.absolute_path)
            raise ToolError(f"bad arguments for {call.name}{f' ({where})' if where else ''}: {error.message}") from None
        try:
            result = fn(**call.arguments)
            if inspect.isawaitable(result):
                result = await result
        except ToolError:
            raise
        except Exception as e:  # a bug or a failure inside the tool: the model sees it, the episode goes on
            raise ToolError(f"{call.name} failed: {type(e).__name__}: {e}") from None
        return result if isinstance(result, str) else json.dumps(result)


@functools.cache
def _tool_names(cls: type) -> tuple[str, ...]:
    """Names of a class's `@tool` methods, found once per class (`step` looks them up on every call)."""
    return tuple(name for name, attr in inspect.getmembers(cls) if getattr(attr, _MARK, False))


_SPECS: dict[tuple[type, str], dict[str, Any]] = {}


def _cached_spec(cls: type, name: str, fn: Callable[..., Any]) -> dict[str, Any]:
    """Schemas are derived once per class and tool: `step` validates against them on every call."""
    key = (cls, name)
    if key not in _SPECS:
        given = getattr(fn, _MARK, True)
        _SPECS[key] = given if isinstance(given, dict) else tool_spec(fn)
    return _SPECS[key]


_VALIDATORS: dict[tuple[type, str], Any] = {}


def _validator(cls: type, name: str, fn: Callable[..., Any]) -> Any:
    """The arguments' validator, built once per class and tool (a `jsonschema` Validator). `jsonschema.validate`
    would check the schema itself against its metaschema on every call: a quarter of a calculator rollout's time."""
    key = (cls, name)
    if key not in _VALIDATORS:
        schema = _cached_spec(cls, name, fn)["function"]["parameters"]
        kind = jsonschema.validators.validator_for(schema)
        kind.check_schema(schema)
        _VALIDATORS[key] = kind(schema)
    return _VALIDATORS[key]
