"""The python tool: model-written code run in `envs.sandbox`.

`python(code)` runs the code in a fresh sandbox (no network, read-only filesystem but a scratch directory,
CPU/wall/memory/process/output limits from `env.sandbox`, nothing left running afterwards) and returns what it
printed; a failure (exception, limit hit) comes back as an `Error: ...` observation with the traceback's tail.
The `python_math` task (`rl.tasks.python_math`) asks questions that are one line of Python with it.
"""

from __future__ import annotations

from envs.config import EnvConfig, SandboxConfig
from envs.registry import register_env
from envs.sandbox import PythonSandbox
from envs.tools import ToolEnv, ToolError, tool


@register_env("python")
class PythonEnv(ToolEnv):
    """One tool, `python(code)`, run in the sandbox with the job's `env.sandbox` limits."""

    def __init__(self, sandbox: SandboxConfig | None = None) -> None:
        self.sandbox = PythonSandbox(sandbox or SandboxConfig())

    @classmethod
    def from_config(cls, cfg: EnvConfig) -> PythonEnv:
        return cls(cfg.sandbox, **cfg.kwargs)

    @tool
    async def python(self, code: str) -> str:
        """Run Python code and return what it prints.

        Args:
            code: A Python program; print the values you need.
        """
        result = await self.sandbox.run(code)
        error = result.error()
        if error is None:
            return result.stdout.rstrip() or "(no output: print the values you need)"
        printed = result.stdout.rstrip()
        raise ToolError(error + (f"\nOutput before the error:\n{printed}" if printed else ""))
