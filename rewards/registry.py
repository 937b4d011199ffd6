"""Registry of reward functions.

A reward function has verl's signature `compute_score(data_source, solution_str, ground_truth, extra_info=None)`
or TRL's `reward_func(prompts, completions, **kwargs)` (see `rewards.api`). Register one with
`@register_reward("name")`, reference `path/to/file.py:fn` in the job config, or ship it in a package under the
entry point group `tiderl.rewards`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from envs.registry import Registry

RewardFn = Callable[..., Any]
REWARDS: Registry[RewardFn] = Registry("reward function", "tiderl.rewards")
register_reward = REWARDS.register


BUILT_IN_REWARDS = {
    "calculator": "rewards.calculator",
    "code_tests": "rewards.code_tests",
    "numeric_answer": "rewards.calculator",
    "contains_answer": "rewards.answers",
    "math": "rewards.math",
    "format": "rewards.shaping",
    "k1.5_length": "rewards.shaping",
    "dapo_overlong": "rewards.shaping",
}
"""The built-in reward functions and the module each is registered in: a config check knows the names without
importing the modules (math-verify)."""


def get_reward(name: str) -> RewardFn:
    for module in sorted(set(BUILT_IN_REWARDS.values())):
        importlib.import_module(module)  # each import registers its functions
    return REWARDS.get(name)
