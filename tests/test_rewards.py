"""The reward API: verl- and TRL-style functions (sync and async) adapted, validated and isolated; the built-in
math, format and K1.5 length rewards; user reward files from both peers in real jobs."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import torch

from envs.base import PromptRow
from rewards.api import Failure, RewardFunction, RewardSignatureError, detect_style
from rewards.config import RewardConfig
from rewards.math import compute_score as math_score
from rewards.math import last_boxed
from rewards.registry import REWARDS
from rewards.scoring import RewardScorer
from rewards.shaping import format_reward, length_reward
from rl.loop.controller import train
from rollouts.records import Sample, Trajectory, TrajectoryStatus

DATA = Path(__file__).parent / "data"


def _traj(i: int, text: str, source: str = "tiderl/calculator", truth: str = "42", tool: bool = False) -> Trajectory:
    row = PromptRow(i, [{"role": "user", "content": "Compute 6*7."}], source, truth, {"index": i, "difficulty": "easy"})
    messages = [*row.messages]
    if tool:
        messages += [
            {"role": "assistant", "content": "<think>calc</think><tool_call>{}</tool_call>"},
            {"role": "tool", "content": "42"},
        ]
    messages.append({"role": "assistant", "content": text})
    n = 3 + i
    mask = torch.tensor([0.0] + [1.0] * (n - 1))
    sample = Sample(f"{i}-0", i // 2, row, messages, text, prompt_length=1, num_turns=1, num_tool_calls=int(tool))
    return Trajectory(sample, torch.arange(n), torch.zeros(n), mask, policy_version=0, status=TrajectoryStatus.FINISHED)


def _inputs(trajs):
    from rewards.scoring import _input

    return [_input(t) for t in trajs]


def test_signatures_are_detected() -> None:
    def verl(data_source, solution_str, ground_truth, extra_info=None): ...
    async def verl_async(data_source, solution_str, ground_truth, extra_info=None): ...
    def trl(prompts, completions, **kwargs): ...
    def trl_minimal(completions, **kwargs): ...
    def neither(text): ...

    assert [detect_style("f", f) for f in (verl, verl_async, trl, trl_minimal, lambda *a, **k: 0)] == [
        "verl",
        "verl",
        "trl",
        "trl",
        "verl",
    ]
    with pytest.raises(RewardSignatureError, match=r"reward function 'g' takes \(text\): use verl's compute_score"):
        detect_style("g", neither)


def test_trl_functions_get_conversational_completions_and_dataset_columns() -> None:
    seen = {}

    def spy(
        prompts,
        completions,
        completion_ids,
        ground_truth,
        extra_info,
        difficulty,
        trainer_state,
        group_ids,
        correct=None,
        **kwargs,
    ):
        seen.update(
            prompts=prompts,
            completions=completions,
            ids=completion_ids,
            truth=ground_truth,
            extra=extra_info,
            difficulty=difficulty,
            step=trainer_state.global_step,
            groups=group_ids,
            correct=correct,
            rest=sorted(kwargs),
        )
        return [0.25] * len(completions)

    trajs = [_traj(0, "The answer is 42.", tool=True), _traj(1, "The answer is 41.")]
    scores = asyncio.run(RewardFunction("spy", spy, timeout_s=5).score(_inputs(trajs), step=7, correct=[True, False]))
    assert scores.values == [0.25, 0.25]
    assert seen["prompts"] == [[{"role": "user", "content": "Compute 6*7."}]] * 2
    assert seen["completions"][0] == trajs[0].messages[1:] and seen["completions"][1] == [
        {"role": "assistant", "content": "The answer is 41."}
    ]
    assert (
        seen["ids"] == [[1, 2], [1, 2, 3]] and seen["truth"] == ["42", "42"] and seen["difficulty"] == ["easy", "easy"]
    )
    assert seen["extra"][1] == {"index": 1, "difficulty": "easy"} and seen["step"] == 7 and seen["groups"] == [0, 0]
    assert seen["correct"] == [True, False] and seen["rest"] == ["data_source", "index", "reward_model"]


def test_bad_values_none_exceptions_and_timeouts_are_isolated_per_function_and_sample(caplog) -> None:
    def trl_raises_on_one(completions, **kwargs):
        if any("boom" in c[-1]["content"] for c in completions):
            raise ValueError("cannot parse")
        return [1.0] * len(completions)

    def trl_wrong_length(completions, **kwargs):
        return [1.0]

    async def slow_async(data_source, solution_str, ground_truth, extra_info=None):
        await asyncio.sleep(5 if "slow" in solution_str else 0)
        return 1.0

    def slow_sync(data_source, solution_str, ground_truth, extra_info=None):
        time.sleep(5 if "slow" in solution_str else 0)
        return None if "none" in solution_str else 0.5

    trajs = [_traj(0, "fine"), _traj(1, "boom"), _traj(2, "slow"), _traj(3, "none")]
    run = lambda fn: asyncio.run(RewardFunction("f", fn, timeout_s=0.3).score(_inputs(trajs), 0, None)).values  # noqa: E731
    start = time.perf_counter()
    assert run(trl_raises_on_one) == [1.0, Failure("raised ValueError: cannot parse"), 1.0, 1.0]
    assert run(trl_wrong_length) == [Failure("returned 1 scores for 4 completions")] * 4
    assert run(slow_async) == [1.0, 1.0, Failure("timed out after 0.3 s"), 1.0]
    assert run(slow_sync) == [0.5, 0.5, Failure("timed out after 0.3 s"), None]
    assert time.perf_counter() - start < 4  # the sleepers were abandoned, not waited for

    for name, fn in [("t_raises", trl_raises_on_one), ("t_sync", slow_sync)]:
        REWARDS.register(name)(fn)
    scorer = RewardScorer(
        RewardConfig.model_validate(
            {"functions": [{"name": "t_raises"}, {"name": "t_sync", "weight": 2.0, "timeout_s": 0.3}]}
        )
    )
    result = scorer.score(trajs)
    assert [s.trajectory.sample_id for s in result.scored] == ["0-0", "3-0"]
    assert [s.reward for s in result.scored] == [2.0, 1.0] and result.scored[1].reward_breakdown == {"t_raises": 1.0}
    assert result.failed == 2 and result.metrics == {
        "reward_failed/t_raises": 1.0,
        "reward_failed/t_sync": 1.0,
        "reward_none/t_sync": 1.0,
    }
    assert "sample 2-0 left out: reward function 't_sync' timed out after 0.3 s" in caplog.text


def test_reward_model_verdicts_add_up_or_fail_their_samples(caplog) -> None:
    """Fetched reward-model verdicts: a score is weighted into the reward, None is no score, and a model that failed
    on a sample (`model_score_failures`) or has no score for it fails the sample, logged with the reason."""
    models = [{"name": "rm", "kind": "classifier", "path": "unused", "weight": 0.5}]
    scorer = RewardScorer(RewardConfig.model_validate({"functions": [{"name": "calculator"}], "models": models}))
    scored, no_verdict, failed, missing, not_sent = (_traj(i, "The answer is 42.") for i in range(5))
    scored.model_scores = {"rm": 0.8}
    no_verdict.model_scores = {"rm": None}
    failed.model_scores, failed.model_score_failures = {}, {"rm": "reward model failed: RayTaskError: boom"}
    missing.model_scores = {}
    result = scorer.score([scored, no_verdict, failed, missing, not_sent])  # not_sent: no reward models ran on it
    assert [s.trajectory.sample_id for s in result.scored] == ["0-0", "1-0", "4-0"]
    assert [s.reward_breakdown for s in result.scored] == [
        {"calculator": 1.0, "rm": 0.8},
        {"calculator": 1.0},
        {"calculator": 1.0},
    ]
    assert result.scored[0].reward == pytest.approx(1.4)
    assert result.failed == 2 and result.metrics == {"reward_failed/rm": 2.0, "reward_none/rm": 1.0}
    assert "sample 2-0 left out: reward model 'rm': reward model failed: RayTaskError: boom" in caplog.text
    assert "sample 3-0 left out: reward model 'rm': no score was fetched" in caplog.text


@pytest.mark.parametrize(
    ("truth", "answer", "correct"),
    [
        ("\\frac{1}{2}", "so \\boxed{0.5}", True),  # fraction vs decimal
        ("0.75", "\\boxed{\\dfrac{3}{4}}", True),  # \dfrac
        ("1000", "\\boxed{1,000}", True),  # thousands separator
        ("\\{1, 2, 3\\}", "\\boxed{\\{3, 1, 2\\}}", True),  # reordered set
        ("(0, 1]", "\\boxed{(0, 1]}", True),
        ("(0, 1]", "\\boxed{[0, 1]}", False),  # open vs closed interval
        ("5", "first \\boxed{3}, then \\boxed{5}", True),  # the last boxed answer wins
        ("3", "first \\boxed{3}, then \\boxed{5}", False),
        ("5", "\\boxed{5", False),  # unbalanced braces: no answer
        ("5", "<think>\\boxed{5}</think>I do not know.", False),  # only the visible answer counts
        ("\\frac{2}{3}", "\\boxed{0.67}", False),
        ("12", "The answer is 12.", True),  # no box: the visible text
    ],
)
def test_math_verifier_equivalences(truth: str, answer: str, correct: bool) -> None:
    assert math_score("math", answer, truth)["acc"] is correct


def test_last_boxed_balances_nested_braces() -> None:
    assert last_boxed("\\boxed{\\frac{1}{2}} and \\boxed{\\{1, \\{2\\}\\}}") == "\\{1, \\{2\\}\\}"
    assert last_boxed("\\boxed{7} then \\boxed{8") == "7" and last_boxed("none") is None


def test_format_and_k15_length_rewards() -> None:
    good = [
        {"role": "assistant", "content": '<think>a</think><tool_call>{"name": "calc", "arguments": {}}</tool_call>'},
        {"role": "tool", "content": "1"},
        {"role": "assistant", "content": "<think>b</think>The answer is 1."},
    ]
    bad_call = [
        {"role": "assistant", "content": "<think>a</think><tool_call>{oops}</tool_call>"},
        {"role": "assistant", "content": "<think>b</think>1"},
    ]
    no_think = [{"role": "assistant", "content": "The answer is 1."}]
    empty_answer = [{"role": "assistant", "content": "<think>b</think>  "}]
    assert format_reward([], [good, bad_call, no_think, empty_answer]) == [1.0, 0.0, 0.0, 0.0]

    ids = [[0] * n for n in (10, 20, 30, 20, 20)]
    state = type("S", (), {"global_step": 5})()
    scores = length_reward(
        [], [None] * 5, ids, group_ids=[0, 0, 0, 1, 1], correct=[True, True, False, True, False], trainer_state=state
    )
    assert scores == [0.5, 0.0, -0.5, 0.0, 0.0]  # λ = 0.5, 0, -0.5 in group 0; equal lengths in group 1
    assert length_reward([], [None] * 5, ids, [0, 0, 0, 1, 1], [True] * 5, state, warmup_steps=5) == [0.0] * 5
    with pytest.raises(ValueError, match="first entry of reward.functions"):
        length_reward([], [None], [[0]], [0])


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_reward_files_written_for_verl_and_for_trl_run_unchanged_in_a_job(tmp_path: Path, make_cfg) -> None:
    verl, trl_acc, trl_tool = (
        f"{DATA}/verl_reward.py:compute_score",
        f"{DATA}/trl_reward.py:accuracy_reward",
        f"{DATA}/trl_reward.py:tool_use_reward",
    )
    functions = (
        f"reward.functions=[{{name: '{verl}'}}, {{name: '{trl_acc}', weight: 0.5}}, {{name: '{trl_tool}'}}, "
        "{name: format, weight: 0.1}]"
    )
    import datasets

    from rl.loop.data import builtin_rows

    parquet = (
        tmp_path / "train.parquet"
    )  # a verl dataset file: prompt messages, data_source, reward_model, extra_info, ability
    datasets.Dataset.from_list(
        [{**row, "ability": "math"} for row in builtin_rows("calculator", 32, 0, "train")]
    ).to_parquet(str(parquet))
    train(
        make_cfg(
            functions,
            "data.task=null",
            f"data.train_files=[{parquet}]",
            "trainer.steps=2",
            "eval.enabled=false",
            "cluster.backend=in_process",
        ),
        tmp_path / "run",
    )
    tmp_path = tmp_path / "run"
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and all(r["failed_samples"] == 0 and r["num_samples"] == 8 for r in rows)
    for name in (verl, trl_acc, trl_tool, "format"):
        assert f"reward/{name}" in rows[0] and not any(k.startswith("reward_failed/") for k in rows[0])
    assert rows[0][f"reward/{trl_acc}"] == rows[0][f"reward/{verl}"]  # the two peers' accuracy checks agree here
    saved = [json.loads(line) for line in (tmp_path / "trajectories" / "step_000002.jsonl").read_text().splitlines()]
    assert len(saved) == 8 and set(saved[0]["reward_breakdown"]) == {verl, trl_acc, trl_tool, "format"}
    # async pipeline (staleness 1): step 2 trains on samples generated by version 0 while step 1 trained
    assert saved[0]["messages"][-1]["role"] == "assistant" and saved[0]["policy_versions"] == [0]


def test_a_raising_and_a_sleeping_reward_function_fail_only_their_samples(tmp_path: Path, make_cfg) -> None:
    flaky, sleepy = f"{DATA}/unreliable_rewards.py:flaky", f"{DATA}/unreliable_rewards.py:sleepy"
    functions = f"reward.functions=[{{name: calculator}}, {{name: '{flaky}'}}, {{name: '{sleepy}', timeout_s: 0.5}}]"
    train(make_cfg(functions, "trainer.steps=3", "eval.enabled=false", "cluster.backend=in_process"), tmp_path)
    rows = _metrics(tmp_path)
    assert len(rows) == 3  # the job completed
    assert sum(r.get(f"reward_failed/{flaky}", 0) for r in rows) == 3  # calls 1, 11, 21 of 24
    assert sum(r.get(f"reward_failed/{sleepy}", 0) for r in rows) == 3
    assert all(r["num_samples"] + r["failed_samples"] == 8 for r in rows if "num_samples" in r)
    assert 3 <= sum(r["failed_samples"] for r in rows) <= 6 and all("loss" in r for r in rows)


@pytest.fixture(scope="module")
def classifier_dir(tiny_policy_dir, tmp_path_factory) -> Path:
    """A tiny sequence-classification reward model (one-label head) with the built-in tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_policy_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    out = tmp_path_factory.mktemp("rm")
    LlamaForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_verdict_parsing() -> None:
    from rewards.models import parse_pairwise, parse_pointwise

    assert (
        parse_pointwise("Mostly right. Score: 7") == 0.7 and parse_pointwise("Score: 3 ... revised Score: 9.5") == 0.95
    )
    assert parse_pointwise("Score: 12") is None and parse_pointwise("no verdict") is None
    assert [parse_pairwise(t) for t in ("[[A]]", "A is worse. [[B]]", "[[C]]", "[[D]]")] == [1.0, 0.0, 0.5, None]


def test_classifier_and_judge_reward_models_score_batches(classifier_dir, tiny_policy_dir) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rewards.config import RewardModelConfig
    from rewards.models import RewardModel

    items = [
        {
            "prompt": [{"role": "user", "content": "Compute 6*7."}],
            "completion": [{"role": "assistant", "content": t}],
            "group_id": g,
            "sample_id": f"{i}",
        }
        for i, (t, g) in enumerate([("The answer is 42.", 0), ("The answer is 41, after a long detour.", 0), ("42", 1)])
    ]
    rm = RewardModel(RewardModelConfig(name="rm", kind="classifier", path=str(classifier_dir), batch_size=2))
    scores = rm.score(items)
    tokenizer, model = (
        AutoTokenizer.from_pretrained(classifier_dir),
        AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval(),
    )
    for item, score in zip(items, scores, strict=True):  # batched and padded = one sequence alone
        text = tokenizer.apply_chat_template(item["prompt"] + item["completion"], tokenize=False)
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([tokenizer.encode(text, add_special_tokens=False)])).logits[0, 0]
        assert abs(score - float(alone)) < 1e-5
    assert len(set(scores)) == 3

    for mode in ("pointwise", "pairwise"):
        judge = RewardModel(
            RewardModelConfig(name="judge", kind="judge", path=str(tiny_policy_dir), mode=mode, max_new_tokens=6)
        )
        verdicts = judge.score(items)  # the untrained judge rambles: no verdict parses, each is None (no score)
        assert verdicts == [None, None, None]


@pytest.mark.usefixtures("ray_local")
def test_reward_model_scores_the_same_async_and_as_a_barrier(tmp_path: Path, make_cfg, classifier_dir) -> None:
    model = f"reward.models=[{{name: rm, kind: classifier, path: '{classifier_dir}', num_cpus: 0.5, weight: 0.5}}]"
    runs = {}
    for mode in ("true", "false"):
        run = tmp_path / mode
        train(
            make_cfg(
                model,
                f"reward.models_async={mode}",
                "rollout.cpus_per_worker=0.5",
                "trainer.steps=2",
                "eval.enabled=false",
            ),
            run,
        )
        runs[mode] = _metrics(run)
    for a, b in zip(runs["true"], runs["false"], strict=True):
        assert a["failed_samples"] == 0 and a["num_samples"] == 8 and "reward/rm" in a
        assert a["reward/rm"] == pytest.approx(b["reward/rm"], abs=1e-6) and a["reward_mean"] == pytest.approx(
            b["reward_mean"], abs=1e-6
        )
