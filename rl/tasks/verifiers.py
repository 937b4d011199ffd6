"""A verifiers Environment's dataset as a tiderl task (`data.task: path/to/file.py:TASK`).

`verifiers_task(env, name)` serves the environment's own train and eval datasets (`envs.verifiers_env.verifiers_rows`)
as the job's prompts, in the layout every other task has; the environment's rollout and rubric run in the agent
function `envs.verifiers_env.VerifiersAgent(env)` that `env.name` points at. docs/hubs.md shows both in one file.
"""

from __future__ import annotations

from typing import Any

from envs.verifiers_env import verifiers_rows
from rl.tasks.registry import Rows, Task


def verifiers_task(env: Any, name: str) -> Task:
    """A task whose train split is `env`'s dataset and whose eval split is its eval dataset (verifiers falls back to
    the train set when the environment has none). Rows keep the dataset's order for a given job seed: the job's
    sampler shuffles them per epoch; `n` caps how many are served (`data.train_size`, `data.eval_size`)."""

    def make_rows(n: int, seed: int, split: str) -> Rows:
        return verifiers_rows(env, "eval" if split == "eval" else "train", n=n, seed=seed)

    return Task(name=name, make_rows=make_rows, env="(agent function)", reward="(the environment's rubric)")
