"""The default task: multi-step arithmetic that needs the `calc` tool (`envs.calculator`).

`make_rows` generates the prompts in verl's layout, scored by the `calculator` reward (the last number of the
visible answer equals the ground truth); `demonstration` writes the supervised warm start's target turns, with the
tool skipped on purpose in a share of them so the warm-started policy is imperfect and RL has something to learn.
"""

from __future__ import annotations

import random
import re
from typing import Any

from envs.calculator import evaluate, format_number
from rl.tasks.registry import Task, register_task

DATA_SOURCE = "tiderl/calculator"
SYSTEM_PROMPT = "Answer with the help of the tools."


def _problem(rng: random.Random) -> tuple[str, int]:
    # Fixed-width operands: two-digit times two-digit is beyond a tiny model's mental arithmetic, and a constant
    # expression length keeps copying it into the tool call learnable in a short warm start.
    a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(100, 999)
    expression = rng.choice([f"{a}*{b}+{c}", f"{a}*{b}-{c}"])
    return expression, int(evaluate(expression))


def make_rows(n: int, seed: int, split: str) -> list[dict[str, Any]]:
    """`n` prompts in verl's parquet layout. Train and eval use disjoint seeds, so their problems differ."""
    rng = random.Random(f"{split}-{seed}")
    rows = []
    for i in range(n):
        expression, answer = _problem(rng)
        rows.append(
            {
                "prompt": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": f"Compute {expression}."},
                ],
                "data_source": DATA_SOURCE,
                "reward_model": {"style": "rule", "ground_truth": str(answer)},
                "extra_info": {"split": split, "index": i, "expression": expression},
            }
        )
    return rows


def demonstration(expression: str, use_tool: bool) -> list[dict[str, Any]]:
    """The assistant's side of an episode, as chat messages.

    With the tool: call `calc`, read the result, answer. Without it the demonstration restates the expression
    (practice for the copying that tool calls need) and *guesses* its last operand: a wrong answer, on purpose.
    Demonstrating the true answer unaided instead would teach a tiny model rough mental arithmetic, which then
    competes with reading the tool's result.
    """
    answer = format_number(evaluate(expression))
    if not use_tool:
        guess = re.split(r"[-+*/]", expression)[-1]
        return [
            {
                "role": "assistant",
                "content": f"<think>{expression} is hard; I will guess.</think>The answer is {guess}.",
            }
        ]
    call = {"type": "function", "function": {"name": "calc", "arguments": {"expression": expression}}}
    return [
        {"role": "assistant", "content": "<think>I need calc.</think>", "tool_calls": [call]},
        {"role": "tool", "name": "calc", "content": answer},
        {"role": "assistant", "content": f"<think>calc says {answer}.</think>The answer is {answer}."},
    ]


TASK = register_task(
    Task(name="calculator", make_rows=make_rows, env="calculator", reward="calculator", demonstration=demonstration)
)
