"""Heavy mode (`tiderl eval --heavy`): the vote, its ties, pass@n and the reflection prompt pinned by hand; then the
built-in policy on the default task, whose majority vote must equal one computed here from the same samples."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from envs.base import PromptRow
from rewards.calculator import extract_answer
from rewards.scoring import RewardScorer
from rewards.voting import answer_verifier
from rl.config import dump_config
from rl.launch.cli import app
from rl.loop.data import load_split
from rl.loop.heavy import (
    HEAVY_SEED,
    Candidate,
    heavy_eval,
    heavy_sizes,
    majority,
    pass_at,
    reflection_row,
    vote,
)
from rollouts.backend import InProcessBackend


def cand(answer, correct=False) -> Candidate:
    return Candidate(answer, correct, str(answer))


def eq(a, b) -> bool:
    return a == b


def test_vote_ties_go_to_the_answer_given_first() -> None:
    # 4484 and 4480 both get two votes; 4484's first vote (sample 0) came before 4480's (sample 1)
    assert vote([cand(4484), cand(4480), cand(4484), cand(None), cand(4480)], eq) == (0, True)
    assert vote([cand(4480), cand(4484), cand(4484), cand(4480)], eq) == (0, True)
    assert vote([cand(None), cand(7), cand(8), cand(8)], eq) == (2, False)
    assert vote([cand(None), cand(None)], eq) == (None, False)


def test_majority_over_disjoint_blocks_and_pass_at_n() -> None:
    right, wrong = cand(5, True), cand(3)
    # prompt A: samples R W W R | W W R R ; prompt B: no answer, then R R R, W W W W
    a = [right, wrong, wrong, right, wrong, wrong, right, right]
    b = [cand(None), right, right, right, wrong, cand(4), cand(4), wrong]
    groups = [a, b]
    # n=1: A 4/8 right, B 3/8 right
    assert majority(groups, 1, eq)["accuracy"] == pytest.approx((4 / 8 + 3 / 8) / 2)
    # n=2: A blocks (R,W) tie->R, (W,R) tie->W, (W,W) W, (R,R) R -> 2/4; B (-,R) R, (R,R) R, (W,4) tie->W, (4,W) tie->4
    two = majority(groups, 2, eq)
    assert two["accuracy"] == pytest.approx((2 / 4 + 2 / 4) / 2)
    assert two["tied"] == pytest.approx((2 / 4 + 2 / 4) / 2)
    # n=4: A (R,W,W,R) tie->R, (W,W,R,R) tie->W -> 1/2; B (-,R,R,R) R, (W,4,4,W) tie->W (3 first) -> 1/2
    assert majority(groups, 4, eq)["accuracy"] == pytest.approx(0.5)
    # n=8: A R4 W4 tie -> R (sample 0); B R3 W2 4x2 -> R
    assert majority(groups, 8, eq)["accuracy"] == pytest.approx(1.0)
    assert majority([[cand(None)] * 4], 4, eq) == {"accuracy": 0.0, "tied": 0.0, "no_answer": 1.0}
    assert pass_at(3, 8, 2) == pytest.approx(1 - 10 / 28)
    assert pass_at(0, 8, 8) == 0.0 and pass_at(1, 8, 8) == 1.0 and pass_at(4, 8, 1) == 0.5
    assert heavy_sizes(8) == [1, 2, 4, 8] and heavy_sizes(6) == [1, 2, 4, 6] and heavy_sizes(1) == [1]


def test_answer_verifiers_follow_the_rewards() -> None:
    calc = answer_verifier("calculator")
    assert calc.extract("<think>65*73 is 4745</think>The answer is 4484.") == 4484.0
    assert calc.same(calc.extract("4484"), calc.extract("The answer is 4484.0")) and calc.extract("none") is None
    math = answer_verifier("math")
    assert math.same(math.extract("so \\boxed{\\frac{1}{2}}"), math.extract("\\boxed{0.5}"))
    assert not math.same(math.extract("\\boxed{2}"), math.extract("\\boxed{3}"))
    assert math.extract("\\boxed{2") is None
    short = answer_verifier("contains_answer")
    assert short.extract("<think>hm</think>The answer is  Paris.") == "paris"
    with pytest.raises(LookupError, match="register_answer"):
        answer_verifier("format")


def test_reflection_prompt() -> None:
    row = PromptRow(
        3,
        [
            {"role": "system", "content": "Answer with the help of the tools."},
            {"role": "user", "content": "Compute 2*3."},
        ],
        "tiderl/calculator",
        "6",
    )
    out = reflection_row(row, ["The answer is 6.", "(no answer)"])
    assert out.messages[0] == row.messages[0] and out.index == 3 and out.ground_truth == "6"
    assert out.messages[1]["content"] == (
        "Compute 2*3.\n\n2 attempts at this gave these final answers:\nAttempt 1: The answer is 6.\n"
        "Attempt 2: (no answer)\nCheck them and give the final answer."
    )
    assert out.extra_info["heavy_attempts"] == 2


def hand_majority(texts: list[list[str]], verdicts: list[list[bool]], n: int) -> float:
    """majority@n as the docs describe it, written out again with a Counter: numbers compared as floats, ties to
    the answer first given."""
    total = 0.0
    for answers, right in zip(texts, verdicts, strict=True):
        blocks = len(answers) // n
        for b in range(blocks):
            got = [
                (float(a), right[b * n + i])
                for i, t in enumerate(answers[b * n : (b + 1) * n])
                if (a := extract_answer(t)) is not None
            ]
            if not got:
                continue
            counts = Counter(v for v, _ in got)
            top = max(counts.values())
            winner = next(v for v, _ in got if counts[v] == top)
            total += next(r for v, r in got if v == winner) / blocks
    return total / len(texts)


@pytest.fixture(scope="module")
def heavy_setup(make_cfg, tool_policy_dir, tmp_path_factory):
    cfg = make_cfg("data.eval_size=12", "rollout.max_new_tokens_per_turn=40", "cluster.backend=in_process")
    rows = load_split(cfg, "eval", tmp_path_factory.mktemp("heavy-data"))
    return cfg, rows, InProcessBackend(str(tool_policy_dir), cfg.worker_spec(), 1)


def test_heavy_mode_matches_a_hand_count_of_the_same_samples(heavy_setup) -> None:
    cfg, rows, workers = heavy_setup
    scorer, n = RewardScorer(cfg.reward), 4
    # the samples heavy mode draws: the same seed gives the same samples (checked), so they can be recorded first
    first = workers.generate(rows, n, greedy=False, seed=cfg.seed + HEAVY_SEED)
    # the briefly warm-started policy is rarely right; so that votes have right and wrong answers to tell apart, each
    # prompt's ground truth becomes its first sample's answer (the samples do not depend on the ground truth)
    answers = {t.row.index: extract_answer(t.response_text) for t in reversed(first) if t.sample_id.endswith("-0")}
    rows = [replace(r, ground_truth=answers[r.index] or r.ground_truth) for r in rows]
    recorded = workers.generate(rows, n, greedy=False, seed=cfg.seed + HEAVY_SEED)
    assert [t.token_ids.tolist() for t in recorded] == [t.token_ids.tolist() for t in first]
    verdicts = {id(s.trajectory): s.correct for s in scorer.score(recorded).scored}
    texts = [[t.response_text for t in recorded if t.row.index == row.index] for row in rows]
    right = [[verdicts.get(id(t), False) for t in recorded if t.row.index == row.index] for row in rows]
    assert all(len(t) == n for t in texts)

    heavy = heavy_eval(workers, scorer, rows, cfg, n)
    assert [r["n"] for r in heavy["by_n"]] == [1, 2, 4]
    for r in heavy["by_n"]:
        assert r["majority"] == pytest.approx(hand_majority(texts, right, r["n"]), abs=1e-12)
        hand_pass = sum(pass_at(sum(rs), n, r["n"]) for rs in right) / len(rows)
        assert r["pass"] == pytest.approx(hand_pass, abs=1e-12)
        assert r["pass"] >= r["majority"] - 1e-12
        # every reflection is scored; those without an extractable answer are counted (and are wrong)
        unparsed = r["reflective_unparsed"] * len(rows)
        assert unparsed == pytest.approx(round(unparsed)) and r["reflective_failed"] == 0.0
        assert r["reflective"] <= 1.0 - r["reflective_unparsed"] + 1e-12
    by_n = {r["n"]: r for r in heavy["by_n"]}
    assert by_n[1]["majority"] == pytest.approx(heavy["sample_accuracy"], abs=1e-12)  # blocks of 1: every sample
    # most samples give a number; with those ground truths every prompt whose first sample answered has a right one
    assert heavy["samples_without_answer"] < 0.5 and 0.0 < heavy["sample_accuracy"]
    assert by_n[4]["pass"] >= sum(a is not None for a in answers.values()) / len(rows) > 0.0
    assert heavy["num_prompts"] == 12 and heavy["n"] == 4


def test_tiderl_eval_heavy_writes_eval_json(make_cfg, tool_policy_dir, tmp_path) -> None:
    cfg = make_cfg("data.eval_size=4", "rollout.max_new_tokens_per_turn=40", "eval.sampled=false")
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "step_000003"  # a checkpoint's policy and the file that marks it complete
    checkpoint.mkdir(parents=True)
    shutil.copytree(tool_policy_dir, checkpoint / "policy")
    (checkpoint / "controller_state.json").write_text(json.dumps({"step": 3}))
    (run / "config.yaml").write_text(dump_config(cfg))
    (run / "eval.json").write_text(json.dumps({"after": {"accuracy": 0.5}}))
    result = CliRunner().invoke(app, ["eval", str(run), "cluster.backend=in_process", "--heavy", "2"])
    assert result.exit_code == 0, result.output
    assert "held-out greedy" in result.output and "heavy mode: 4 prompts x 2 samples" in result.output
    evals = json.loads((run / "eval.json").read_text())
    assert evals["after"] == {"accuracy": 0.5}  # the training's evals stay
    assert evals["checkpoint"]["step"] == 3 and evals["checkpoint"]["num_prompts"] == 4.0
    assert evals["heavy"]["step"] == 3 and [r["n"] for r in evals["heavy"]["by_n"]] == [1, 2]
    missing = CliRunner().invoke(app, ["eval", str(tmp_path)])
    assert missing.exit_code == 2 and "not a tiderl run directory" in missing.output
