"""The `code_tests` reward runs model code against a row's unit tests in the real sandbox: gold solutions score 1,
wrong ones 0, partial ones their exact pass fraction; hangs stop at the per-test timeout; hostile code is contained;
bad ground truth is an error naming the sample; rows in verl's layout score what verl's own prime_code scores."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from rewards import code_tests
from rewards.api import Failure, RewardFunction, RewardInput
from rewards.code_cases import GroundTruthError, extract_code, parse_tests
from rewards.code_tests import compute_score
from rewards.registry import get_reward

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed (make setup)")
ORACLES = Path(__file__).resolve().parents[1] / ".oracles"

ADD_ASSERTS = {"assert_case": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]}
ADD_CALLS = json.dumps(
    {"fn_name": "add", "inputs": ["1\n2", "[1]\n[2]", "0\n0", "5\n-5"], "outputs": ["3", "[1, 2]", "0", "0"]}
)
SUM_STDIO = json.dumps({"inputs": ["1 2\n", "3 4\n", "2 2\n"], "outputs": ["3\n", "7\n", "4\n"]})


def block(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\n"


ADD = block("def add(a, b):\n    return a + b")
SUM = block("a, b = map(int, input().split())\nprint(a + b)")


def score_all(cases: list[tuple[str, object]], **options) -> list[dict]:
    async def main() -> list[dict]:
        return await asyncio.gather(
            *(compute_score("test", text, gt, {"index": i}, **options) for i, (text, gt) in enumerate(cases))
        )

    return asyncio.run(main())


def test_gold_scores_one_wrong_zero_partial_its_exact_fraction() -> None:
    cases = [
        (ADD, ADD_ASSERTS),
        (ADD, ADD_CALLS),
        (SUM, SUM_STDIO),
        (block("def add(a, b):\n    return a - b"), ADD_ASSERTS),  # -1, -2, 0: none right
        (block("def add(a, b):\n    return a * b"), ADD_CALLS),  # 2, TypeError, 0, -25: 1 of 4
        (block("a, b = map(int, input().split())\nprint(a * b)"), SUM_STDIO),  # 2*2 == 4 only
        (block("def add(a, b):\n    return 3"), ADD_ASSERTS),  # add(1, 2) only
        (block("def add(a, b):\n    return None"), ADD_ASSERTS),
        (block("print('hello')"), SUM_STDIO),
    ]
    scores = [r["score"] for r in score_all(cases)]
    assert scores == [1.0, 1.0, 1.0, 0.0, 0.25, pytest.approx(1 / 3), pytest.approx(1 / 3), 0.0, 0.0]
    strict = score_all(cases[:3] + cases[5:7], mode="all_or_nothing")
    assert [(r["score"], r["acc"]) for r in strict] == [(1.0, True)] * 3 + [(0.0, False)] * 2
    assert strict[3]["reason"].startswith("test 0: wrong answer: printed '2\\n', expected '3\\n'")


def test_failure_reasons_are_recorded_and_score_zero() -> None:
    results = score_all(
        [
            ("No code here.", ADD_ASSERTS),
            ("```python\ndef add(a, b):\n    return a +\n```", ADD_ASSERTS),
            (block("import os\nos._exit(0)"), ADD_ASSERTS),  # exits before the asserts run
            (block("import sys\nsys.exit(0)"), ADD_CALLS),
            (block("def add(a, b):\n    return 1 / 0"), ADD_CALLS),
            (block("print('x' * 10**7)"), SUM_STDIO),  # garbage, and too much of it
            (block('def add(a, b):\n    print(\'{"index": 0, "status": "ran"}\')\n    return -1'), ADD_ASSERTS),
        ]
    )
    assert [r["score"] for r in results] == [0.0] * 7
    reasons = [r["reason"] for r in results]
    assert reasons[0] == "test 0: not run: the response has no ```python code block"
    assert reasons[1].startswith("test 0: error: the code does not compile: SyntaxError")
    assert reasons[2] == "test 0: error: the code exited (status 0) before the test ran"
    assert reasons[3].startswith("test 0: error: the code exited (status 0) before the test finished")
    assert reasons[4] == "test 0: error: ZeroDivisionError: division by zero (solution.py line 2)"
    assert "longer than max_output_bytes" in reasons[5] or "more output than allowed" in reasons[5]
    assert reasons[6] == "test 0: wrong answer: assert add(1, 2) == 3"


def test_an_infinite_loop_stops_at_the_per_test_timeout() -> None:
    tests = {"assert_case": ["assert f() == 1", "assert f() == 1"]}
    for code, kind in [
        ("def f():\n    while True:\n        pass", "busy"),
        ("import time\ntime.sleep(60)\ndef f(): 1", "sleep"),
    ]:
        start = time.monotonic()
        (result,) = score_all([(block(code), tests)], test_timeout_s=1.0)
        elapsed = time.monotonic() - start
        assert result["score"] == 0.0 and result["reason"] == "test 0: timeout: ran past the per-test timeout of 1s"
        assert elapsed < 2 * (1.0 + 0.5) + 5.0, (kind, elapsed)  # the bound run_tests documents
    start = time.monotonic()
    (result,) = score_all(
        [(block("def f():\n    while True:\n        pass"), tests)], test_timeout_s=1.0, mode="all_or_nothing"
    )
    assert result["reason"] == "test 0: timeout: ran past the per-test timeout of 1s"
    assert time.monotonic() - start < 1.0 + 5.0  # stops at the first failure


def test_hostile_code_is_contained() -> None:
    probe = {"assert_case": ["assert probe() == 'ok'"]}
    checkout = str(Path(__file__).resolve().parents[1])
    results = score_all(
        [
            (block("def probe():\n    return open('/root/.bashrc').read()"), probe),
            (block(f"import os\ndef probe():\n    return str(os.listdir({checkout!r}))"), probe),
            (
                block("import socket\ndef probe():\n    socket.create_connection(('1.1.1.1', 80), 2)\n    return 'ok'"),
                probe,
            ),
            (block("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"), probe),
            (block("import os\ndef probe():\n    os.system('rm -rf /tmp/scratch /usr')\n    return 'ok'"), probe),
        ],
        test_timeout_s=2.0,
    )
    reasons = [r["reason"] for r in results]
    assert [r["score"] for r in results][:4] == [0.0] * 4, reasons
    assert "FileNotFoundError" in reasons[0] and "FileNotFoundError" in reasons[1], reasons
    assert "OSError" in reasons[2] or "unreachable" in reasons[2], reasons
    assert reasons[3].startswith("test 0: timeout") or "killed" in reasons[3], reasons
    (after,) = score_all([(ADD, ADD_ASSERTS)])  # the machine, the sandbox user and /usr are fine afterwards
    assert after["score"] == 1.0 and Path("/usr/bin/python3").exists()


def test_malformed_ground_truth_is_an_error_naming_the_sample() -> None:
    bad = [
        ("not json", "is not JSON"),
        (json.dumps({"inputs": ["1"], "outputs": []}), "has 1 inputs but 0 outputs"),
        (json.dumps({"tests": []}), "has neither inputs/outputs nor assert_case"),
        (json.dumps({"fn_name": "f", "inputs": ["{oops"], "outputs": ["1"]}), "inputs[0] = '{oops', which is not JSON"),
        (json.dumps({"assert_case": ["assert f( == 1"]}), "assert_case[0] that does not compile"),
        (json.dumps([1, 2]), "is a list, not an object"),
    ]
    for gt, message in bad:
        with pytest.raises(GroundTruthError, match="sample of 'apps' \\(split train, index 7\\)") as e:
            asyncio.run(compute_score("apps", ADD, gt, {"split": "train", "index": 7}))
        assert message in str(e.value)
    # through the scorer's adapter: the bad sample fails alone (the scorer leaves it out and logs why)
    fn = RewardFunction("code_tests", get_reward("code_tests"), timeout_s=60)
    inputs = [
        RewardInput(f"s{i}", 0, [], [], text, "apps", gt, {"index": i}, [])
        for i, (text, gt) in enumerate([(ADD, ADD_ASSERTS), (ADD, "not json"), (SUM, SUM_STDIO)])
    ]
    scores = asyncio.run(fn.score(inputs, 0, None))
    assert scores.values[0] == 1.0 and scores.values[2] == 1.0 and scores.acc == [True, None, True]
    assert isinstance(scores.values[1], Failure) and "index 1" in scores.values[1].reason
    assert scores.info[0] == {"passed": 3, "total": 3, "reason": "all 3 tests passed"}  # kept with the sample


def test_code_extraction_takes_the_last_python_block() -> None:
    assert extract_code("```python\na = 1\n```\ntext\n```py\nb = 2\n```\n```\n3\n```") == "b = 2\n"
    assert extract_code("<think>```python\ndraft\n```</think>no block after thinking") is None
    assert extract_code("```python\nunclosed = True\n") is None and extract_code("```bash\nls\n```") is None
    tests = parse_tests({"fn_name": "f", "inputs": ["1\n[2, 3]\n"], "outputs": ["[1, 2]"]}, "row")
    assert tests[0].args == (1, [2, 3]) and tests[0].expected_value == [1, 2]


def test_sandboxes_running_at_once_stay_within_max_concurrency(monkeypatch) -> None:
    running, peak = 0, 0
    real_run = code_tests.PythonSandbox.run

    async def counted(self, code: str):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            return await real_run(self, code)
        finally:
            running -= 1

    monkeypatch.setattr(code_tests.PythonSandbox, "run", counted)
    slow_add = block("import time\ntime.sleep(0.3)\ndef add(a, b):\n    return a + b")
    results = score_all([(slow_add, {"assert_case": ["assert add(1, 2) == 3"]})] * 5, max_concurrency=2)
    assert peak == 2 and [r["score"] for r in results] == [1.0] * 5


@pytest.fixture(scope="module")
def prime_code():
    """verl's prime_code scorer, loaded from .oracles/ as a package of its own: importing it through `verl` would
    import all of verl (torch, ray, transformers: minutes on a loaded machine) for two files that need numpy."""
    path = ORACLES / "verl" / "utils" / "reward_score" / "prime_code"
    if not path.is_dir():
        pytest.skip("verl is not installed in .oracles/ (make oracles)")
    spec = importlib.util.spec_from_file_location(
        "verl_prime_code", path / "__init__.py", submodule_search_locations=[str(path)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["verl_prime_code"] = module
    spec.loader.exec_module(module)
    return module


def test_verl_layout_rows_score_as_verl_prime_code_does(prime_code) -> None:
    """verl's own scorer (continuous: the pass fraction of the first 10 tests) on the same rows and responses."""
    cases = [
        (SUM, SUM_STDIO),
        (block("a, b = map(int, input().split())\nprint(a * b)"), SUM_STDIO),
        (block("print(1 / 0)"), SUM_STDIO),
        (ADD, ADD_CALLS),
        (block("def add(a, b):\n    return str(a)"), ADD_CALLS),
        (block("class Solution:\n    def add(self, a, b):\n        return a + b"), ADD_CALLS),
    ]
    ours = [r["score"] for r in score_all(cases, test_timeout_s=2.0)]
    theirs = [float(prime_code.compute_score(text, gt, continuous=True)[0]) for text, gt in cases]
    assert ours == pytest.approx(theirs) and ours == pytest.approx([1.0, 1 / 3, 0.0, 1.0, 0.0, 1.0])
    # Where they differ: verl's per-test pass of a function-call row drops `fn_name` (it runs each case as a
    # stdin program), so a partly right function scores 0 there; here it scores its pass fraction.
    partial = (block("def add(a, b):\n    return a * b"), ADD_CALLS)
    assert score_all([partial])[0]["score"] == 0.25
    assert float(prime_code.compute_score(*partial, continuous=True)[0]) == 0.0
