"""Registry of reward functions.

A reward function has verl's signature `compute_score(data_source, solution_str, ground_truth, extra_info=None)`
or TRL's `reward_func(prompts, completions, **kwargs)` (see `rewards.api`). Register one with
`@register_reward("name")`, reference `path/to/file.py:fn` in the job config, or ship it in a package under the
entry point group `tiderl.rewards`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from envs.registry import Registry

RewardFn = Callable[..., Any]
REWARDS: Registry[RewardFn] = Registry("reward function", "tiderl.rewards")
register_reward = REWARDS.register


def get_reward(name: str) -> RewardFn:
    import rewards.answers  # noqa: F401  (each import registers its functions)
    import rewards.calculator  # noqa: F401
    import rewards.math  # noqa: F401
    import rewards.shaping  # noqa: F401

    return REWARDS.get(name)
