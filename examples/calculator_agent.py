"""A calculator agent written with the official `openai` package, trained by tiderl as it is (docs/agents.md).

    tiderl train configs/calculator.yaml env.name=examples/calculator_agent.py:run reward.functions=[]

It runs its own tool loop: ask the model, execute the `calc` calls it makes, send the results back, and score the
final answer against the row's ground truth. Nothing in it is tiderl's except the `row` it receives.
"""

import ast
import json
import operator
import re

CALC = {
    "type": "function",
    "function": {
        "name": "calc",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    },
}
OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def calc(expression: str) -> str:
    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"cannot evaluate {expression!r}")

    try:
        return str(ev(ast.parse(expression, mode="eval").body))
    except (ValueError, SyntaxError, ZeroDivisionError) as e:
        return f"Error: {e}"


async def run(client, row) -> float:
    messages = list(row.messages)
    for _ in range(4):
        reply = (await client.chat.completions.create(model="policy", messages=messages, tools=[CALC])).choices[0]
        messages.append(reply.message.model_dump(exclude_none=True))
        if not reply.message.tool_calls:
            break
        for call in reply.message.tool_calls:
            expression = json.loads(call.function.arguments).get("expression", "")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": calc(str(expression))})
    answer = re.search(r"answer is\s*(-?\d+)", reply.message.content or "")
    return float(answer is not None and int(answer.group(1)) == int(row.ground_truth))
