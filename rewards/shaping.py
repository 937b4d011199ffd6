"""Shaping rewards: the response format, Kimi K1.5's length reward, and DAPO's overlong penalty.

All are TRL-style (a batch per call): the format reward reads every assistant turn of a completion, the length
reward compares the samples of a group.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from rewards.registry import register_reward
from rollouts.tool_parsers import TOOL_CALL_PARSERS

_THINK = re.compile(r"^\s*<think>(.*?)</think>(.*)$", re.DOTALL)


@register_reward("format")
def format_reward(
    prompts: list, completions: list[list[dict[str, Any]]], tool_call_format: str = "hermes", **kwargs: Any
) -> list[float]:
    """1.0 when every assistant turn is `<think>...</think>` then text, every tool call in it parses, and the
    final turn has a visible answer; else 0.0. `tool_call_format` (hermes | kimi_k2) via the function's kwargs."""
    parse = TOOL_CALL_PARSERS[tool_call_format]
    scores = []
    for messages in completions:
        turns = [m.get("content") or "" for m in messages if m.get("role") == "assistant"]
        ok = bool(turns)
        for k, text in enumerate(turns):
            match = _THINK.match(text)
            if match is None or "<think>" in match.group(2) or "</think>" in match.group(2):
                ok = False
                break
            calls, errors = parse(match.group(2))
            if errors or (k == len(turns) - 1 and (calls or not match.group(2).strip())):
                ok = False
                break
        scores.append(1.0 if ok else 0.0)
    return scores


@register_reward("k1.5_length")
def length_reward(
    prompts: list,
    completions: list,
    completion_ids: list[list[int]],
    group_ids: list[int],
    correct: list[bool] | None = None,
    trainer_state: Any = None,
    warmup_steps: int = 0,
    **kwargs: Any,
) -> list[float]:
    """Kimi K1.5's length reward, within each group of samples of one prompt:
    λ = 0.5 − (len − min_len) / (max_len − min_len); a correct sample gets λ, a wrong one min(0, λ), so short
    correct answers gain and long wrong ones lose. 0 for everyone while `trainer_state.global_step` <=
    `warmup_steps` (K1.5 trains without it first) and in groups whose lengths are all equal. Needs a verifier as
    the job's first reward function (its verdicts arrive as `correct`)."""
    if correct is None:
        raise ValueError("k1.5_length needs the task's verifier as the first entry of reward.functions")
    step = getattr(trainer_state, "global_step", 0)
    if step <= warmup_steps:
        return [0.0] * len(completions)
    lengths = [len(ids) for ids in completion_ids]
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(group_ids):
        members[g].append(i)
    scores = [0.0] * len(lengths)
    for idx in members.values():
        lo, hi = min(lengths[i] for i in idx), max(lengths[i] for i in idx)
        if hi == lo:
            continue
        for i in idx:
            lam = 0.5 - (lengths[i] - lo) / (hi - lo)
            scores[i] = lam if correct[i] else min(0.0, lam)
    return scores


@register_reward("dapo_overlong")
def overlong_penalty(
    prompts: list,
    completions: list,
    completion_ids: list[list[int]],
    max_length: int = 256,
    cache_length: int = 64,
    **kwargs: Any,
) -> list[float]:
    """DAPO's soft overlong punishment on the generated length L: 0 up to `max_length - cache_length`, then
    linearly down to -1 at `max_length`, and -1 beyond (set `max_length` to the task's token budget)."""
    if not 0 < cache_length <= max_length:
        raise ValueError(f"dapo_overlong needs 0 < cache_length <= max_length, got {cache_length}, {max_length}")
    start = max_length - cache_length
    return [0.0 if len(ids) <= start else max(-1.0, (start - len(ids)) / cache_length) for ids in completion_ids]
