"""Built-in generated tasks: calculator (the default job's), python_math, search_qa. See `registry`."""

from rl.tasks.registry import BUILT_IN, TASKS, Task, check_task_name, get_task, register_task

__all__ = ["BUILT_IN", "TASKS", "Task", "check_task_name", "get_task", "register_task"]
