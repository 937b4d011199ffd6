"""Prompt data in verl's layout, the data cursor, and validation of what reward functions return."""

from __future__ import annotations

import math

import pytest
import torch

from envs.base import PromptRow
from rewards.config import RewardConfig
from rewards.registry import REWARDS
from rewards.scoring import RewardScorer
from rl.loop.data import DataError, PromptSampler, load_split
from rollouts.records import Sample, Trajectory, TrajectoryStatus


def _verl_rows() -> list[dict]:
    good = {
        "prompt": [{"role": "user", "content": "Compute 2*3."}],
        "data_source": "openai/gsm8k",
        "reward_model": {"style": "rule", "ground_truth": "6"},
        "extra_info": {"split": "train", "index": 0},
    }
    return [
        good,
        {**good, "reward_model": {"style": "rule", "ground_truth": None}},  # no answer to check
        {**good, "prompt": [{"role": "user", "content": None}]},  # message without content
        {
            **good,
            "prompt": [{"role": "user", "content": "Compute 3*3."}],
            "reward_model": {"style": "rule", "ground_truth": "9"},
        },
    ]


def test_verl_parquet_layout_loads_and_bad_rows_are_skipped(tmp_path, make_cfg, caplog) -> None:
    import datasets

    path = tmp_path / "train.parquet"
    datasets.Dataset.from_list(_verl_rows()).to_parquet(str(path))
    cfg = make_cfg("data.task=null", f"data.train_files=[{path}]", f"data.eval_files=[{path}]", "data.eval_size=1")
    rows = load_split(cfg, "train", tmp_path)
    assert [(r.messages, r.ground_truth, r.data_source) for r in rows] == [
        ([{"role": "user", "content": "Compute 2*3."}], "6", "openai/gsm8k"),
        ([{"role": "user", "content": "Compute 3*3."}], "9", "openai/gsm8k"),
    ]
    assert rows[0].extra_info["split"] == "train" and rows[0].extra_info["source"].endswith("train.parquet#0")
    assert "skipping row 1" in caplog.text and "skipping row 2" in caplog.text and "skipped 2 of 4 rows" in caplog.text
    assert len(load_split(cfg, "eval", tmp_path)) == 1
    # a plain-string prompt (TRL's "standard" format) is taken as one user message
    plain = tmp_path / "plain.jsonl"
    datasets.Dataset.from_list([{"prompt": "Compute 4*4.", "reward_model": {"ground_truth": "16"}}]).to_json(str(plain))
    (row,) = load_split(
        make_cfg("data.task=null", f"data.train_files=[{plain}]", "eval.enabled=false"), "train", tmp_path
    )
    assert (row.messages, row.ground_truth, row.data_source) == (
        [{"role": "user", "content": "Compute 4*4."}],
        "16",
        "unknown",
    )


def test_unusable_or_missing_files_are_errors(tmp_path, make_cfg) -> None:
    import datasets

    path = tmp_path / "bad.jsonl"
    datasets.Dataset.from_list([{"prompt": "x", "reward_model": {"ground_truth": None}}]).to_json(str(path))
    with pytest.raises(DataError, match="none of its 1 rows is usable"):
        load_split(make_cfg("data.task=null", f"data.train_files=[{path}]", "eval.enabled=false"), "train", tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_split(
            make_cfg("data.task=null", f"data.train_files=[{tmp_path / 'nope.parquet'}]", "eval.enabled=false"),
            "train",
            tmp_path,
        )


def test_builtin_task_splits_differ_and_cursor_walks_epochs(tmp_path, make_cfg) -> None:
    cfg = make_cfg()
    train, held_out = load_split(cfg, "train", tmp_path), load_split(cfg, "eval", tmp_path)
    assert len(train) == 64 and len(held_out) == 8
    assert not {r.extra_info["expression"] for r in held_out} & {r.extra_info["expression"] for r in train}
    sampler = PromptSampler(train, seed=0)
    first = sampler.next(60)
    assert sampler.state_dict() == {"epoch": 0, "position": 60, "draws": 0, "success": {}}
    second = sampler.next(10)
    assert sampler.state_dict() == {"epoch": 1, "position": 6, "draws": 0, "success": {}}
    assert len({r.index for r in first + second[:4]}) == 64  # the first epoch visits every row once
    replay = PromptSampler(train, seed=0)
    replay.load_state_dict({"epoch": 0, "position": 60})
    assert [r.index for r in replay.next(10)] == [r.index for r in second]


def _trajectory(text: str) -> Trajectory:
    row = PromptRow(3, [{"role": "user", "content": "Compute 6*7."}], "tiderl/calculator", "42")
    ids = torch.tensor([1, 2, 3])
    sample = Sample("3-0", 3, row, [], text, prompt_length=1, num_turns=1, num_tool_calls=0)
    mask = torch.tensor([0.0, 1.0, 1.0])
    return Trajectory(sample, ids, torch.zeros(3), mask, policy_version=0, status=TrajectoryStatus.FINISHED)


def test_reward_weights_breakdown_and_accuracy() -> None:
    REWARDS.register("test_half")(lambda data_source, solution_str, ground_truth, extra_info=None: 0.5)
    scorer = RewardScorer(
        RewardConfig.model_validate({"functions": [{"name": "calculator"}, {"name": "test_half", "weight": 2.0}]})
    )
    (right,), (wrong,) = (
        scorer.score([_trajectory("The answer is 42.")]).scored,
        scorer.score([_trajectory("The answer is 41.")]).scored,
    )
    assert (right.reward, right.correct, right.reward_breakdown) == (2.0, True, {"calculator": 1.0, "test_half": 0.5})
    assert (wrong.reward, wrong.correct) == (1.0, False)


@pytest.mark.parametrize(
    ("value", "message"),
    [(math.nan, "scores must be finite"), ("1.0", "expected a number or None"), ({"acc": True}, "without 'score'")],
)
def test_invalid_reward_values_fail_the_sample_naming_function_and_sample(value, message, caplog) -> None:
    name = f"test_bad_{type(value).__name__}"
    REWARDS.register(name)(lambda *a, **k: value)
    result = RewardScorer(RewardConfig.model_validate({"functions": [{"name": name}]})).score([_trajectory("x")])
    assert result.scored == [] and result.failed == 1 and result.metrics == {f"reward_failed/{name}": 1.0}
    assert f"sample 3-0 left out: reward function '{name}' returned" in caplog.text and message in caplog.text


def test_reward_function_that_raises_fails_only_its_sample(caplog) -> None:
    def flaky(data_source, solution_str, ground_truth, extra_info=None):
        if "boom" in solution_str:
            raise RuntimeError("parser crashed")
        return 1.0

    REWARDS.register("test_flaky")(flaky)
    result = RewardScorer(RewardConfig.model_validate({"functions": [{"name": "test_flaky"}]})).score(
        [_trajectory("boom"), _trajectory("ok")]
    )
    assert result.failed == 1 and [s.reward for s in result.scored] == [1.0]
    assert "sample 3-0 left out: reward function 'test_flaky' raised RuntimeError: parser crashed" in caplog.text
