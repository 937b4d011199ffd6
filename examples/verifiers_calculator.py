"""A verifiers environment, written as any verifiers environment is, trained by tiderl (docs/hubs.md):

    pip install -e '.[verifiers]'
    tiderl train configs/verifiers_calculator.yaml

`load_environment()` builds a `vf.ToolEnv` (the `calc` tool, a dataset of arithmetic questions, a `vf.Rubric` that
checks the final answer) the way a verifiers hub package does; the last two lines are all tiderl needs: `run`, the
agent function `env.name` points at, runs the environment's own rollout against the rollout worker's endpoint, and
`TASK`, which `data.task` points at, serves the environment's dataset as the job's prompts. An installed hub
environment works the same with `vf.load_environment("its-id")` in place of `load_environment()`.

The questions are the default task's ("Compute 12*34+567."), so the built-in tiny policy, warm-started on that
task, calls the tool from the first step and RL has something to improve.
"""

import ast
import operator
import random
import re

import verifiers as vf
from datasets import Dataset

from envs.verifiers_env import VerifiersAgent
from rl.tasks.verifiers import verifiers_task

SYSTEM_PROMPT = "Answer with the help of the tools."
OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def calc(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: Integers with + - * and parentheses.
    """

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"cannot evaluate {expression!r}")

    return str(ev(ast.parse(expression, mode="eval").body))


def questions(n: int, seed: int) -> Dataset:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(100, 999)
        expression = rng.choice([f"{a}*{b}+{c}", f"{a}*{b}-{c}"])
        rows.append({"question": f"Compute {expression}.", "answer": calc(expression)})
    return Dataset.from_list(rows)


def correct_answer(parser, completion, answer) -> float:
    """1 when the last reply says "The answer is N" with the right N."""
    found = re.findall(r"answer is\s*(-?\d+)", parser.parse_answer(completion) or "")
    return float(bool(found) and found[-1] == answer)


def load_environment(num_train: int = 2000, num_eval: int = 200, seed: int = 0) -> vf.Environment:
    env = vf.ToolEnv(
        dataset=questions(num_train, seed),
        eval_dataset=questions(num_eval, seed + 1),
        system_prompt=SYSTEM_PROMPT,
        tools=[calc],
        max_turns=4,
        rubric=vf.Rubric(funcs=[correct_answer], weights=[1.0]),
    )
    # the tool as the default task's prompt shows it (tiderl's envs.calculator), which the tiny policy's warm start
    # learned; verifiers' own schema from the signature adds titles and an argument description
    env.tool_defs = [
        vf.Tool(
            name="calc",
            description="Evaluate an arithmetic expression.",
            parameters={"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
        )
    ]
    return env


ENV = load_environment()
run = VerifiersAgent(ENV)
TASK = verifiers_task(ENV, "verifiers_calculator")
