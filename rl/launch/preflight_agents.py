"""Preflight checks of an agent function used as the environment (`env.name=agent.py:run`, envs/agent.py): what
`rl.launch.preflight` asks of a plain function in place of an environment class."""

from __future__ import annotations

import importlib.util
from typing import Any

from envs.agent import agent_signature_problem
from rl.config import JobConfig
from rl.launch.preflight import Problem, _name


def agent_checks(cfg: JobConfig, fn: Any) -> list[Problem]:
    """An agent function (`env.name=agent.py:run`, envs/agent.py): its signature, the `openai` package it is handed
    a client of, and the settings an agent episode cannot honour."""
    name = cfg.env.name
    problems = []
    why = agent_signature_problem(fn)
    if why is not None:
        problems.append(Problem("env.name", name, f"{_name(fn)} {why}"))
    if importlib.util.find_spec("openai") is None:
        problems.append(
            Problem(
                "env.name",
                name,
                "an agent function is handed an openai.AsyncOpenAI client, and the openai package is not installed: "
                "pip install -e '.[agents]'",
            )
        )
    if cfg.env.kwargs:
        problems.append(
            Problem("env.kwargs", cfg.env.kwargs, "an agent function takes no constructor arguments: drop env.kwargs")
        )
    if cfg.rollout.partial_rollout_budget:
        problems.append(
            Problem(
                "rollout.partial_rollout_budget",
                cfg.rollout.partial_rollout_budget,
                "an agent episode runs to its end within its step (an agent cannot be paused between two "
                "steps): set it to 0",
            )
        )
    if cfg.algorithm.routing_replay == "replay":
        problems.append(
            Problem(
                "algorithm.routing_replay",
                "replay",
                "the OpenAI endpoint does not record the rollout's routing, so an agent's episodes cannot replay it: "
                "use algorithm.routing_replay=off (or record, which measures the episodes that carry routing)",
            )
        )
    if cfg.reward.models and cfg.reward.models_async:
        problems.append(
            Problem(
                "reward.models_async",
                True,
                "agent episodes are sent to reward models after the step's rollouts, not from the worker: set "
                "reward.models_async=false",
            )
        )
    return problems
