"""The multi-turn tool loop: token-in/token-out, many episodes at once, generation batched across them.

An `Episode` is one sample in flight: its environment, its token ids, rollout logprobs and loss mask, the policy
version of each generated segment, and its counters. `AgentLoop.run_episodes` drives each episode as its own
asyncio task (reset, then turns and tool calls) over one continuous batch of the engine (`Engine.batcher`): a
turn submits a request and awaits its generation; between two decode steps the episodes whose turns ended run
their tools and submit their next turn, which joins the running batch at once. No turn waits for the slowest
sample or environment.

Each turn is limited by the turn budget, the sample's token budget (`rollout.token_budgets`, per task), the
sequence length, and the loop detector; hitting one truncates the sample and records which (`truncation`). With
a per-iteration budget (partial rollouts), a sample that reaches it is *paused* instead: its status is PARTIAL,
everything (tokens, logprobs, segments, the open turn, the environment object and its state) stays in the
`Episode`, and a later `run_episodes` call resumes it exactly where it stopped. An environment that raises marks
only its own episode as `error`.

With context management (`env.context`, `rollouts.context`), a tool step whose context passes the budget rewrites
it (older tool results hidden, the oldest steps dropped) and the episode continues in a new training sequence; the
closed ones travel in `Trajectory.earlier`, each exactly as the engine saw and sampled it.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from envs.base import PromptRow, StepResult, ToolCall
from envs.config import EnvConfig
from rollouts.config import RolloutConfig
from rollouts.context import ContextState, ToolStep, rewrite
from rollouts.engine import Engine, Generation, Request, SamplingParams
from rollouts.records import Sample, TokenSequence, Trajectory, TrajectoryStatus
from rollouts.renderer import Renderer
from rollouts.replay import ReplayRecord
from rollouts.tool_parsers import TOOL_CALL_PARSERS


@dataclass
class Episode:
    """One sample in flight: its `Sample` record (counters, conversation, outcome; the `Trajectory` it becomes holds
    the same record), its environment, the tokens so far, and where the loop stands in it."""

    sample: Sample
    group_size: int
    env: Any
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[float] = field(default_factory=list)
    version: int = 0
    """Policy version of the latest iteration that drove this episode."""
    turn_start: int | None = None
    """Index in `ids` where the unfinished assistant turn began (None between turns)."""
    generated: int = 0
    iteration_tokens: int = 0
    status: TrajectoryStatus | None = None
    """None while running; PARTIAL while paused; FINISHED / TRUNCATED / ERROR once done."""
    started: bool = False
    pending_calls: list[ToolCall] = field(default_factory=list)
    pending_errors: list[str] = field(default_factory=list)
    replay: ReplayRecord = field(default_factory=ReplayRecord)
    """Routing and kept ids for the learner to replay (`rollouts.replay`), when the engine records them."""
    last_turn_start: int = 0
    """Index in `ids` where the last closed assistant turn began (its tool step starts there)."""
    context: ContextState = field(default_factory=ContextState)
    """The prompt and tool steps of the current sequence, for context management."""
    earlier: list[TokenSequence] = field(default_factory=list)
    """Sequences closed by context rewrites, oldest first."""

    @property
    def key(self) -> int:
        """A stable number for this sample (its group and sample id), for its sampling seeds."""
        return zlib.crc32(f"{self.sample.group_id}/{self.sample.sample_id}".encode())

    @property
    def done(self) -> bool:
        return self.status is not None and self.status is not TrajectoryStatus.PARTIAL

    def append(self, ids: list[int], logprobs: list[float] | None, policy: bool) -> None:
        self.ids.extend(ids)
        self.logprobs.extend(logprobs if logprobs is not None else [0.0] * len(ids))
        self.mask.extend([1.0 if policy else 0.0] * len(ids))

    def add_segment(self, start: int, end: int, version: int) -> None:
        segments = self.sample.segments
        if segments and segments[-1][2] == version:
            segments[-1] = (segments[-1][0], end, version)
        elif end > start:
            segments.append((start, end, version))

    def split(self, context: list[int]) -> None:
        """Close the current sequence as it is and continue in a new one that starts with `context` (a rewrite of
        the current one: context only, mask 0)."""
        self.earlier.append(
            TokenSequence(
                torch.tensor(self.ids, dtype=torch.long),
                torch.tensor(self.logprobs, dtype=torch.float32),
                torch.tensor(self.mask, dtype=torch.float32),
                list(self.sample.segments),
            )
        )
        self.ids, self.logprobs, self.mask = list(context), [0.0] * len(context), [0.0] * len(context)
        self.sample.segments = []
        self.sample.context_rewrites += 1

    def truncate(self, reason: str) -> None:
        self.status, self.sample.truncation = TrajectoryStatus.TRUNCATED, reason

    def fail(self, error: str) -> None:
        self.status, self.sample.error = TrajectoryStatus.ERROR, error


@dataclass(frozen=True)
class GenerationProgress:
    """Where one generation call stands (what the terminal shows during a long step)."""

    done: int = 0
    """Samples that ended in this call (finished, truncated or failed)."""
    running: int = 0
    """Samples still generating or waiting on a tool."""
    paused: int = 0
    """Samples paused at the iteration budget (partial rollouts), to be resumed by the next step."""
    tokens: int = 0
    """Tokens generated in this call."""

    def __add__(self, other: GenerationProgress) -> GenerationProgress:
        return GenerationProgress(
            self.done + other.done,
            self.running + other.running,
            self.paused + other.paused,
            self.tokens + other.tokens,
        )


PROGRESS_EVERY_S = 0.5
"""How often a running generation reports its progress (`AgentLoop.on_progress`)."""


class AgentLoop:
    def __init__(
        self, engine: Engine, renderer: Renderer, env_factory: Callable[[], Any], rollout: RolloutConfig, env: EnvConfig
    ) -> None:
        self.engine = engine
        self.renderer = renderer
        self.env_factory = env_factory
        self.rollout = rollout
        self.env_cfg = env
        self.parse_tool_calls = TOOL_CALL_PARSERS[rollout.tool_call_format]
        self.temperature = rollout.temperature
        self.on_progress: Callable[[GenerationProgress], None] | None = None
        """Called with the running call's progress every `PROGRESS_EVERY_S` and when it ends (None: not reported)."""

    def new_episodes(
        self, rows: list[PromptRow], samples_per_prompt: int, group_ids: list[int] | None = None
    ) -> list[Episode]:
        """`samples_per_prompt` episodes per row; `group_ids[i]` names row i's group (default: the row index)."""
        gids = group_ids if group_ids is not None else [row.index for row in rows]
        return [
            Episode(Sample(f"{row.index}-{k}", gid, row), group_size=samples_per_prompt, env=self.env_factory())
            for row, gid in zip(rows, gids, strict=True)
            for k in range(samples_per_prompt)
        ]

    def run(
        self,
        rows: list[PromptRow],
        samples_per_prompt: int,
        policy_version: int,
        greedy: bool,
        generator: torch.Generator,
    ) -> list[Trajectory]:
        """Generate every sample to the end (no pausing) and return the trajectories."""
        episodes = self.new_episodes(rows, samples_per_prompt)
        self.run_episodes(episodes, policy_version, greedy, generator)
        return [self.trajectory(ep) for ep in episodes]

    def run_episodes(
        self,
        episodes: list[Episode],
        version: int,
        greedy: bool,
        generator: torch.Generator,
        iteration_budget: int = 0,
        on_done: Callable[[Episode], None] | None = None,
        temperature: float | None = None,
    ) -> None:
        """Drive `episodes` until each is done or, with `iteration_budget` > 0, paused at that many new tokens.

        Paused episodes passed in again are resumed; done ones are left alone. Environments of episodes that end
        are closed; paused ones keep theirs open. `on_done(ep)` is called as soon as an episode ends, while the
        others go on (the worker uses it to send finished groups to reward models).
        """
        self.temperature = temperature if temperature is not None else self.rollout.temperature
        asyncio.run(self._drive(episodes, version, greedy, generator, iteration_budget, on_done))

    async def _drive(
        self,
        episodes: list[Episode],
        version: int,
        greedy: bool,
        generator: torch.Generator,
        iteration_budget: int,
        on_done: Callable[[Episode], None] | None,
    ) -> None:
        live = [ep for ep in episodes if not ep.done]
        for ep in live:
            ep.iteration_tokens, ep.version = 0, version
            if ep.status is TrajectoryStatus.PARTIAL:
                ep.status = None
        # one draw from the worker's stream per call; each generation's seed derives from it, the episode and the
        # tokens it generated so far, so a sample's tokens do not depend on what it was batched with
        base_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        kept = 0 if greedy else self.rollout.kept_per_token  # top-p alone samples under the record's bound
        top_k = self.rollout.top_k or kept
        sampling = SamplingParams(self.temperature, greedy, self.rollout.top_p, top_k, kept)
        batcher = self.engine.batcher(sampling, len(live), self.rollout.max_tokens_per_sample)
        submitted = asyncio.Event()

        async def generate(ep: Episode, budget: int) -> Generation:
            result: asyncio.Future[Generation] = asyncio.get_running_loop().create_future()
            prefix = ep.ids[ep.turn_start :] if ep.turn_start is not None else []
            seed = _mix_seed(base_seed, ep.key, ep.generated)
            request = Request(list(ep.ids), budget, seed, prefix, (ep.sample.group_id, ep.sample.sample_id))
            batcher.submit(request, result.set_result)
            submitted.set()
            return await result

        async def drive(ep: Episode) -> None:
            if not ep.started:
                await self._reset(ep)
            while ep.status is None:
                await self._turn(ep, iteration_budget, generate)
                if ep.status is None:
                    await self._run_calls(ep)
            if on_done is not None and ep.done:
                on_done(ep)

        tasks = {asyncio.create_task(drive(ep)) for ep in live}
        pending = set(tasks)
        reported = time.monotonic()
        try:
            while pending:
                if self.on_progress is not None and time.monotonic() - reported > PROGRESS_EVERY_S:
                    self.on_progress(_progress(live))
                    reported = time.monotonic()
                if batcher.busy:
                    batcher.step()  # a few ms of compute on this thread; environments proceed between steps
                    await asyncio.sleep(0)
                    finished = {t for t in pending if t.done()}
                else:
                    submitted.clear()
                    waiter = asyncio.ensure_future(submitted.wait())
                    finished, _ = await asyncio.wait(pending | {waiter}, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    finished.discard(waiter)
                pending -= finished
                for task in finished:
                    task.result()  # _reset and _run_calls isolate environment failures; anything else is a bug
        finally:
            for task in pending:
                task.cancel()
            crashed = bool(pending)
            closing = [ep for ep in live if ep.started and (ep.done or crashed)]
            await asyncio.gather(*(ep.env.close() for ep in closing), return_exceptions=True)
            if self.on_progress is not None:
                self.on_progress(_progress(live))

    def close_envs(self, episodes: list[Episode]) -> None:
        """Close the environments of episodes dropped unfinished (paused ones given up on a restore)."""

        async def close() -> None:
            await asyncio.gather(
                *(ep.env.close() for ep in episodes if ep.started and not ep.done), return_exceptions=True
            )

        asyncio.run(close())

    async def _reset(self, ep: Episode) -> None:
        ep.started = True
        try:
            messages, tools = await ep.env.reset(ep.sample.row)
            ep.sample.messages = list(messages)
            prompt = self.renderer.prompt_ids(ep.sample.messages, tools)
        except Exception as e:  # the one place a failing sample is isolated: counted as `error`, never raised
            ep.fail(f"env reset failed: {type(e).__name__}: {e}")
            return
        ep.append(prompt, None, policy=False)
        ep.sample.prompt_length = len(prompt)
        ep.context = ContextState(list(messages), tools or None, len(prompt))
        if len(prompt) >= self.rollout.max_tokens_per_sample:
            ep.truncate("max_tokens_per_sample")

    def _limits(self, ep: Episode, iteration_budget: int) -> dict[str, int]:
        """Tokens the next generation may take under each limit; the first smallest one is what stops it."""
        turn_so_far = len(ep.ids) - ep.turn_start if ep.turn_start is not None else 0
        limits = {
            "max_new_tokens_per_turn": self.rollout.max_new_tokens_per_turn - turn_so_far,
            "token_budget": self._token_budget(ep.sample.row) - ep.generated,
            "max_tokens_per_sample": self.rollout.max_tokens_per_sample - len(ep.ids),
        }
        if iteration_budget:
            limits["iteration"] = iteration_budget - ep.iteration_tokens
        return limits

    def _token_budget(self, row: PromptRow) -> int:
        budget = row.extra_info.get("token_budget", self.rollout.token_budgets.get(row.data_source))
        return int(budget) if budget is not None else self.rollout.max_tokens_per_sample

    async def _turn(
        self, ep: Episode, iteration_budget: int, generate: Callable[[Episode, int], Awaitable[Generation]]
    ) -> None:
        """Generate (the rest of) one assistant turn under the smallest of the episode's limits."""
        limits = self._limits(ep, iteration_budget)
        limiter = min(limits, key=limits.__getitem__)
        if limits[limiter] <= 0:
            self._stop(ep, limiter)
            return
        out = await generate(ep, limits[limiter])
        if ep.turn_start is None:
            ep.turn_start = len(ep.ids)
        start = len(ep.ids)
        ep.replay.add(ep.ids, out)
        ep.append(out.token_ids, out.logprobs, policy=True)
        ep.add_segment(start, len(ep.ids), ep.version)
        ep.generated += len(out.token_ids)
        ep.iteration_tokens += len(out.token_ids)
        if out.stop_reason == "stop":
            self._end_turn(ep)
        else:
            self._stop(ep, "repeat" if out.stop_reason == "repeat" else limiter)

    def _stop(self, ep: Episode, limiter: str) -> None:
        """A generation stopped short of the end of its turn: pause at the iteration budget, else truncate."""
        if limiter == "iteration":
            ep.status = TrajectoryStatus.PARTIAL
            return
        if ep.turn_start is not None:
            self._close_turn(ep)
        ep.truncate(limiter)

    def _close_turn(self, ep: Episode) -> str:
        assert ep.turn_start is not None
        text = self.renderer.decode(ep.ids[ep.turn_start :])
        ep.last_turn_start, ep.turn_start = ep.turn_start, None
        ep.sample.num_turns += 1
        ep.sample.response_text = text
        ep.sample.messages.append({"role": "assistant", "content": text})
        return text

    def _end_turn(self, ep: Episode) -> None:
        calls, errors = self.parse_tool_calls(self._close_turn(ep))
        if not calls and not errors:
            ep.status = TrajectoryStatus.FINISHED
        elif ep.sample.num_turns >= self.env_cfg.max_turns:
            ep.truncate("max_turns")  # no turn left to read the result
        elif ep.sample.num_tool_calls + len(calls) + len(errors) > self.env_cfg.max_tool_calls:
            ep.truncate("max_tool_calls")
        else:
            ep.pending_calls, ep.pending_errors = calls, errors

    async def _run_calls(self, ep: Episode) -> None:
        """Send the turn's tool calls to the environment and append the observations (or the parse errors)."""
        calls, errors = ep.pending_calls, ep.pending_errors
        ep.pending_calls, ep.pending_errors = [], []
        ep.sample.num_tool_calls += len(calls) + len(errors)
        ep.sample.num_tool_errors += len(errors)
        observations = [{"role": "tool", "content": msg} for msg in errors]
        result = StepResult(observations=[])
        if calls:
            try:
                result = await ep.env.step(calls)
            except Exception as e:  # isolate the failing sample, as in _reset
                ep.fail(f"env step failed: {type(e).__name__}: {e}")
                return
            ep.sample.num_tool_errors += int(result.info.get("tool_errors", 0))
        observations.extend(result.observations)
        ep.sample.messages.extend(observations)
        obs_start = len(ep.ids)
        ep.append(self.renderer.observation_ids(observations), None, policy=False)
        ep.context.steps.append(ToolStep(ep.last_turn_start, obs_start, len(ep.ids), observations))
        if result.reward is not None:
            ep.sample.env_reward = float(result.reward)
        if result.done:
            ep.status = TrajectoryStatus.FINISHED
            return
        context = rewrite(ep.ids, ep.context, self.env_cfg.context, self.renderer)
        if context is not None:
            ep.split(context)
        if len(ep.ids) >= self.rollout.max_tokens_per_sample:
            ep.truncate("max_tokens_per_sample")

    def trajectory(self, ep: Episode) -> Trajectory:
        """The record of a done episode: its `Sample` with the tokens as tensors, and the oldest policy version that
        generated one of them."""
        if not ep.done:
            raise ValueError(
                f"sample {ep.sample.sample_id} is not done (status {ep.status}); "
                "only finished episodes become trajectories"
            )
        assert ep.status is not None  # done
        routing, sampling_mask = ep.replay.tensors(ep.ids)
        return Trajectory(
            sample=ep.sample,
            token_ids=torch.tensor(ep.ids, dtype=torch.long),
            logprobs=torch.tensor(ep.logprobs, dtype=torch.float32),
            loss_mask=torch.tensor(ep.mask, dtype=torch.float32),
            policy_version=min((v for seq in [*ep.earlier, ep.sample] for _, _, v in seq.segments), default=ep.version),
            status=ep.status,
            routing=routing,
            sampling_mask=sampling_mask,
            earlier=list(ep.earlier),
        )


def _progress(episodes: list[Episode]) -> GenerationProgress:
    paused = sum(ep.status is TrajectoryStatus.PARTIAL for ep in episodes)
    done = sum(ep.done for ep in episodes)
    tokens = sum(ep.iteration_tokens for ep in episodes)
    return GenerationProgress(done, len(episodes) - done - paused, paused, tokens)


def _mix_seed(base: int, episode: int, generated: int) -> int:
    """A 62-bit seed for one generation of one episode (splitmix64-style mixing of the three numbers)."""
    z = (base + 0x9E3779B97F4A7C15 * (episode + 1) + 0xBF58476D1CE4E5B9 * (generated + 1)) % (1 << 64)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % (1 << 64)
    return (z ^ (z >> 31)) >> 2
