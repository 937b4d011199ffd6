"""Registry of environments: `@register_env("name")` on a class whose instances follow `envs.base.Env`.

An environment is constructed once per sample with the job's `env` section: `cls.from_config(cfg)` when the class
defines it (the python tool takes its sandbox limits that way), else `cls(**cfg.kwargs)`.
"""

from __future__ import annotations

from typing import Any

from rl.config import EnvConfig
from rl.registry import Registry

ENVS: Registry[type] = Registry("environment", "tiderl.envs")
register_env = ENVS.register


def load_builtin_envs() -> None:
    import envs.calculator  # noqa: F401  (each import registers its environment)
    import envs.python_tool  # noqa: F401
    import envs.search  # noqa: F401


def env_class(name: str) -> type:
    load_builtin_envs()
    return ENVS.get(name)


def make_env(cfg: EnvConfig) -> Any:
    """A fresh environment for one sample, from the job's `env` section."""
    cls = env_class(cfg.name)
    if hasattr(cls, "from_config"):
        return cls.from_config(cfg)
    try:
        return cls(**cfg.kwargs)
    except TypeError as e:
        raise TypeError(f"environment {cfg.name!r} could not be constructed from env.kwargs={cfg.kwargs}: {e}") from e
