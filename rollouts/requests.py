"""What the rollout engine takes and returns: a `Request` (prompt ids, a token budget, a sampling seed) and its
`Generation` (the sampled ids, their logprobs, why it stopped, and what routing and sampling-mask replay record), and
the request intake both batchers share (`_Queue`)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

StopReason = Literal["stop", "length", "repeat"]


@dataclass
class Generation:
    token_ids: list[int]
    """Sampled ids, including the stop token when `finished`."""
    logprobs: list[float]
    """Logprob of each sampled id under logits / temperature."""
    stop_reason: StopReason = "stop"
    routing: torch.Tensor | None = None  # [len(prompt) + len(token_ids) - 1, moe layers, top_k] uint8
    """With `Engine(record_routing=True)`: the experts each MoE layer routed every position of the request's context
    to (prompt and sampled tokens; the last sampled token is never fed back, so it has none), sorted per layer."""
    kept: torch.Tensor | None = None  # [len(token_ids), k] int32
    """With `SamplingParams.record_kept`: the ids each draw kept under top-k / top-p, -1 padding."""

    @property
    def finished(self) -> bool:
        """Ended with the stop token."""
        return self.stop_reason == "stop"


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    seed: int = 0
    """Sampling stream of this request (token t uses hash(seed, t))."""
    turn_prefix: list[int] = field(default_factory=list)
    """Tokens this turn already generated (the tail of `prompt`, when a paused rollout resumes), so the loop
    detector sees the same history as in an uninterrupted generation."""
    session: Hashable | None = None
    """The conversation (episode) this request continues: its next request may reuse this one's cache slot."""


_Item = tuple[Request, Callable[[Generation], None]]
"""A submitted request and the callback its result goes to."""


class _Queue:
    """Request intake shared by both batchers: bad requests are refused naming the problem, empty budgets done at
    once."""

    max_len: int | None = None
    waiting: Any

    def submit(self, request: Request, on_done: Callable[[Generation], None]) -> None:
        if not request.prompt:
            raise ValueError("empty prompt")
        if self.max_len is not None and len(request.prompt) + request.max_new_tokens > self.max_len:
            raise ValueError(
                f"request of {len(request.prompt)} prompt + {request.max_new_tokens} new tokens exceeds the batch's "
                f"{self.max_len}-token sequences"
            )
        if request.max_new_tokens <= 0:
            on_done(Generation([], [], "length"))
            return
        self.waiting.append((request, on_done))
