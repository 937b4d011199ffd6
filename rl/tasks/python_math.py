"""The multi-turn `python_math` task: computational questions (sums, primes, modular powers, Fibonacci numbers) that
are tedious by hand and one line of Python with the `python` tool (`envs.python_tool`); its answers are integers,
scored by the `numeric_answer` reward."""

from __future__ import annotations

import random
from typing import Any

from rl.tasks.registry import Task, register_task

DATA_SOURCE = "tiderl/python_math"
SYSTEM_PROMPT = "Answer with the help of the tools. Print the result in Python, then state the answer."


def _primes_below(n: int) -> int:
    return sum(all(k % d for d in range(2, int(k**0.5) + 1)) for k in range(2, n))


def _fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def _problem(rng: random.Random) -> tuple[str, str, int]:
    """(question, a reference program, answer)."""
    kind = rng.choice(["squares", "primes", "powmod", "fib", "divisible"])
    if kind == "squares":
        n = rng.randint(20, 99)
        return (
            f"What is the sum of the squares of the integers from 1 to {n}?",
            f"print(sum(i*i for i in range(1, {n + 1})))",
            sum(i * i for i in range(1, n + 1)),
        )
    if kind == "primes":
        n = rng.randint(100, 999)
        code = f"print(sum(all(k % d for d in range(2, int(k**0.5) + 1)) for k in range(2, {n})))"
        return f"How many prime numbers are smaller than {n}?", code, _primes_below(n)
    if kind == "powmod":
        a, b, m = rng.randint(2, 99), rng.randint(10, 99), rng.randint(100, 999)
        return f"What is {a} to the power {b}, modulo {m}?", f"print(pow({a}, {b}, {m}))", pow(a, b, m)
    if kind == "fib":
        n = rng.randint(30, 90)
        code = f"a, b = 0, 1\nfor _ in range({n}):\n    a, b = b, a + b\nprint(a)"
        return f"What is the Fibonacci number F({n}), with F(1) = F(2) = 1?", code, _fib(n)
    n, a, b = rng.randint(100, 9999), rng.randint(2, 9), rng.randint(11, 19)
    code = f"print(sum(1 for i in range(1, {n + 1}) if i % {a} == 0 or i % {b} == 0))"
    return (
        f"How many integers from 1 to {n} are divisible by {a} or by {b}?",
        code,
        sum(1 for i in range(1, n + 1) if i % a == 0 or i % b == 0),
    )


def make_rows(n: int, seed: int, split: str) -> list[dict[str, Any]]:
    """`n` problems in verl's layout; `extra_info.reference_code` holds a program that prints the answer."""
    rng = random.Random(f"python-{split}-{seed}")
    rows = []
    for i in range(n):
        question, code, answer = _problem(rng)
        rows.append(
            {
                "prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}],
                "data_source": DATA_SOURCE,
                "reward_model": {"style": "rule", "ground_truth": str(answer)},
                "extra_info": {"split": split, "index": i, "reference_code": code},
            }
        )
    return rows


TASK = register_task(Task(name="python_math", make_rows=make_rows, env="python", reward="numeric_answer"))
