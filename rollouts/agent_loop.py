"""The multi-turn tool loop, token-in/token-out, batched across samples.

Each turn, every unfinished episode's token ids go to the engine in one batch; each reply is parsed for tool
calls; the environments execute them concurrently (asyncio); observation tokens are appended with loss mask 0.
An episode finishes when the model answers without a tool call, and is truncated when a turn, tool-call or
token budget runs out. An environment that raises marks only its own episode as `error`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from envs.base import StepResult, ToolCall
from rl.config import EnvConfig, RolloutConfig
from rl.records import PromptRow, Trajectory, TrajectoryStatus
from rollouts.engine import Engine
from rollouts.renderer import Renderer, parse_tool_calls


@dataclass
class _Episode:
    sample_id: str
    group_id: int
    row: PromptRow
    env: Any
    messages: list[dict[str, Any]] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[float] = field(default_factory=list)
    prompt_length: int = 0
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    last_text: str = ""
    status: TrajectoryStatus | None = None
    error: str | None = None
    pending_calls: list[ToolCall] = field(default_factory=list)
    pending_errors: list[str] = field(default_factory=list)

    def append(self, ids: list[int], logprobs: list[float] | None, policy: bool) -> None:
        self.ids.extend(ids)
        self.logprobs.extend(logprobs if logprobs is not None else [0.0] * len(ids))
        self.mask.extend([1.0 if policy else 0.0] * len(ids))


class AgentLoop:
    def __init__(self, engine: Engine, renderer: Renderer, env_factory: Callable[[], Any], rollout: RolloutConfig, env: EnvConfig) -> None:
        self.engine = engine
        self.renderer = renderer
        self.env_factory = env_factory
        self.rollout = rollout
        self.env_cfg = env

    def run(self, rows: list[PromptRow], samples_per_prompt: int, policy_version: int, greedy: bool, generator: torch.Generator) -> list[Trajectory]:
        return asyncio.run(self._run(rows, samples_per_prompt, policy_version, greedy, generator))

    async def _run(self, rows: list[PromptRow], samples_per_prompt: int, version: int, greedy: bool, generator: torch.Generator) -> list[Trajectory]:
        episodes = [
            _Episode(sample_id=f"{row.index}-{k}", group_id=row.index, row=row, env=self.env_factory())
            for row in rows
            for k in range(samples_per_prompt)
        ]
        await asyncio.gather(*(self._reset(ep) for ep in episodes))
        try:
            for _ in range(self.env_cfg.max_turns):
                active = [ep for ep in episodes if ep.status is None]
                if not active:
                    break
                self._generate_turn(active, greedy, generator)
                stepping = [ep for ep in active if ep.status is None]
                await asyncio.gather(*(self._step(ep) for ep in stepping))
            for ep in episodes:
                if ep.status is None:
                    ep.status = TrajectoryStatus.TRUNCATED
        finally:
            await asyncio.gather(*(ep.env.close() for ep in episodes), return_exceptions=True)
        return [self._trajectory(ep, version) for ep in episodes]

    async def _reset(self, ep: _Episode) -> None:
        try:
            ep.messages, tools = await ep.env.reset(ep.row)
            ep.messages = list(ep.messages)
            prompt = self.renderer.prompt_ids(ep.messages, tools)
        except Exception as e:  # the one place a failing sample is isolated: counted as `error`, never raised
            ep.status, ep.error = TrajectoryStatus.ERROR, f"env reset failed: {type(e).__name__}: {e}"
            return
        ep.append(prompt, None, policy=False)
        ep.prompt_length = len(prompt)
        if len(prompt) >= self.rollout.max_tokens_per_sample:
            ep.status = TrajectoryStatus.TRUNCATED

    def _generate_turn(self, active: list[_Episode], greedy: bool, generator: torch.Generator) -> None:
        budgets = [min(self.rollout.max_new_tokens_per_turn, self.rollout.max_tokens_per_sample - len(ep.ids)) for ep in active]
        outs = self.engine.generate([ep.ids for ep in active], budgets, self.rollout.temperature, greedy, generator)
        for ep, out in zip(active, outs, strict=True):
            ep.append(out.token_ids, out.logprobs, policy=True)
            ep.turns += 1
            text = self.renderer.decode(out.token_ids)
            ep.last_text = text
            calls, errors = parse_tool_calls(text)
            ep.messages.append({"role": "assistant", "content": text})
            if not out.finished:
                ep.status = TrajectoryStatus.TRUNCATED
            elif not calls and not errors:
                ep.status = TrajectoryStatus.FINISHED
            elif ep.turns >= self.env_cfg.max_turns or ep.tool_calls + len(calls) + len(errors) > self.env_cfg.max_tool_calls:
                ep.status = TrajectoryStatus.TRUNCATED  # no turn left to read the result, or over the call budget
            else:
                ep.pending_calls, ep.pending_errors = calls, errors

    async def _step(self, ep: _Episode) -> None:
        calls, errors = ep.pending_calls, ep.pending_errors
        ep.tool_calls += len(calls) + len(errors)
        ep.tool_errors += len(errors)
        observations = [{"role": "tool", "content": msg} for msg in errors]
        result = StepResult(observations=[])
        if calls:
            try:
                result = await ep.env.step(calls)
            except Exception as e:  # isolate the failing sample, as in _reset
                ep.status, ep.error = TrajectoryStatus.ERROR, f"env step failed: {type(e).__name__}: {e}"
                return
            ep.tool_errors += int(result.info.get("tool_errors", 0))
        observations.extend(result.observations)
        ep.messages.extend(observations)
        obs_ids = self.renderer.observation_ids(observations)
        ep.append(obs_ids, None, policy=False)
        if result.done:
            ep.status = TrajectoryStatus.FINISHED
        elif len(ep.ids) >= self.rollout.max_tokens_per_sample:
            ep.status = TrajectoryStatus.TRUNCATED

    def _trajectory(self, ep: _Episode, version: int) -> Trajectory:
        return Trajectory(
            sample_id=ep.sample_id,
            group_id=ep.group_id,
            row=ep.row,
            token_ids=torch.tensor(ep.ids, dtype=torch.long),
            logprobs=torch.tensor(ep.logprobs, dtype=torch.float32),
            loss_mask=torch.tensor(ep.mask, dtype=torch.float32),
            prompt_length=ep.prompt_length,
            policy_version=version,
            status=ep.status or TrajectoryStatus.TRUNCATED,
            response_text=ep.last_text,
            messages=ep.messages,
            num_turns=ep.turns,
            num_tool_calls=ep.tool_calls,
            num_tool_errors=ep.tool_errors,
            error=ep.error,
        )
