"""Registry of environments: `@register_env("name")` on a class whose instances follow `envs.base.Env`."""

from __future__ import annotations

from rl.registry import Registry

ENVS: Registry[type] = Registry("environment", "tiderl.envs")
register_env = ENVS.register


def make_env(name: str) -> object:
    """Instantiate the environment registered under `name` (or loaded from 'file.py:Class')."""
    import envs.calculator  # noqa: F401  (registers the built-ins)

    return ENVS.get(name)()
