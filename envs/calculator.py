"""The default task: multi-step arithmetic that needs the `calc` tool.

Questions like "Compute 37*4+19." are too hard for a tiny model to answer unaided, easy with the tool: think,
call `calc` with the expression, read the result, answer. `make_calculator_rows` generates the prompts in verl's
layout; `demonstration` writes the supervised warm start's target turns, with the tool skipped on purpose in a
share of them so the warm-started policy is imperfect and RL has something to learn.
"""

from __future__ import annotations

import ast
import operator
import random
import re
from typing import Any

from envs.registry import register_env
from envs.tools import ToolEnv, ToolError, tool

DATA_SOURCE = "tiderl/calculator"
SYSTEM_PROMPT = "Answer with the help of the tools."
# Hand-written rather than a library (e.g. simpleeval): twenty lines of `ast` give a closed set of operators
# and explicit bounds on operand size, which is what a tool exposed to model-written input needs.
_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_MAX_ABS = 10**12


def evaluate(expression: str) -> int | float:
    """Evaluate + - * / // % and parentheses on numbers; raises ValueError on anything else."""
    if len(expression) > 200:
        raise ValueError("expression longer than 200 characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from e

    def ev(node: ast.AST) -> int | float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = ev(node.left), ev(node.right)
            try:
                result = _BINOPS[type(node.op)](left, right)
            except ZeroDivisionError as e:
                raise ValueError("division by zero") from e
            if abs(result) > _MAX_ABS:
                raise ValueError("result out of range")
            return result
        raise ValueError(f"unsupported element {type(node).__name__} in {expression!r}")

    return ev(tree)


def format_number(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value) if isinstance(value, int) else f"{value:.6g}"


# Written out rather than derived from `calc`'s signature: it is the default job's prompt, which the warm start
# and the figures in the README were measured with. The derived spec differs only by the argument's description.
CALC_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "calc",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    },
}


@register_env("calculator")
class CalculatorEnv(ToolEnv):
    """One tool, `calc(expression)`; the episode ends when the model answers without calling it."""

    @tool(spec=CALC_TOOL)
    def calc(self, expression: str) -> str:
        """Evaluate an arithmetic expression.

        Args:
            expression: Numbers with + - * / // % and parentheses.
        """
        try:
            return format_number(evaluate(expression))
        except ValueError as e:
            raise ToolError(str(e)) from None


def _problem(rng: random.Random) -> tuple[str, int]:
    # Fixed-width operands: two-digit times two-digit is beyond a tiny model's mental arithmetic, and a constant
    # expression length keeps copying it into the tool call learnable in a short warm start.
    a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(100, 999)
    expression = rng.choice([f"{a}*{b}+{c}", f"{a}*{b}-{c}"])
    return expression, int(evaluate(expression))


def make_calculator_rows(n: int, seed: int, split: str) -> list[dict[str, Any]]:
    """`n` prompts in verl's parquet layout. Train and eval use disjoint seeds, so their problems differ."""
    rng = random.Random(f"{split}-{seed}")
    rows = []
    for i in range(n):
        expression, answer = _problem(rng)
        rows.append(
            {
                "prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": f"Compute {expression}."}],
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
        return [{"role": "assistant", "content": f"<think>{expression} is hard; I will guess.</think>The answer is {guess}."}]
    call = {"type": "function", "function": {"name": "calc", "arguments": {"expression": expression}}}
    return [
        {"role": "assistant", "content": "<think>I need calc.</think>", "tool_calls": [call]},
        {"role": "tool", "name": "calc", "content": answer},
        {"role": "assistant", "content": f"<think>calc says {answer}.</think>The answer is {answer}."},
    ]
