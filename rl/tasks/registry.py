"""Built-in tasks, registered like environments and rewards: `@register_task` / `data.task: name`.

A task is generated data with everything needed to train on it in one place: the rows (verl's layout, train and
eval from disjoint seeds), the environment the rows are meant for, the reward that verifies their answers, and
optionally the demonstrations a supervised warm start fits. Add your own with a `path/to/file.py:TASK` reference in
`data.task`, or an entry point in the group `tiderl.tasks`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from envs.registry import Registry

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class Task:
    """A generated task."""

    name: str
    make_rows: Callable[[int, int, str], Rows]
    """`(n, seed, split)` -> `n` rows in verl's layout (`prompt`, `data_source`, `reward_model.ground_truth`,
    `extra_info`); `split` is "train" or "eval" (or a warm start's own), each a disjoint stream."""
    env: str
    """The registered environment the prompts offer tools of (`env.name`)."""
    reward: str
    """The registered reward that verifies an answer against `reward_model.ground_truth` (`reward.functions`)."""
    demonstration: Callable[..., list[dict[str, Any]]] | None = None
    """Assistant turns that solve a row, for a supervised warm start (the built-in policy's)."""


TASKS: Registry[Task] = Registry("task", "tiderl.tasks")


def register_task(task: Task) -> Task:
    TASKS.register(task.name)(task)
    return task


def get_task(name: str) -> Task:
    """The task registered as `name` (the built-ins are imported first), or a `file.py:TASK` reference."""
    import rl.tasks.calculator  # noqa: F401  (each import registers its task)
    import rl.tasks.python_math  # noqa: F401
    import rl.tasks.search_qa  # noqa: F401
    import rl.tasks.word_problems  # noqa: F401

    task = TASKS.get(name)
    if not isinstance(task, Task):
        raise TypeError(f"task {name!r} is a {type(task).__name__}, not an rl.tasks.Task")
    return task
