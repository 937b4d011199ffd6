"""The real-model task: one- and two-step arithmetic word problems, answered in `\\boxed{}` and scored by the `math`
reward (math-verify).

Small numbers and five sentence shapes ("Ana buys 4 bags with 7 cards in each bag. How many cards is that in
all?"): within reach of a small pretrained chat model (SmolLM2-135M-Instruct answers about a fifth of them right
greedily before RL, `docs/models.md`), far from solved, and checked exactly. No tool: the model reasons in text.
`problems` is the generator `benchmarks/vs_trl.py` shares (its prompt asks for "The answer is N." instead).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from envs.calculator import evaluate
from rl.tasks.registry import Task, register_task

DATA_SOURCE = "tiderl/word_problems"
SYSTEM_PROMPT = "Solve the problem. Put the final answer in \\boxed{}."
_NAMES = ["Ana", "Ben", "Chloe", "Dev", "Ema", "Finn", "Gus", "Hana"]
_ITEMS = ["apple", "book", "pencil", "marble", "cookie", "card", "shell", "sticker"]
_SHAPES = [
    ("{n} has {a} {i}s. {n} buys {b} more. How many {i}s does {n} have now?", "{a}+{b}"),
    ("{n} has {a} {i}s and gives {b} of them away. How many {i}s does {n} have left?", "{a}-{b}"),
    ("{n} buys {a} bags with {b} {i}s in each bag. How many {i}s is that in all?", "{a}*{b}"),
    ("{n} has {c} {i}s and buys {a} boxes of {b} {i}s. How many {i}s does {n} have now?", "{c}+{a}*{b}"),
    ("{n} has {a} packs of {b} {i}s and loses {c} {i}s. How many {i}s are left?", "{a}*{b}-{c}"),
]


def problems(n: int, seed: int, split: str) -> Iterator[tuple[str, str, int]]:
    """`n` (question, expression, answer) triples; train and eval come from disjoint streams."""
    rng = random.Random(f"words-{split}-{seed}")
    for _ in range(n):
        text, expr = rng.choice(_SHAPES)
        a, b = rng.randint(2, 12), rng.randint(2, 9)
        c = rng.randint(1, a * b - 1) if "-{c}" in expr else rng.randint(1, 20)
        if expr == "{a}-{b}":
            a, b = max(a, b) + 1, min(a, b)
        values = {"n": rng.choice(_NAMES), "i": rng.choice(_ITEMS), "a": a, "b": b, "c": c}
        expression = expr.format(**values)
        yield text.format(**values), expression, int(evaluate(expression))


def make_rows(n: int, seed: int, split: str) -> list[dict[str, Any]]:
    """`n` problems in verl's layout."""
    return [
        {
            "prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}],
            "data_source": DATA_SOURCE,
            "reward_model": {"style": "rule", "ground_truth": str(answer)},
            "extra_info": {"split": split, "index": i, "expression": expression},
        }
        for i, (question, expression, answer) in enumerate(problems(n, seed, split))
    ]


TASK = register_task(Task(name="word_problems", make_rows=make_rows, env="single_turn", reward="math"))
