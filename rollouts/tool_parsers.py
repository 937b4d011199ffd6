"""Tool-call parsers: one assistant turn's text -> the calls it makes, and an error message per malformed one.

Two formats, chosen by `rollout.tool_call_format`:

- `hermes` (Hermes, Qwen, the built-in model): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
- `kimi_k2` (Kimi K2 / K2 Thinking): `<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX
  <|tool_call_argument_begin|>{json}<|tool_call_end|>...<|tool_calls_section_end|>`.

Hand-written rather than taken from vLLM or SGLang: their parsers are tied to their servers' request types and
streaming state, and we need only the non-streaming split with per-call errors the model can read. A malformed
call never raises: the agent loop shows the model its error message as an observation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from envs.base import ToolCall

ToolCallParser = Callable[[str], tuple[list[ToolCall], list[str]]]

_HERMES = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
K2_SECTION_BEGIN, K2_SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
K2_CALL_BEGIN, K2_CALL_END, K2_ARGS_BEGIN = "<|tool_call_begin|>", "<|tool_call_end|>", "<|tool_call_argument_begin|>"
_K2_SECTION = re.compile(re.escape(K2_SECTION_BEGIN) + r"(.*?)(?:" + re.escape(K2_SECTION_END) + r"|$)", re.DOTALL)
_K2_CALL = re.compile(re.escape(K2_CALL_BEGIN) + r"(.*?)(" + re.escape(K2_CALL_END) + r"|$)", re.DOTALL)
_K2_ID = re.compile(r"\s*(?:functions\.)?([A-Za-z_][\w.\-]*):(\d+)\s*$")


def parse_hermes(text: str) -> tuple[list[ToolCall], list[str]]:
    calls: list[ToolCall] = []
    errors: list[str] = []
    for body in _HERMES.findall(text):
        try:
            payload = json.loads(body)
        except json.JSONDecodeError as e:
            errors.append(f"Error: tool call is not valid JSON ({e.msg}): {body[:80]}")
            continue
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            errors.append(f"Error: tool call needs a string 'name': {body[:80]}")
            continue
        arguments = _arguments(payload.get("arguments", {}))
        if not isinstance(arguments, dict):
            errors.append(f"Error: tool call 'arguments' must be an object: {body[:80]}")
            continue
        calls.append(ToolCall(name=payload["name"], arguments=arguments))
    if text.count("<tool_call>") > text.count("</tool_call>"):
        errors.append("Error: unterminated <tool_call>")
    return calls, errors


def parse_kimi_k2(text: str) -> tuple[list[ToolCall], list[str]]:
    calls: list[ToolCall] = []
    errors: list[str] = []
    for section in _K2_SECTION.finditer(text):
        if not section.group(0).endswith(K2_SECTION_END):
            errors.append(f"Error: unterminated {K2_SECTION_BEGIN}")
        for call in _K2_CALL.finditer(section.group(1)):
            body, closed = call.group(1), call.group(2)
            if not closed:
                errors.append(f"Error: unterminated {K2_CALL_BEGIN}: {body[:80]}")
                continue
            if K2_ARGS_BEGIN not in body:
                errors.append(f"Error: tool call has no {K2_ARGS_BEGIN}: {body[:80]}")
                continue
            head, args_text = body.split(K2_ARGS_BEGIN, 1)
            ident = _K2_ID.match(head)
            if ident is None:
                errors.append(f"Error: tool call id must look like functions.NAME:INDEX, got {head.strip()[:80]!r}")
                continue
            try:
                arguments = _arguments(json.loads(args_text))
            except json.JSONDecodeError as e:
                errors.append(
                    f"Error: arguments of {ident.group(1)} are not valid JSON ({e.msg}): {args_text.strip()[:80]}"
                )
                continue
            if not isinstance(arguments, dict):
                errors.append(f"Error: arguments of {ident.group(1)} must be a JSON object: {args_text.strip()[:80]}")
                continue
            calls.append(ToolCall(name=ident.group(1), arguments=arguments))
    return calls, errors


def _arguments(arguments: Any) -> Any:
    """Arguments given as a JSON string (OpenAI style) are decoded; anything else is returned as is."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


TOOL_CALL_PARSERS: dict[str, ToolCallParser] = {"hermes": parse_hermes, "kimi_k2": parse_kimi_k2}
