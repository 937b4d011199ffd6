"""The `code_tests` reward: run the model's code against the row's unit tests in the sandbox, as Kimi K1.5's and
verl's code RL do, and score the pass fraction or all-or-nothing.

Per sample: the last ```python block of the response (`rewards.code_cases.extract_code`) and the tests of
`reward_model.ground_truth` in verl's layouts (`rewards.code_cases.parse_tests`) go into one sandbox
(`envs.sandbox`: bubblewrap, a minimal read-only root, no network, rlimits, an unprivileged uid), where a small
harness (`rewards.code_harness`) runs each test in its own forked process under the per-test timeout. The expected
outputs stay here; this side compares. At most `max_concurrency` sandboxes run at once across the batch (by default
one per CPU core), so scoring a large batch queues instead of oversubscribing the machine.

What scores 0 (with the reason in the result's `reason`, never an error): no code block, code that does not
compile, raises, hangs past the timeout, exits early, prints garbage or too much, or hits a sandbox limit; a test
whose data is wrong fails the same way. A ground truth this reward cannot read at all (not JSON, no tests,
mismatched lists) raises `GroundTruthError` naming the sample: the scorer leaves that sample out and logs why.

The function is async, so the scorer runs the batch's samples concurrently (`rewards.api`). Its `timeout_s` in the
job config bounds a sample *including its wait for a sandbox slot*: give it room (`configs/code_tests.yaml`).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import weakref
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from envs.config import SandboxConfig, Section
from envs.sandbox import PythonSandbox
from rewards.code_cases import CodeTest, extract_code, parse_tests, stdout_matches, value_matches
from rewards.registry import register_reward

HARNESS = Path(__file__).with_name("code_harness.py")
_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


class CodeTestsOptions(Section):
    """The reward's options: `reward.functions[].kwargs` of a `code_tests` entry."""

    mode: Literal["pass_fraction", "all_or_nothing"] = Field(
        "pass_fraction",
        description="pass_fraction: the fraction of tests passed (verl's continuous score); all_or_nothing: 1 when "
        "every test passes, else 0 (stops at the first failure).",
    )
    test_timeout_s: float = Field(4.0, gt=0, le=300, description="Wall-clock limit of each test; past it, it fails.")
    max_tests: int | None = Field(
        None, ge=1, description="Run only the first N tests of a row (verl's prime_code scores the first 10)."
    )
    memory_mb: int = Field(512, ge=64, description="Address space per process of the code (RLIMIT_AS).")
    max_processes: int = Field(
        32, ge=4, description="Processes of the sandbox user (RLIMIT_NPROC): a fork bomb stops here."
    )
    max_output_bytes: int = Field(
        65536, ge=1024, description="stdout kept per test (and the largest return value); more fails the test."
    )
    max_concurrency: int | None = Field(
        None, ge=1, description="Sandboxes running at once across the batch (default: the machine's CPU cores)."
    )
    python: str | None = Field(
        None, description="Interpreter for the code (default: /usr/bin/python3, else tiderl's own)."
    )


@dataclass
class TestOutcome:
    """How one test ended."""

    passed: bool
    reason: str
    """'passed', or why not: 'wrong answer: ...', 'timeout: ...', 'error: ...', 'not run: ...'."""
    seconds: float | None = None


@register_reward("code_tests")
async def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict | None = None,
    *,
    mode: str = "pass_fraction",
    test_timeout_s: float = 4.0,
    max_tests: int | None = None,
    memory_mb: int = 512,
    max_processes: int = 32,
    max_output_bytes: int = 65536,
    max_concurrency: int | None = None,
    python: str | None = None,
) -> dict[str, Any]:
    """verl's signature. Returns `score`, `acc` (every test passed), `passed`, `total` (tests of the row that were
    considered) and `reason` (the first failing test and why, or 'all N tests passed')."""
    options = _options(
        mode=mode,
        test_timeout_s=test_timeout_s,
        max_tests=max_tests,
        memory_mb=memory_mb,
        max_processes=max_processes,
        max_output_bytes=max_output_bytes,
        max_concurrency=max_concurrency,
        python=python,
    )
    tests = parse_tests(ground_truth, _where(data_source, extra_info))
    if options.max_tests is not None:
        tests = tests[: options.max_tests]
    code = extract_code(solution_str)
    if code is None:
        outcomes = [TestOutcome(False, "not run: the response has no ```python code block")] * len(tests)
    else:
        async with _slots(options.max_concurrency):
            outcomes = await run_tests(code, tests, options)
    return _score(outcomes, options.mode)


async def run_tests(code: str, tests: list[CodeTest], options: CodeTestsOptions) -> list[TestOutcome]:
    """Run `code` against `tests` in one sandbox; one outcome per test, in order. Never raises for what the code
    does. Bounded: at most len(tests) x (test_timeout_s + ~0.5 s) plus the sandbox's start."""
    spec = {
        "code": code,
        "tests": [t.spec() for t in tests],
        "timeout_s": options.test_timeout_s,
        "output_cap": options.max_output_bytes,
        "stop_at_first_failure": options.mode == "all_or_nothing",
    }
    # each test's JSON line: its stdout (JSON escapes can make it up to 6x longer) and a few fields
    report_bytes = len(tests) * (6 * options.max_output_bytes + 2048) + 4096
    sandbox = PythonSandbox(
        SandboxConfig(
            cpu_seconds=math.ceil(options.test_timeout_s) + 1,
            wall_seconds=len(tests) * (options.test_timeout_s + 0.5) + 5.0,
            memory_mb=options.memory_mb,
            max_processes=options.max_processes,
            max_output_bytes=report_bytes,
            max_file_mb=max(1, math.ceil(options.max_output_bytes * 2 / 2**20)),  # a test's stdout file
            python=options.python,
        )
    )
    result = await sandbox.run(_harness_source() + f"\n\n_main({json.dumps(json.dumps(spec))})\n")
    reported: dict[int, dict[str, Any]] = {}
    for line in result.stdout.splitlines():
        try:
            item = json.loads(line)
            reported[int(item["index"])] = item
        except (ValueError, KeyError, TypeError):
            continue  # the harness writes only JSON lines; anything else is a cut-off last line
    if not reported and not result.ok:
        why = result.error() or "the harness reported nothing"
        return [TestOutcome(False, f"error: the sandbox failed before any test ran: {why}")] * len(tests)
    outcomes = []
    for i, test in enumerate(tests):
        item = reported.get(i)
        if item is None:
            why = "an earlier test failed (all_or_nothing)" if options.mode == "all_or_nothing" else result.error()
            outcomes.append(TestOutcome(False, f"not run: {why or 'the harness stopped before it'}"))
        else:
            outcomes.append(_judge(test, item))
    return outcomes


def _judge(test: CodeTest, item: dict[str, Any]) -> TestOutcome:
    """The harness's report of one test, compared with what the test expects."""
    seconds = item.get("seconds")
    if item.get("status") != "ran":
        status = str(item.get("status", "error")).replace("_", " ")  # wrong_answer (an assert), error, timeout, signal
        return TestOutcome(False, f"{status}: {item.get('detail', '')}", seconds)
    if test.kind == "call":
        actual = json.loads(item["value"])
        if not value_matches(actual, test.expected_value):
            return TestOutcome(
                False,
                f"wrong answer: {test.fn_name}{_args(test.args)} returned {_short(actual)}, "
                f"expected {_short(test.expected_value)}",
                seconds,
            )
    if test.expected_stdout is not None:
        if item.get("stdout_truncated"):
            return TestOutcome(False, "wrong answer: the output is longer than max_output_bytes", seconds)
        if not stdout_matches(item.get("stdout", ""), test.expected_stdout):
            return TestOutcome(
                False,
                f"wrong answer: printed {_short(item.get('stdout', ''))}, expected {_short(test.expected_stdout)}",
                seconds,
            )
    return TestOutcome(True, "passed", seconds)


def _score(outcomes: list[TestOutcome], mode: str) -> dict[str, Any]:
    passed = sum(o.passed for o in outcomes)
    total = len(outcomes)
    failing = next(((i, o) for i, o in enumerate(outcomes) if not o.passed), None)
    reason = f"all {total} tests passed" if failing is None else f"test {failing[0]}: {failing[1].reason}"
    score = passed / total if mode == "pass_fraction" else float(passed == total)
    return {"score": score, "acc": passed == total, "passed": passed, "total": total, "reason": reason}


def _slots(limit: int | None) -> asyncio.Semaphore:
    """The semaphore that bounds sandboxes running at once in this event loop (the scorer runs one loop per batch;
    the first call's limit holds for the loop)."""
    loop = asyncio.get_running_loop()
    if loop not in _SLOTS:
        _SLOTS[loop] = asyncio.Semaphore(limit or os.cpu_count() or 1)
    return _SLOTS[loop]


@cache
def _options(**values: Any) -> CodeTestsOptions:
    """Validated once per distinct setting: a bad value fails every sample with an error naming the option."""
    return CodeTestsOptions(**values)


@cache
def _harness_source() -> str:
    return HARNESS.read_text()


def _where(data_source: str, extra_info: dict | None) -> str:
    """How an error names the sample: its data source, and its split/index when the row carries them."""
    info = extra_info or {}
    place = ", ".join(f"{k} {info[k]}" for k in ("split", "index") if k in info)
    return f"sample of {data_source!r}" + (f" ({place})" if place else "")


def _args(args: tuple[Any, ...]) -> str:
    return _cut("(" + ", ".join(json.dumps(a) for a in args) + ")")


def _short(value: Any) -> str:
    return _cut(repr(value))


def _cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
