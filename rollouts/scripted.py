"""A scripted policy behind the engine's batcher API: demonstrations produced by the agent loop itself.

A task whose solution is a rule (read the last key, call the tool with it) can have that rule play the policy's part
in the real agent loop (`AgentLoop(ScriptedPolicy(renderer, respond), ...)`). Its trajectories then hold exactly
the training sequences a rollout of the same environment under the same `env` config would hold — the template's
tool-result rendering, context rewrites under `env.context` (hidden results, dropped steps, one sequence per
rewrite) — which is what a supervised warm start should fit: a policy fitted on whole conversations rendered once
has never seen a rewritten context. Tests use it the same way, as a deterministic policy with known outputs.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from rollouts.renderer import Renderer
from rollouts.requests import Generation, Request

CONTEXT_TAIL = 400
"""Tokens of the request's end decoded for `respond`: the last turns and results, not the whole context."""


class ScriptedPolicy:
    """Answers every request with `respond(text)`, `text` being the decoded end of the request's context.

    `respond` returns the assistant's next message as the policy would sample it (tool calls in the template's own
    `<tool_call>` format); the stop token is appended. Each request is kept in `record` as (prompt ids, sampled
    ids, logprobs); the logprobs are `logprob`, or distinct random values from `seed` (so a test sees a misplaced
    one).
    """

    def __init__(
        self, renderer: Renderer, respond: Callable[[str], str], logprob: float | None = None, seed: int = 0
    ) -> None:
        self.renderer, self.respond, self.logprob = renderer, respond, logprob
        self.record: list[tuple[list[int], list[int], list[float]]] = []
        self.waiting: list[tuple[Request, Callable[[Generation], None]]] = []
        self.rng = random.Random(seed)

    def batcher(self, sampling, slots: int, max_len: int) -> ScriptedPolicy:
        """The engine's batcher API: this policy batches nothing, so it is its own batcher."""
        return self

    @property
    def busy(self) -> bool:
        return bool(self.waiting)

    def submit(self, request: Request, on_done: Callable[[Generation], None]) -> None:
        self.waiting.append((request, on_done))

    def step(self) -> None:
        waiting, self.waiting = self.waiting, []
        for request, on_done in waiting:
            text = self.respond(self.renderer.decode(request.prompt[-CONTEXT_TAIL:]))
            ids = self.renderer.encode(text) + [self.renderer.eos_token_id]
            logprobs = [self.logprob if self.logprob is not None else -0.01 - self.rng.random() for _ in ids]
            self.record.append((list(request.prompt), ids, logprobs))
            on_done(Generation(ids, logprobs))
