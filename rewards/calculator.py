"""Numeric answers (the calculator and python_math tasks): the visible answer's last number equals the ground truth."""

from __future__ import annotations

import re
from typing import Any

from rewards.registry import register_reward

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_answer(solution_str: str) -> str | None:
    """The last number after the last `</think>` (the visible answer), or None."""
    visible = solution_str.rsplit("</think>", 1)[-1]
    numbers = _NUMBER.findall(visible)
    return numbers[-1] if numbers else None


@register_reward("calculator")
@register_reward("numeric_answer")
def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None) -> dict:
    answer = extract_answer(solution_str)
    try:
        correct = answer is not None and float(answer) == float(ground_truth)
    except ValueError:
        correct = False
    return {"score": 1.0 if correct else 0.0, "acc": correct}
