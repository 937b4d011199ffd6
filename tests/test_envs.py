"""The environment API: tool schemas from type hints, argument validation, the contract on every registered
environment, the built-in search and python environments, and both tool-call formats."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Literal

import pytest
from typer.testing import CliRunner

from envs.base import PromptRow, ToolCall
from envs.calculator import CALC_TOOL, CalculatorEnv
from envs.config import EnvConfig
from envs.contract import ContractError, check_env
from envs.registry import ENVS, load_builtin_envs, make_env
from envs.sandbox import SandboxUnavailable
from envs.tools import ToolEnv, ToolError, tool, tool_spec
from rewards.answers import compute_score as contains_answer
from rewards.calculator import compute_score as numeric_answer
from rl.launch.cli import app
from rl.loop.data import builtin_rows, to_prompt_row
from rollouts.tool_parsers import parse_hermes, parse_kimi_k2

ROW = PromptRow(0, [{"role": "user", "content": "hi"}], "test", "0")


class Shop(ToolEnv):
    """A user environment as docs/agentic.md shows it: typed methods become tools."""

    def __init__(self, stock: int = 3) -> None:
        self.stock = stock
        self.sold: list[str] = []

    @tool
    def buy(self, item: str, quantity: int = 1, gift: bool = False) -> str:
        """Buy an item.

        Args:
            item: What to buy.
            quantity: How many.
            gift: Wrap it.
        """
        if quantity > self.stock:
            raise ToolError(f"only {self.stock} left")
        self.stock -= quantity
        self.sold.append(item)
        return f"bought {quantity} {item}"

    @tool
    async def checkout(self, size: Literal["small", "large"], tags: list[str]) -> dict:
        """Pay and end the episode.

        Args:
            size: Bag size.
            tags: Labels.
        """
        self.finish(reward=float(len(self.sold)))
        return {"paid": True, "items": self.sold}

    @tool
    def broken(self) -> str:
        """Always fails."""
        raise KeyError("inventory")


def test_tool_schema_comes_from_type_hints_and_docstrings() -> None:
    specs = {s["function"]["name"]: s["function"] for s in Shop().tool_specs()}
    assert specs["buy"] == {
        "name": "buy",
        "description": "Buy an item.",
        "parameters": {
            "type": "object",
            "properties": {
                "item": {"type": "string", "description": "What to buy."},
                "quantity": {"type": "integer", "description": "How many."},
                "gift": {"type": "boolean", "description": "Wrap it."},
            },
            "required": ["item"],
        },
    }
    assert specs["checkout"]["parameters"]["properties"] == {
        "size": {"type": "string", "enum": ["small", "large"], "description": "Bag size."},
        "tags": {"type": "array", "items": {"type": "string"}, "description": "Labels."},
    }

    def undocumented(x: int) -> str:
        """No Args section."""
        return ""

    with pytest.raises(ValueError, match="tool 'undocumented'.*Args"):
        tool_spec(undocumented)
    derived = tool_spec(
        CalculatorEnv.calc.__get__(CalculatorEnv())
    )  # the hand-written spec differs only by the argument's description
    del derived["function"]["parameters"]["properties"]["expression"]["description"]
    assert derived == CALC_TOOL == CalculatorEnv().tool_specs()[0]


def test_tool_env_validates_arguments_and_turns_failures_into_observations() -> None:
    env = Shop(stock=2)
    messages, tools = asyncio.run(env.reset(ROW))
    assert messages == ROW.messages and len(tools) == 3
    calls = [
        ToolCall("buy", {"item": "tea", "quantity": 2}),
        ToolCall("buy", {"item": "tea"}),  # ToolError: out of stock
        ToolCall("buy", {"item": 7}),  # wrong type
        ToolCall("buy", {"item": "x", "colour": "red"}),  # unknown argument
        ToolCall("buy", {}),  # missing argument
        ToolCall("refund", {}),  # unknown tool
        ToolCall("broken", {}),  # the tool itself raises
    ]
    result = asyncio.run(env.step(calls))
    contents = [o["content"] for o in result.observations]
    assert contents[0] == "bought 2 tea"
    assert contents[1] == "Error: only 0 left"
    assert contents[2] == "Error: bad arguments for buy (item): 7 is not of type 'string'"
    assert contents[3] == "Error: unexpected argument(s) for buy: colour; it takes item, quantity, gift"
    assert contents[4] == "Error: bad arguments for buy: 'item' is a required property"
    assert contents[5] == "Error: unknown tool 'refund'; available: broken, buy, checkout"
    assert contents[6] == "Error: broken failed: KeyError: 'inventory'"
    assert result.info["tool_errors"] == 6 and not result.done and result.reward is None
    assert all(o["role"] == "tool" for o in result.observations) and env.sold == ["tea"]
    bad_enum = asyncio.run(env.step([ToolCall("checkout", {"size": "huge", "tags": []})]))
    assert "'huge' is not one of ['small', 'large']" in bad_enum.observations[0]["content"] and not bad_enum.done
    done = asyncio.run(env.step([ToolCall("checkout", {"size": "small", "tags": ["a"]})]))
    assert json.loads(done.observations[0]["content"]) == {"paid": True, "items": ["tea"]}
    assert done.done and done.reward == 1.0


@pytest.fixture(scope="module")
def registered() -> list[str]:
    load_builtin_envs()
    return ENVS.names()


def test_every_registered_environment_keeps_the_contract(registered) -> None:
    assert {"calculator", "python", "search", "single_turn"} <= set(registered)
    seen = {}
    for name in registered:
        try:
            seen[name] = check_env(EnvConfig(name=name))
        except SandboxUnavailable:
            pytest.skip("bubblewrap is not installed (make setup installs it)")
    assert seen["calculator"] == {
        "tools": ["calc"],
        "observations": ["1"],
        "error_observations": [
            "Error: unknown tool 'no_such_tool'; available: calc",
            "Error: bad arguments for calc (expression): 12345 is not of type 'string'",
        ],
    }
    assert seen["python"]["observations"] == ["(no output: print the values you need)"]
    assert seen["search"]["tools"] == ["search"] and seen["search"]["observations"] == ["No document matches."]
    assert seen["single_turn"] == {
        "tools": [],
        "observations": [],
        "error_observations": ["Error: unknown tool 'no_such_tool'; available: (none)"],
    }
    assert all(len(s["error_observations"]) >= 2 for name, s in seen.items() if s["tools"])


class Raises:
    async def reset(self, row):
        return list(row.messages), [
            {"type": "function", "function": {"name": "t", "parameters": {"type": "object", "properties": {}}}}
        ]

    async def step(self, calls):
        raise RuntimeError("boom")

    async def close(self):
        return None


def test_contract_names_the_broken_promise(tmp_path: Path) -> None:
    ENVS.register("raises-for-contract-test")(Raises)
    with pytest.raises(ContractError, match="step raised RuntimeError: boom on well-formed calls"):
        check_env(EnvConfig(name="raises-for-contract-test"))
    user = tmp_path / "shop.py"
    user.write_text(
        "from envs.tools import ToolEnv, tool\n\nclass Env(ToolEnv):\n    @tool\n    def ping(self, n: int) -> int:\n "
        "       '''Echo.\n\n        Args:\n            n: a number\n        '''\n        return n\n"
    )
    result = CliRunner().invoke(app, ["check-env", f"{user}:Env"])
    assert result.exit_code == 0, result.output
    assert "contract holds; tools ping" in result.output and "ping(example arguments) -> '1'" in result.output
    with pytest.raises(TypeError, match="env.kwargs"):
        make_env(EnvConfig(name="calculator", kwargs={"colour": "red"}))


def test_search_environment_finds_the_answer_and_takes_a_user_corpus(tmp_path: Path) -> None:
    rows = [to_prompt_row(i, r) for i, r in enumerate(builtin_rows("search_qa", 20, 0, "eval"))]
    env = make_env(EnvConfig(name="search"))
    found = 0
    for row in rows:
        island = row.extra_info["island"]
        hits = asyncio.run(env.step([ToolCall("search", {"query": row.messages[-1]["content"], "k": 1})])).observations[
            0
        ]["content"]
        found += hits.startswith(f"[1] {island}:") and row.ground_truth in hits
    assert found == len(rows)  # BM25 ranks the island's own document first for every question
    train_islands = {r["extra_info"]["island"] for r in builtin_rows("search_qa", 200, 0, "train")}
    assert not train_islands & {r.extra_info["island"] for r in rows}
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text(
        json.dumps({"title": "Tea", "text": "Green tea grows in Uji."})
        + "\n"
        + json.dumps({"title": "Salt", "text": "Sea salt dries in pans."})
        + "\n"
    )
    own = make_env(EnvConfig(name="search", kwargs={"corpus": str(corpus)}))
    out = asyncio.run(
        own.step(
            [ToolCall("search", {"query": "where does tea grow", "k": 5}), ToolCall("search", {"query": "x", "k": 11})]
        )
    )
    assert [o["content"] for o in out.observations] == [
        "[1] Tea: Green tea grows in Uji.",
        "Error: k must be between 1 and 10, got 11",
    ]
    assert (
        contains_answer("s", "<think>Plin?</think>The capital is yatu.", "Yatu")["acc"]
        and not contains_answer("s", "Yatuville", "Yatu")["acc"]
    )


@pytest.mark.skipif(not Path("/usr/bin/bwrap").exists(), reason="bubblewrap is not installed (make setup installs it)")
def test_python_environment_answers_the_math_task_with_the_reference_programs() -> None:
    rows = builtin_rows("python_math", 10, 0, "train")
    env = make_env(EnvConfig(name="python", sandbox={"wall_seconds": 20}))
    calls = [ToolCall("python", {"code": r["extra_info"]["reference_code"]}) for r in rows]
    outputs = [o["content"] for o in asyncio.run(env.step(calls)).observations]
    assert outputs == [r["reward_model"]["ground_truth"] for r in rows]
    assert all(
        numeric_answer("tiderl/python_math", f"The answer is {o}.", r["reward_model"]["ground_truth"])["acc"]
        for o, r in zip(outputs, rows, strict=True)
    )
    failing = asyncio.run(env.step([ToolCall("python", {"code": "print(1)\nraise ValueError('no')"})])).observations[0][
        "content"
    ]
    assert failing.startswith('Error:   File "/tmp/scratch/main.py", line 2') and failing.endswith(
        "ValueError: no\nOutput before the error:\n1"
    )


K2_TURN = (
    "<think>I need the weather.</think>"
    "<|tool_calls_section_begin|>"
    '<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Tokyo"}<|tool_call_end|>'
    '<|tool_call_begin|> functions.calc:1 <|tool_call_argument_begin|> {"expression": "2*3"} <|tool_call_end|>'
    "<|tool_calls_section_end|>"
)


def test_kimi_k2_tool_call_format() -> None:
    calls, errors = parse_kimi_k2(K2_TURN)
    assert (
        calls == [ToolCall("get_weather", {"city": "Tokyo"}), ToolCall("calc", {"expression": "2*3"})] and errors == []
    )
    assert parse_hermes(K2_TURN) == ([], [])  # each parser reads only its own format
    assert parse_kimi_k2('<tool_call>{"name": "calc", "arguments": {}}</tool_call>') == ([], [])
    bad = (
        "<|tool_calls_section_begin|>"
        "<|tool_call_begin|>functions.calc:0<|tool_call_argument_begin|>{oops}<|tool_call_end|>"
        "<|tool_call_begin|>calc<|tool_call_argument_begin|>{}<|tool_call_end|>"
        "<|tool_call_begin|>functions.calc:2 {}<|tool_call_end|>"
        "<|tool_call_begin|>functions.calc:3<|tool_call_argument_begin|>[1]<|tool_call_end|>"
        '<|tool_call_begin|>functions.calc:4<|tool_call_argument_begin|>{"expression": "1"}'
    )
    calls, errors = parse_kimi_k2(bad)
    assert calls == [] and len(errors) == 6
    assert "unterminated <|tool_calls_section_begin|>" in errors[0]
    assert "arguments of calc are not valid JSON" in errors[1]
    assert "functions.NAME:INDEX, got 'calc'" in errors[2]
    assert "has no <|tool_call_argument_begin|>" in errors[3]
    assert "must be a JSON object" in errors[4]
    assert "unterminated <|tool_call_begin|>" in errors[5]
