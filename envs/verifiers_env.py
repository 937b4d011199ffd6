"""prime-rl's `verifiers` Environments as tiderl agent functions (`envs.agent`), and their datasets as prompt rows.

A verifiers Environment (`vf.SingleTurnEnv`, `vf.MultiTurnEnv`, `vf.ToolEnv`, or whatever a hub package's
`load_environment()` returns) runs its own rollout against an OpenAI-compatible client and scores it with its own
`Rubric`. That is exactly an agent function's contract, so the adapter is thin: `VerifiersAgent(env)` is an
`async (client, row) -> dict[str, float]` that wraps the worker's `openai.AsyncOpenAI` (pointed at the worker's
endpoint, which records the episode's tokens) in verifiers' own chat-completions client, runs
`env.run_rollout(...)` on the row, and returns the rubric's weighted reward functions as the reward's components
(their sum is verifiers' `reward`). Nothing of verifiers' loop is re-implemented: its prompts, tool calls, parsers,
stop conditions and scoring run unchanged.

`verifiers_rows(env, ...)` turns the environment's own dataset (`prompt`, `answer`, `info`, `example_id`) into rows
of verl's layout, which a task (`rl.tasks.verifiers`) serves as the job's prompts; the adapter reads the verifiers
fields back from `extra_info["verifiers"]`, so a row always reaches its environment as verifiers built it.

verifiers is an optional extra (`pip install -e ".[verifiers]"`, docs/hubs.md); this module imports it only when an
adapter is built, so the rest of `envs` never needs it. Pinned to verifiers 0.3.1, whose classic Environment API
this adapter speaks (0.4.0 dropped it for its v1 stack and pins openai<3).
"""

from __future__ import annotations

import importlib
import math
from typing import Any

from envs.base import PromptRow

VF_KEY = "verifiers"
"""`extra_info` key under which a row keeps the verifiers fields its environment reads (answer, info, ids)."""


def import_verifiers() -> Any:
    """`import verifiers` (the classic API), or an error that says how to install the extra."""
    try:
        return importlib.import_module("verifiers")
    except ImportError as e:
        raise ImportError(
            f"the verifiers adapter needs the `verifiers` package ({e}); install it with "
            "`pip install -e '.[verifiers]'`, see docs/hubs.md"
        ) from e


class VerifiersAgentError(RuntimeError):
    """A verifiers rollout ended in an error of its own (the sample fails; the agent runner counts it)."""


class VerifiersAgent:
    """An agent function (`envs.agent.AgentFn`) that runs one verifiers Environment's rollout per sample.

    `env` is a built `vf.Environment`; `model` the name sent in requests (default: the first model the server lists,
    asked once); `sampling_args` go to every request as verifiers passes them (e.g. `{"max_tokens": 64}`; the tiderl
    endpoint samples with the job's own temperature whatever a request asks). Environments scored per group
    (group reward functions, or `requires_group_rollouts`) are refused: an agent function sees one sample at a time.
    """

    def __init__(self, env: Any, model: str | None = None, sampling_args: dict[str, Any] | None = None) -> None:
        vf = import_verifiers()
        if not isinstance(env, vf.Environment):
            raise TypeError(f"VerifiersAgent needs a verifiers Environment, got {type(env).__name__}")
        if env.rubric.has_group_rewards or env.requires_group_rollouts:
            raise ValueError(
                f"verifiers environment {env.env_id or type(env).__name__!r} scores whole groups (group reward "
                "functions); tiderl's agent functions score one sample at a time: use per-sample reward functions"
            )
        self.env = env
        self.model = model
        self.sampling_args = dict(sampling_args or {})
        self._vf = vf
        names = env.rubric._get_reward_func_names()
        weights = env.rubric._get_reward_weights()
        self.weights = {name: float(w) for name, w in zip(names, weights, strict=True) if w != 0}
        """Reward function name -> weight, for the weighted ones (the rest are verifiers metrics, not reward)."""

    def __repr__(self) -> str:
        return f"VerifiersAgent({self.env.env_id or type(self.env).__name__})"

    async def __call__(self, client: Any, row: PromptRow) -> dict[str, float]:
        """Run the environment's rollout on `row` through `client`; the reward's components by function name."""
        output = await self.rollout(client, row)
        error = output.get("error")
        if error is not None and not _is_scored_outcome(error):
            raise VerifiersAgentError(f"verifiers rollout of row {row.index} failed: {_describe(error)}")
        metrics = output.get("metrics") or {}
        parts = {name: weight * float(metrics[name]) for name, weight in self.weights.items() if name in metrics}
        reward = float(output["reward"])
        # verifiers' reward is the weighted sum of exactly these functions; components that do not add up would
        # make the logged parts disagree with the reward trained on
        if not parts or not math.isclose(sum(parts.values()), reward, rel_tol=1e-6, abs_tol=1e-9):
            return {"verifiers": reward}
        return parts

    async def rollout(self, client: Any, row: PromptRow) -> Any:
        """verifiers' own `RolloutOutput` of `row` (prompt, completion, reward, metrics, error, ...), unjudged."""
        model = self.model or await self._served_model(client)
        vf_client = self._vf.OpenAIChatCompletionsClient(client)
        return await self.env.run_rollout(rollout_input(row), vf_client, model, dict(self.sampling_args))

    async def _served_model(self, client: Any) -> str:
        page = await client.models.list()
        if not page.data:
            raise VerifiersAgentError(f"the server at {client.base_url} lists no model; give VerifiersAgent(model=...)")
        self.model = page.data[0].id
        return self.model


def _is_scored_outcome(error: Any) -> bool:
    """Errors that are the policy's own outcome rather than a broken rollout: an empty reply, or a prompt that grew
    past the context. verifiers still scores those rollouts, and RL must see that score (dropping them would hide
    the failure from the policy)."""
    name = error.get("error") if isinstance(error, dict) else type(error).__name__
    return name in ("EmptyModelResponseError", "OverlongPromptError")


def _describe(error: Any) -> str:
    if isinstance(error, dict):
        chain = error.get("error_chain_str") or error.get("error_chain_repr") or error
        return str(chain)[:500]
    return f"{type(error).__name__}: {error}"[:500]


def rollout_input(row: PromptRow) -> dict[str, Any]:
    """The verifiers `RolloutInput` of a row: its prompt as the environment formatted it, and the fields the row
    kept under `extra_info["verifiers"]` (answer, info, task, example_id); a row from elsewhere passes its
    ground truth as the answer."""
    kept = dict(row.extra_info.get(VF_KEY) or {})
    kept.setdefault("example_id", row.index)
    if "answer" not in kept and row.ground_truth is not None:
        kept["answer"] = str(row.ground_truth)
    return {"prompt": [dict(m) for m in row.messages], **kept}


def verifiers_rows(env: Any, split: str, n: int = -1, seed: int | None = None) -> list[dict[str, Any]]:
    """`n` rows (all with -1) of the environment's dataset (`split` "train") or eval dataset ("eval"; verifiers
    falls back to the train set when there is none), shuffled by `seed` when given, in verl's layout."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    data = env.get_dataset(n=n, seed=seed) if split == "train" else env.get_eval_dataset(n=n, seed=seed)
    source = f"verifiers/{env.env_id or type(env).__name__}"
    rows = []
    for i, example in enumerate(data):
        prompt = example["prompt"]
        if not isinstance(prompt, list):
            raise ValueError(f"{source} example {i}: prompt is {type(prompt).__name__}, tiderl trains chat prompts")
        kept = {k: example[k] for k in ("answer", "info", "task", "example_id") if example.get(k) is not None}
        rows.append(
            {
                "prompt": [_plain_message(m) for m in prompt],
                "data_source": source,
                "reward_model": {"style": "rule", "ground_truth": example.get("answer")},
                "extra_info": {"split": split, "index": i, VF_KEY: kept},
            }
        )
    return rows


def _plain_message(message: Any) -> dict[str, Any]:
    """A dataset message as a plain dict without the null fields Arrow fills in (`tool_calls: None` on a user turn
    would otherwise reach the chat template)."""
    data = message.model_dump() if hasattr(message, "model_dump") else dict(message)
    return {k: v for k, v in data.items() if v is not None}
