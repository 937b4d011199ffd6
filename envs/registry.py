"""Open, named registries, and the one for environments.

`Registry` is the generic table every layer's registry is built on (environments here; reward functions in
`rewards.registry`; advantage estimators, losses and tasks in `rl`): it sits in the bottom layer so that every
layer can use it. Users extend a registry three ways: the decorator (`@register_env("name")`) in code that gets
imported, a `path/to/file.py:attr` reference in the job config, or a package entry point in the registry's group
(`tiderl.envs`, `tiderl.rewards`, ...). A name that is not found is an error listing the known names.

An environment is constructed once per sample with the job's `env` section: `cls.from_config(cfg)` when the class
defines it (the python tool takes its sandbox limits that way), else `cls(**cfg.kwargs)`.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from envs.agent import is_agent_function
from envs.config import EnvConfig

T = TypeVar("T")


class RegistryError(LookupError):
    """A name or a file reference could not be resolved."""


class Registry(Generic[T]):
    """A name -> object table with file and entry-point loading."""

    def __init__(self, kind: str, entry_point_group: str) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@registry.register("name")`."""

        def decorator(obj: T) -> T:
            existing = self._items.get(name)
            if existing is not None and existing is not obj:
                raise RegistryError(f"{self.kind} {name!r} is already registered (by {existing!r})")
            self._items[name] = obj
            return obj

        return decorator

    def names(self) -> list[str]:
        return sorted(set(self._items) | {ep.name for ep in self._entry_points()})

    def get(self, ref: str) -> T:
        """Resolve a registered name, an entry point name, or `path/to/file.py:attr`."""
        if ":" in ref and ref.split(":", 1)[0].endswith(".py"):
            return self._load_from_file(ref)
        if ref in self._items:
            return self._items[ref]
        for ep in self._entry_points():
            if ep.name == ref:
                obj = ep.load()
                self._items[ref] = obj
                return obj
        known = self.names()
        close = difflib.get_close_matches(ref, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RegistryError(
            f"unknown {self.kind} {ref!r}.{hint} Known: {', '.join(known) or '(none)'}. "
            f"Add your own with a 'path/to/file.py:name' reference or an entry point in group "
            f"{self.entry_point_group!r}."
        )

    def _entry_points(self) -> list[importlib.metadata.EntryPoint]:
        return list(importlib.metadata.entry_points(group=self.entry_point_group))

    def _load_from_file(self, ref: str) -> T:
        path_str, attr = ref.rsplit(":", 1)
        path = Path(path_str).expanduser().resolve()
        if not path.is_file():
            raise RegistryError(f"{self.kind} reference {ref!r}: file {path} does not exist")
        module_name = f"tiderl_user_{path.stem}_{abs(hash(str(path)))}"
        module = sys.modules.get(module_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(module_name, path)
            if spec is None or spec.loader is None:
                raise RegistryError(f"{self.kind} reference {ref!r}: cannot import {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        if not hasattr(module, attr):
            raise RegistryError(f"{self.kind} reference {ref!r}: {path} defines no {attr!r}")
        return getattr(module, attr)


ENVS: Registry[type] = Registry("environment", "tiderl.envs")
register_env = ENVS.register


BUILT_IN_ENVS = {
    "calculator": "envs.calculator",
    "long_horizon": "envs.long_horizon",
    "python": "envs.python_tool",
    "search": "envs.search",
    "single_turn": "envs.single_turn",
}
"""The built-in environments and the module each registers itself in: a config check knows the names without
importing the modules (transformers, BM25)."""


def load_builtin_envs() -> None:
    for module in BUILT_IN_ENVS.values():
        importlib.import_module(module)  # each import registers its environment


def env_class(name: str) -> type:
    load_builtin_envs()
    return ENVS.get(name)


def make_env(cfg: EnvConfig) -> Any:
    """A fresh environment for one sample, from the job's `env` section."""
    cls = env_class(cfg.name)
    if is_agent_function(cls):
        raise TypeError(
            f"env.name={cfg.name!r} is an agent function: it runs against a rollout worker's OpenAI-compatible "
            "endpoint (rollouts.agents), not as an environment object"
        )
    if hasattr(cls, "from_config"):
        return cls.from_config(cfg)
    try:
        return cls(**cfg.kwargs)
    except TypeError as e:
        raise TypeError(f"environment {cfg.name!r} could not be constructed from env.kwargs={cfg.kwargs}: {e}") from e
