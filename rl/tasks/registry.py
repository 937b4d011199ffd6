"""Built-in tasks, registered like environments and rewards: `@register_task` / `data.task: name`.

A task is generated data with everything needed to train on it in one place: the rows (verl's layout, train and
eval from disjoint seeds), the environment the rows are meant for, the reward that verifies their answers, and
optionally the demonstrations a supervised warm start fits. Add your own with a `path/to/file.py:TASK` reference in
`data.task`, or an entry point in the group `tiderl.tasks`.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from envs.registry import Registry, RegistryError

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
    teacher: Callable[[str], str] | None = None
    """The solution as a rule: the decoded end of a context -> the policy's next message (tool calls in the
    built-in template's `<tool_call>` format). With one, the built-in policy's warm start goes on from the
    calculator policy to fit the sequences this rule produces in the real agent loop under the job's `env` config
    (`rollouts.scripted`, `rl.policy.warmstart`), context rewrites included."""
    teacher_rows: Callable[[int, int, str], Rows] | None = None
    """`(n, seed, split)` -> the rows the teacher plays in that warm start for `warm_start.num_demos` = n, when
    they should differ from `make_rows`'s (`long_horizon` adds short chains); None: `make_rows`."""
    gold: Callable[[dict[str, Any]], str] | None = None
    """A response to a row that its reward scores 1.0 (the task contract test's gold answer); None: the ground truth
    in `\\boxed{}`."""


TASKS: Registry[Task] = Registry("task", "tiderl.tasks")
BUILT_IN = {
    "calculator": "rl.tasks.calculator",
    "code_tests": "rl.tasks.code_tests",
    "long_horizon": "rl.tasks.long_horizon",
    "python_math": "rl.tasks.python_math",
    "search_qa": "rl.tasks.search_qa",
    "word_problems": "rl.tasks.word_problems",
}
"""The built-in tasks and the module each registers itself in (imported when asked for: the search task loads
its BM25 index library, which a config check should not pay for)."""


def register_task(task: Task) -> Task:
    TASKS.register(task.name)(task)
    return task


def get_task(name: str) -> Task:
    """The task registered as `name` (a built-in is imported first), or a `file.py:TASK` reference."""
    if name in BUILT_IN:
        importlib.import_module(BUILT_IN[name])
    task = TASKS.get(name)
    if not isinstance(task, Task):
        raise TypeError(f"task {name!r} is a {type(task).__name__}, not an rl.tasks.Task")
    return task


def check_task_name(name: str) -> None:
    """Fail, naming the known tasks, unless `name` is built in, registered, an entry point or a file reference;
    imports nothing (what a task file holds is checked when the job loads it)."""
    known = sorted(set(BUILT_IN) | set(TASKS.names()))
    if name in known or (":" in name and name.split(":", 1)[0].endswith(".py")):
        return
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise RegistryError(f"unknown task {name!r}.{hint} Known: {', '.join(known)}; or 'path/to/file.py:TASK'.")
