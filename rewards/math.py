"""Math answers checked with `math-verify`: the last `\\boxed{...}` of the visible answer (else the visible text)
against the ground truth, as mathematical objects (fractions = decimals, `\\dfrac`, thousands separators, sets in
any order, open vs closed intervals, ...).

math-verify's own timeouts use SIGALRM, which works only in the main thread of the main interpreter; reward
functions run in threads (so the scorer can time them out), so they are switched off here and the scorer's
per-function `timeout_s` bounds the call instead.
"""

from __future__ import annotations

import logging
from typing import Any

from math_verify import parse, verify

from rewards.registry import register_reward

logging.getLogger("math_verify").setLevel(logging.ERROR)  # one "timeout is disabled" warning per call otherwise


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` (nested braces balanced), or None.

    Hand-written: math-verify extracts *every* boxed answer (`boxed="all"` gives `{3, 5}` for "\\boxed{3} then
    \\boxed{5}"), while the convention for a final answer is the last one.
    """
    start = text.rfind("\\boxed{")
    while start != -1:
        depth, i = 0, start + len("\\boxed")
        for i in range(start + len("\\boxed"), len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start + len("\\boxed{") : i]
        start = text.rfind("\\boxed{", 0, start)  # unbalanced: an earlier complete one may still count
    return None


def _as_latex(text: str) -> str:
    return text if "$" in text or "\\boxed" in text else f"${text}$"


@register_reward("math")
def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None) -> dict:
    visible = solution_str.rsplit("</think>", 1)[-1]
    boxed = last_boxed(visible)
    if boxed is None and "\\boxed{" in visible:
        return {"score": 0.0, "acc": False, "pred": None}  # a boxed answer that never closes is no answer
    gold = parse(_as_latex(str(ground_truth)), parsing_timeout=None)
    pred = parse(f"${boxed}$" if boxed is not None else visible, parsing_timeout=None)
    correct = bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=None)
    return {"score": 1.0 if correct else 0.0, "acc": correct, "pred": pred[-1] if pred else None}
