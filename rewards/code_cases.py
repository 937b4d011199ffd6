"""The `code_tests` reward's data side: the model's code from a response, the unit tests from a row's ground truth
(verl's layouts), and how an output is compared with what a test expects. Pure functions: nothing here runs code.

`reward_model.ground_truth` is a JSON string (as verl's code datasets store it: PRIME's Eurus-2-RL-Data, APPS, TACO,
CodeContests) or the same object as a dict, in one of the layouts verl's scorers read
(`verl.utils.reward_score.prime_code` and `sandbox_fusion`):

- programs on stdin/stdout: `{"inputs": ["1 2\\n", ...], "outputs": ["3\\n", ...]}`;
- function calls: `{"fn_name": "add", "inputs": ["1\\n2", ...], "outputs": ["3", ...]}`, where an input holds the
  arguments, one JSON value per line, and an output the JSON of the return value (a function, or a method of a
  LeetCode-style `Solution` class);
- assert statements: `{"assert_case": ["assert add(1, 2) == 3", ...]}`, each case run after the code (optionally
  with `inputs`/`outputs` per case: the stdin it gets and the stdout it must print, as SandboxFusion reads them).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["stdio", "call", "assert"]

_FENCE = re.compile(r"```([^\n`]*)\n(.*?)```", re.DOTALL)
PYTHON_FENCES = ("python", "python3", "py")


class GroundTruthError(ValueError):
    """A row's `reward_model.ground_truth` is not a test layout this reward reads (a data problem, not a model one)."""


@dataclass(frozen=True)
class CodeTest:
    """One unit test of a row."""

    kind: Kind
    """stdio: run the code as a program; call: call `fn_name(*args)`; assert: run `asserts` after the code."""
    stdin: str = ""
    expected_stdout: str | None = None
    """What the program must print (compared line by line, trailing whitespace ignored); None: not checked."""
    fn_name: str | None = None
    args: tuple[Any, ...] = ()
    expected_value: Any = None
    """call: the return value expected (after a JSON round trip: tuples are lists)."""
    asserts: str | None = None

    def spec(self) -> dict[str, Any]:
        """What the sandbox's harness gets: everything but the expected outputs, which stay on the host."""
        return {
            "kind": self.kind,
            "stdin": self.stdin,
            "fn_name": self.fn_name,
            "args": list(self.args),
            "asserts": self.asserts,
            "capture": self.expected_stdout is not None,
        }


def extract_code(response: str) -> str | None:
    """The last complete fenced ```python block after any `</think>` (```py and ```python3 count too); None when
    the response has none. Blocks in other languages or without one are not taken for the solution: an answer often
    shows its expected output in a bare block after the code."""
    visible = response.rsplit("</think>", 1)[-1]
    blocks = [body for info, body in _FENCE.findall(visible) if info.strip().split(" ")[0].lower() in PYTHON_FENCES]
    return blocks[-1] if blocks else None


def parse_tests(ground_truth: Any, where: str) -> list[CodeTest]:
    """The tests of one row; `where` names the sample in errors. Raises GroundTruthError for a layout it cannot
    read (not JSON, no tests, lists of different lengths, arguments that are not JSON, asserts that do not
    compile)."""

    def fail(problem: str) -> GroundTruthError:
        return GroundTruthError(
            f"{where}: reward_model.ground_truth {problem}. The code_tests reward reads verl's layouts: "
            '{"inputs": [...], "outputs": [...]} (stdin/stdout), the same with "fn_name" (function calls), or '
            '{"assert_case": [...]} (docs/rewards.md, "code_tests")'
        )

    gt = ground_truth
    if isinstance(gt, (str, bytes)):
        try:
            gt = json.loads(gt)
        except json.JSONDecodeError as e:
            raise fail(f"is not JSON ({e}): {_short(ground_truth)}") from None
    if not isinstance(gt, dict):
        raise fail(f"is a {type(gt).__name__}, not an object with test cases: {_short(gt)}")
    asserts, fn_name = gt.get("assert_case"), gt.get("fn_name")
    if asserts is not None:
        return _assert_tests(gt, asserts, fail)
    inputs, outputs = _io_lists(gt, fail)
    if fn_name is not None:
        if not isinstance(fn_name, str) or not fn_name.isidentifier():
            raise fail(f"has fn_name {fn_name!r}, which is not a Python name")
        tests = []
        for i, (raw_in, raw_out) in enumerate(zip(inputs, outputs, strict=True)):
            tests.append(
                CodeTest(
                    kind="call",
                    fn_name=fn_name,
                    args=tuple(_arguments(raw_in, i, fail)),
                    expected_value=_json_value(raw_out, f"outputs[{i}]", fail),
                )
            )
        return tests
    return [
        CodeTest(
            kind="stdio",
            stdin=_text(raw_in, f"inputs[{i}]", fail),
            expected_stdout=_text(raw_out, f"outputs[{i}]", fail),
        )
        for i, (raw_in, raw_out) in enumerate(zip(inputs, outputs, strict=True))
    ]


def _assert_tests(gt: dict[str, Any], asserts: Any, fail) -> list[CodeTest]:
    if not isinstance(asserts, list) or not asserts or not all(isinstance(a, str) for a in asserts):
        raise fail(f"has assert_case {_short(asserts)}; expected a non-empty list of strings")
    inputs = gt.get("inputs") or [""] * len(asserts)
    outputs = gt.get("outputs") or [None] * len(asserts)
    if not isinstance(inputs, list) or not isinstance(outputs, list) or not len(inputs) == len(outputs) == len(asserts):
        raise fail(f"has {len(asserts)} assert_case entries but inputs/outputs of other lengths or types")
    tests = []
    for i, (case, raw_in, raw_out) in enumerate(zip(asserts, inputs, outputs, strict=True)):
        try:
            compile(case, f"assert_case[{i}]", "exec")
        except (SyntaxError, ValueError) as e:
            raise fail(f"has assert_case[{i}] that does not compile ({e}): {_short(case)}") from None
        tests.append(
            CodeTest(
                kind="assert",
                asserts=case,
                stdin=_text(raw_in or "", f"inputs[{i}]", fail),
                expected_stdout=None if raw_out is None else _text(raw_out, f"outputs[{i}]", fail),
            )
        )
    return tests


def _io_lists(gt: dict[str, Any], fail) -> tuple[list[Any], list[Any]]:
    if "inputs" not in gt or "outputs" not in gt:
        raise fail(f"has neither inputs/outputs nor assert_case (keys: {sorted(gt)})")
    inputs, outputs = gt["inputs"], gt["outputs"]
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        raise fail(f"has inputs of type {type(inputs).__name__} and outputs of type {type(outputs).__name__}; "
                   "expected two lists")  # fmt: skip
    if len(inputs) != len(outputs):
        raise fail(f"has {len(inputs)} inputs but {len(outputs)} outputs")
    if not inputs:
        raise fail("holds no test cases (empty inputs)")
    return inputs, outputs


def _text(value: Any, key: str, fail) -> str:
    """A stdin or stdout: a string, or a list of lines (as some APPS rows hold them, joined as verl does)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    raise fail(f"has {key} = {_short(value)}; expected a string")


def _arguments(raw: Any, i: int, fail) -> list[Any]:
    """A call's arguments: one JSON value per line of a string (verl's layout), or already a list."""
    if isinstance(raw, list):
        return raw
    if not isinstance(raw, str):
        raise fail(f"has inputs[{i}] = {_short(raw)}; expected the arguments as JSON, one per line")
    lines = raw.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    return [_json_value(line, f"inputs[{i}]", fail) for line in lines]


def _json_value(raw: Any, key: str, fail) -> Any:
    if not isinstance(raw, str):
        return raw  # a dict ground truth may hold the value itself
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise fail(f"has {key} = {_short(raw)}, which is not JSON ({e})") from None


def stdout_matches(actual: str, expected: str) -> bool:
    """Line by line, ignoring trailing whitespace on each line and blank lines at the end (what online judges and
    verl's SandboxFusion scorer accept as the same output; verl's prime_code also accepts a few looser forms)."""
    return _lines(actual) == _lines(expected)


def _lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def value_matches(actual: Any, expected: Any) -> bool:
    """verl's prime_code rule for function calls: equal (tuples compare as lists), or equal to the single element of
    an expected list (APPS stores some return values wrapped in a list)."""
    if actual == expected:
        return True
    return isinstance(expected, list) and len(expected) > 0 and actual == expected[0]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
