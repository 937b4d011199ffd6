"""Every registered task: its rows are in verl's layout, its environment exists, and its verifier scores the gold
answer 1.0 and a wrong one 0.0 (the contract a task's three parts must keep with each other)."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from envs.registry import env_class
from rewards.registry import get_reward
from rl.config import ConfigError, load_config
from rl.loop.data import to_prompt_row
from rl.tasks import BUILT_IN, TASKS, get_task


def test_the_built_in_tasks_are_registered_when_asked_for() -> None:
    assert sorted(BUILT_IN) == ["calculator", "code_tests", "long_horizon", "python_math", "search_qa", "word_problems"]
    for name in BUILT_IN:
        assert get_task(name).name == name and name in TASKS.names()


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_task_rows_env_and_verifier_agree(name: str) -> None:
    task = get_task(name)
    env_class(task.env)
    train, held_out = task.make_rows(40, 0, "train"), task.make_rows(40, 0, "eval")
    assert train == task.make_rows(40, 0, "train") and train != held_out  # repeatable, and splits differ
    verify = get_reward(task.reward)  # the built-in verifiers have verl's signature

    def score(row, text: str) -> float:
        result = verify(row.data_source, text, row.ground_truth, row.extra_info)
        if inspect.isawaitable(result):  # an async verifier (code_tests runs its sandboxes concurrently)
            result = asyncio.run(result)
        return float(result["score"])

    for i, raw in enumerate(train[:8]):
        row = to_prompt_row(i, raw)
        gold = task.gold(raw) if task.gold else f"The answer is \\boxed{{{row.ground_truth}}}."
        assert score(row, gold) == 1.0, (name, row.ground_truth)
        assert score(row, "I do not know.") == 0.0, (name, row.ground_truth)


def test_an_unknown_task_is_a_config_error_naming_the_known_ones() -> None:
    with pytest.raises(LookupError, match="word_problems"):
        get_task("word_problem")
    with pytest.raises(ConfigError, match="unknown task 'word_problem'. Did you mean 'word_problems'"):
        load_config(None, ["model={}", "data.task=word_problem"])
    assert load_config(None, ["model={}", "data.task=my_tasks.py:TASK"]).data.task == "my_tasks.py:TASK"
