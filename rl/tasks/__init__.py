"""Built-in generated tasks: calculator (the default job's), python_math, search_qa. See `registry`."""

from rl.tasks.registry import TASKS, Task, get_task, register_task

__all__ = ["TASKS", "Task", "get_task", "register_task"]
