"""Short text answers (the search_qa task): the visible answer contains the ground truth as a whole word."""

from __future__ import annotations

import re
from typing import Any

from rewards.registry import register_reward


@register_reward("contains_answer")
def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None) -> dict:
    """1 when the text after the last `</think>` contains `ground_truth` (case-insensitive, whole words)."""
    visible = solution_str.rsplit("</think>", 1)[-1]
    truth = str(ground_truth).strip()
    correct = bool(truth) and re.search(rf"(?<!\w){re.escape(truth)}(?!\w)", visible, re.IGNORECASE) is not None
    return {"score": 1.0 if correct else 0.0, "acc": correct}
