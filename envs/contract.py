"""The environment contract, checked by a scripted policy: what the agent loop relies on from every environment.

`check_env` plays one episode without a model: reset from a row, then one turn calling every offered tool with
arguments synthesized from its schema, then one turn of calls a model gets wrong (an unknown tool, arguments of
the wrong type), then close. It raises `ContractError` naming the first broken promise. `tiderl check-env NAME`
runs it on a registered environment or a `path/to/file.py:Class`; the test suite runs it on every registered one.
"""

from __future__ import annotations

import asyncio
from typing import Any

import jsonschema

from envs.base import PromptRow, StepResult, ToolCall
from envs.config import EnvConfig
from envs.registry import make_env

DEFAULT_ROW = PromptRow(
    index=0, messages=[{"role": "user", "content": "Hello."}], data_source="tiderl/contract", ground_truth="0"
)
_EXAMPLES = {"string": "1", "integer": 1, "number": 1.0, "boolean": True, "array": [], "object": {}, "null": None}
_WRONG = {
    "string": 12345,
    "integer": "not a number",
    "number": "not a number",
    "boolean": "yes",
    "array": 1,
    "object": 1,
}


class ContractError(AssertionError):
    """An environment broke the contract the agent loop relies on."""


def check_env(cfg: EnvConfig, row: PromptRow = DEFAULT_ROW) -> dict[str, Any]:
    """Run the scripted episode; returns what was seen (tools, observations) for reporting."""
    return asyncio.run(_check(cfg, row))


async def _check(cfg: EnvConfig, row: PromptRow) -> dict[str, Any]:
    env = make_env(cfg)
    try:
        opened = await env.reset(row)
        if not (isinstance(opened, tuple) and len(opened) == 2):
            raise ContractError(f"{cfg.name}: reset must return (messages, tools), got {type(opened).__name__}")
        messages, tools = opened
        _check_messages(cfg.name, messages)
        names = [_check_tool(cfg.name, spec) for spec in tools]
        good = [ToolCall(name, example_arguments(spec)) for name, spec in zip(names, tools, strict=True)]
        observations = await _step(cfg.name, env, good, "well-formed calls")
        wrong = [ToolCall("no_such_tool", {})] + [
            ToolCall(n, wrong_arguments(s)) for n, s in zip(names, tools, strict=True)
        ]
        errors = await _step(cfg.name, env, [c for c in wrong if c.arguments is not None], "malformed calls")
    finally:
        await env.close()
    return {
        "tools": names,
        "observations": [o["content"] for o in observations],
        "error_observations": [o["content"] for o in errors],
    }


def _check_messages(name: str, messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ContractError(f"{name}: reset must return a non-empty list of opening chat messages")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ContractError(f"{name}: every opening message needs string 'role' and 'content', got {m!r}")


def _check_tool(name: str, spec: Any) -> str:
    fn = spec.get("function") if isinstance(spec, dict) else None
    if spec.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ContractError(
            f"{name}: a tool spec must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}, got "
            f"{spec!r}"
        )
    params = fn.get("parameters", {"type": "object", "properties": {}})
    try:
        jsonschema.Draft202012Validator.check_schema(params)
    except jsonschema.SchemaError as e:
        raise ContractError(
            f"{name}: tool {fn['name']!r} parameters are not a valid JSON schema: {e.message}"
        ) from None
    if params.get("type") != "object":
        raise ContractError(f"{name}: tool {fn['name']!r} parameters must be a JSON object schema")
    return fn["name"]


def example_arguments(spec: dict[str, Any]) -> dict[str, Any]:
    """Values for the tool's required parameters, of the schema's types (enums: the first choice)."""
    params = spec["function"].get("parameters", {})
    props = params.get("properties", {})
    return {
        k: (props[k]["enum"][0] if "enum" in props[k] else _EXAMPLES.get(props[k].get("type"), "1"))
        for k in params.get("required", [])
        if k in props
    }


def wrong_arguments(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The required parameters with values of the wrong type; None when the tool takes no typed parameter."""
    props = spec["function"].get("parameters", {}).get("properties", {})
    args = {k: _WRONG[p["type"]] for k, p in props.items() if p.get("type") in _WRONG}
    return args or None


async def _step(name: str, env: Any, calls: list[ToolCall], what: str) -> list[dict[str, Any]]:
    try:
        result = await env.step(calls)
    except Exception as e:
        raise ContractError(
            f"{name}: step raised {type(e).__name__}: {e} on {what}; tool failures must come back as observations"
        ) from e
    if not isinstance(result, StepResult):
        raise ContractError(f"{name}: step must return envs.base.StepResult, got {type(result).__name__}")
    if len(result.observations) != len(calls):
        raise ContractError(
            f"{name}: step returned {len(result.observations)} observations for {len(calls)} {what}; one per call"
        )
    for obs in result.observations:
        if not (isinstance(obs, dict) and obs.get("role") == "tool" and isinstance(obs.get("content"), str)):
            raise ContractError(f"{name}: observations must be {{'role': 'tool', 'content': str}}, got {obs!r}")
    if what == "malformed calls" and not all(o["content"].startswith("Error") for o in result.observations):
        bad = [o["content"][:60] for o in result.observations if not o["content"].startswith("Error")]
        raise ContractError(f"{name}: {what} should come back as 'Error: ...' observations, got {bad}")
    return result.observations
