"""The `code_tests` task: small Python problems checked by unit tests in the sandbox (the `code_tests` reward).

Twelve hand-written problem families (list and string functions, small programs on stdin/stdout), each drawn with
random constants, so the train and eval streams hold different variants. Rows carry their tests in verl's layouts,
spread over all three the reward reads: `assert_case` statements, `fn_name` calls with JSON arguments, and
stdin/stdout pairs; `extra_info.reference_solution` holds a program that passes them (the task's gold answer).
Single turn, no tools: the model answers with one ```python block.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

from rl.tasks.registry import Task, register_task

DATA_SOURCE = "tiderl/code_tests"
SYSTEM_PROMPT = "Write a Python solution. Answer with one ```python code block and nothing after it."

# A family: (rng) -> (problem statement, reference solution, tests as a ground truth object in verl's layout).
Family = Callable[[random.Random], tuple[str, str, dict[str, Any]]]


def _ints(rng: random.Random, n: int, lo: int = -20, hi: int = 20) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(n)]


def _words(rng: random.Random, n: int) -> str:
    return " ".join(
        rng.choice(["apple", "sky", "Level", "noon", "tree", "data", "ray", "kayak", "sun"]) for _ in range(n)
    )


def _asserts(fn: str, solution: Callable[..., Any], cases: list[tuple[Any, ...]]) -> dict[str, Any]:
    return {"assert_case": [f"assert {fn}({', '.join(map(repr, args))}) == {solution(*args)!r}" for args in cases]}


def _calls(fn: str, solution: Callable[..., Any], cases: list[tuple[Any, ...]]) -> dict[str, Any]:
    return {
        "fn_name": fn,
        "inputs": ["\n".join(json.dumps(a) for a in args) for args in cases],
        "outputs": [json.dumps(solution(*args)) for args in cases],
    }


def _stdio(solution: Callable[[str], str], inputs: list[str]) -> dict[str, Any]:
    return {"inputs": inputs, "outputs": [solution(text) for text in inputs]}


def scale(rng: random.Random):
    k = rng.randint(2, 9)
    cases = [(_ints(rng, rng.randint(0, 5)),) for _ in range(4)]
    return (
        f"Write a function `scale(xs)` that returns a new list with every element of the list `xs` multiplied by {k}.",
        f"def scale(xs):\n    return [x * {k} for x in xs]",
        _asserts("scale", lambda xs: [x * k for x in xs], cases),
    )


def count_vowels(rng: random.Random):
    cases = [(_words(rng, rng.randint(1, 4)),) for _ in range(4)]
    return (
        "Write a function `count_vowels(s)` that returns how many characters of the string `s` are vowels "
        "(a, e, i, o, u, in either case).",
        "def count_vowels(s):\n    return sum(c in 'aeiouAEIOU' for c in s)",
        _asserts("count_vowels", lambda s: sum(c in "aeiouAEIOU" for c in s), cases),
    )


def is_palindrome(rng: random.Random):
    cases = [(rng.choice(["Level", "noon", "kayak", "apple", "Racecar", "tree", "abca", "x"]),) for _ in range(4)]
    return (
        "Write a function `is_palindrome(s)` that returns True when the string `s` reads the same backwards, "
        "ignoring case, and False otherwise.",
        "def is_palindrome(s):\n    return s.lower() == s.lower()[::-1]",
        _asserts("is_palindrome", lambda s: s.lower() == s.lower()[::-1], cases),
    )


def fizz(rng: random.Random):
    a, b = rng.choice([(2, 3), (3, 5), (2, 7), (3, 4)])

    def solution(n: int) -> list[str]:
        return ["FizzBuzz" if i % (a * b) == 0 else "Fizz" if i % a == 0 else "Buzz" if i % b == 0 else str(i)
                for i in range(1, n + 1)]  # fmt: skip

    return (
        f"Write a function `fizz(n)` that returns a list of strings for the numbers 1 to n: 'FizzBuzz' for multiples "
        f"of both {a} and {b}, 'Fizz' for multiples of {a}, 'Buzz' for multiples of {b}, otherwise the number.",
        f"def fizz(n):\n    return ['FizzBuzz' if i % {a * b} == 0 else 'Fizz' if i % {a} == 0\n"
        f"            else 'Buzz' if i % {b} == 0 else str(i) for i in range(1, n + 1)]",
        _calls("fizz", solution, [(rng.randint(1, 16),) for _ in range(3)]),
    )


def running_sum(rng: random.Random):
    def solution(xs: list[int]) -> list[int]:
        out, total = [], 0
        for x in xs:
            total += x
            out.append(total)
        return out

    return (
        "Write a function `running_sum(xs)` that returns the list of prefix sums of the list `xs` "
        "(element i is xs[0] + ... + xs[i]).",
        "def running_sum(xs):\n    out, total = [], 0\n    for x in xs:\n        total += x\n"
        "        out.append(total)\n    return out",
        _calls("running_sum", solution, [(_ints(rng, rng.randint(0, 6)),) for _ in range(4)]),
    )


def digit_sum(rng: random.Random):
    return (
        "Write a function `digit_sum(n)` that returns the sum of the decimal digits of the non-negative integer n.",
        "def digit_sum(n):\n    return sum(int(d) for d in str(n))",
        _calls("digit_sum", lambda n: sum(int(d) for d in str(n)), [(rng.randint(0, 10**6),) for _ in range(4)]),
    )


def rotate(rng: random.Random):
    k = rng.randint(1, 3)
    cases = [(_ints(rng, rng.randint(k, 6), 0, 9),) for _ in range(3)]
    return (
        f"Write a function `rotate(xs)` that returns the list `xs` rotated left by {k} positions "
        f"(the first {k} elements move to the end). `xs` has at least {k} elements.",
        f"def rotate(xs):\n    return xs[{k}:] + xs[:{k}]",
        _asserts("rotate", lambda xs: xs[k:] + xs[:k], cases),
    )


def second_largest(rng: random.Random):
    def solution(xs: list[int]) -> int:
        return sorted(set(xs))[-2]

    cases = []
    while len(cases) < 4:
        xs = _ints(rng, rng.randint(2, 6))
        if len(set(xs)) >= 2:
            cases.append((xs,))
    return (
        "Write a function `second_largest(xs)` that returns the second largest distinct value of the list `xs` "
        "(it has at least two distinct values).",
        "def second_largest(xs):\n    return sorted(set(xs))[-2]",
        _calls("second_largest", solution, cases),
    )


def sum_divisible(rng: random.Random):
    k = rng.randint(2, 5)

    def solution(text: str) -> str:
        numbers = [int(t) for t in text.split()[1:]]
        return f"{sum(x for x in numbers if x % k == 0)}\n"

    inputs = []
    for _ in range(3):
        xs = _ints(rng, rng.randint(1, 6), 0, 30)
        inputs.append(f"{len(xs)}\n{' '.join(map(str, xs))}\n")
    return (
        f"Write a program that reads n on the first line and n integers on the second line from standard input, "
        f"and prints the sum of those divisible by {k}.",
        f"n = int(input())\nxs = list(map(int, input().split()))\nprint(sum(x for x in xs if x % {k} == 0))",
        _stdio(solution, inputs),
    )


def reverse_words(rng: random.Random):
    inputs = [_words(rng, rng.randint(1, 5)) + "\n" for _ in range(3)]
    return (
        "Write a program that reads one line of words from standard input and prints the words in reverse order, "
        "separated by single spaces.",
        "print(' '.join(input().split()[::-1]))",
        _stdio(lambda text: " ".join(text.split()[::-1]) + "\n", inputs),
    )


def power_mod(rng: random.Random):
    m = rng.choice([7, 11, 13, 97, 1000])
    inputs = [f"{rng.randint(2, 50)} {rng.randint(0, 40)}\n" for _ in range(3)]
    return (
        f"Write a program that reads two integers a and b from one line of standard input and prints a to the power "
        f"b, modulo {m}.",
        f"a, b = map(int, input().split())\nprint(pow(a, b, {m}))",
        _stdio(lambda text: f"{pow(*map(int, text.split()), m)}\n", inputs),
    )


def table(rng: random.Random):
    inputs = [f"{rng.randint(1, 5)}\n" for _ in range(3)]

    def solution(text: str) -> str:
        n = int(text)
        return "".join(" ".join(str(i * j) for j in range(1, n + 1)) + "\n" for i in range(1, n + 1))

    return (
        "Write a program that reads n from standard input and prints the n-by-n multiplication table: row i holds "
        "i*1 ... i*n separated by spaces.",
        "n = int(input())\nfor i in range(1, n + 1):\n    print(' '.join(str(i * j) for j in range(1, n + 1)))",
        _stdio(solution, inputs),
    )


FAMILIES: list[Family] = [
    scale, count_vowels, is_palindrome, fizz, running_sum, digit_sum, rotate, second_largest, sum_divisible,
    reverse_words, power_mod, table,
]  # fmt: skip


def make_rows(n: int, seed: int, split: str) -> list[dict[str, Any]]:
    """`n` problems in verl's layout; the ground truth is the tests as a JSON string (as verl's code datasets)."""
    rng = random.Random(f"code-{split}-{seed}")
    rows = []
    for i in range(n):
        statement, solution, tests = rng.choice(FAMILIES)(rng)
        rows.append(
            {
                "prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": statement}],
                "data_source": DATA_SOURCE,
                "reward_model": {"style": "rule", "ground_truth": json.dumps(tests)},
                "extra_info": {"split": split, "index": i, "reference_solution": solution},
            }
        )
    return rows


def gold_response(row: dict[str, Any]) -> str:
    """The reference solution as the model should answer it."""
    return f"```python\n{row['extra_info']['reference_solution']}\n```"


TASK = register_task(
    Task(name="code_tests", make_rows=make_rows, env="single_turn", reward="code_tests", gold=gold_response)
)
