"""What a verifiable answer is, for voting over several samples of one prompt (`tiderl eval --heavy`).

A reward function judges one answer against the ground truth; a majority vote needs two more things of the same
task: the final answer a response gives (`extract`, None when it gives none) and whether two answers are the same
(`same`). Both come from the reward's own verifier, so a vote counts "4484" and "4484.0" as one answer exactly when
the `calculator` reward would score them alike. They are registered under the reward's name
(`@register_answer("calculator")`), looked up by the job's first reward function (the task verifier), and users add
their own for their rewards the same three ways as rewards: the decorator, `path/to/file.py:name`, or an entry point
in the group `tiderl.answers`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from envs.registry import Registry, RegistryError
from rewards.calculator import extract_answer
from rewards.math import last_boxed


@dataclass(frozen=True)
class AnswerVerifier:
    """A task's final answers, as a vote compares them."""

    extract: Callable[[str], Any | None]
    """The final answer of a response (its whole text, `</think>` included), or None when it gives none."""
    same: Callable[[Any, Any], bool]
    """Whether two extracted answers are one answer (symmetric)."""


ANSWERS: Registry[AnswerVerifier] = Registry("answer verifier", "tiderl.answers")
register_answer = ANSWERS.register


def answer_verifier(reward_name: str) -> AnswerVerifier:
    """The verifier registered for `reward_name` (the job's first reward function), or an error saying how to add
    one."""
    try:
        verifier = ANSWERS.get(reward_name)
    except RegistryError as e:
        raise RegistryError(
            f"majority voting needs the final answer of a response and when two answers are the same, for the task "
            f"verifier reward {reward_name!r}: {e} Register an rewards.voting.AnswerVerifier under that name with "
            f"@register_answer({reward_name!r})."
        ) from None
    if not isinstance(verifier, AnswerVerifier):
        raise TypeError(f"answer verifier {reward_name!r} is a {type(verifier).__name__}, not an AnswerVerifier")
    return verifier


def _number(text: str) -> float | None:
    answer = extract_answer(text)
    return float(answer) if answer is not None else None


register_answer("calculator")(AnswerVerifier(_number, lambda a, b: a == b))
register_answer("numeric_answer")(ANSWERS.get("calculator"))


def _math_answer(text: str) -> Any | None:
    """math-verify's parse of the last `\\boxed{}` of the visible answer (else the visible text), as `math` scores."""
    from math_verify import parse  # the `math` reward's own dependency, loaded when a vote needs it

    visible = text.rsplit("</think>", 1)[-1]
    boxed = last_boxed(visible)
    if boxed is None and "\\boxed{" in visible:
        return None  # an unclosed box is no answer, as the reward scores it
    parsed = parse(f"${boxed}$" if boxed is not None else visible, parsing_timeout=None)
    return parsed or None


def _math_same(a: Any, b: Any) -> bool:
    from math_verify import verify

    return bool(verify(a, b, timeout_seconds=None)) or bool(verify(b, a, timeout_seconds=None))


register_answer("math")(AnswerVerifier(_math_answer, _math_same))


def _short_answer(text: str) -> str | None:
    """The visible answer lowercased, whitespace collapsed, trailing punctuation cut: `contains_answer` scores a
    containment, so two answers are one when their normalized texts are equal."""
    visible = " ".join(text.rsplit("</think>", 1)[-1].lower().split()).rstrip(".!?")
    visible = re.sub(r"^the answer is\s*:?\s*", "", visible)
    return visible or None


register_answer("contains_answer")(AnswerVerifier(_short_answer, lambda a, b: a == b))
