"""Token-faithful stitching of an agent's requests into training sequences (what the endpoint records per episode).

An agent talking to the endpoint sends its whole history with every request. When the history is the previous
request's messages plus the reply it got (plus new tool results or user turns), the new turn *continues the same
token sequence*: the prompt is the tokens the engine already saw and sampled, followed by the chat template's own
rendering of the new messages (`Renderer.observation_ids`, masked out of the loss), so nothing is re-tokenized and
the engine continues in the episode's cache slot. When the agent rewrote its history (dropped, edited or summarized
earlier messages, changed its tools, or asked twice from one state), the request starts a new sequence, rendered
from its messages; the sequences before it keep their own tokens and rollout logprobs, and all of them train with
the episode's reward (`Trajectory.earlier`). `/v1/completions` requests stitch the same way on text: a prompt that
starts with the previous prompt and its completion continues that sequence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from rollouts.openai_api import APIError, Reply, canonical
from rollouts.records import Sample, TokenSequence, Trajectory, TrajectoryStatus
from rollouts.renderer import Renderer


@dataclass
class _Sequence:
    """One training sequence of an episode: the tokens so far and what a request must repeat to continue it."""

    index: int
    kind: Literal["chat", "text"]
    tools: str
    """Canonical JSON of the tools offered (chat); a request with other tools starts a new sequence."""
    history: list[str] = field(default_factory=list)
    """chat: canonical form of every message so far, the replies included; text: [prompt + completions so far]."""
    messages: list[dict[str, Any]] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[float] = field(default_factory=list)
    segments: list[tuple[int, int, int]] = field(default_factory=list)
    prompt_length: int = 0
    ended_turn: bool = False
    """The last reply ended with the end-of-turn token (else it was cut, and a continuation closes it)."""
    busy: bool = False
    """A request on this sequence is being generated; another request from the same state starts a new one."""


@dataclass
class Turn:
    """A request placed on a sequence, before its reply: what it asks the engine for."""

    sequence: _Sequence
    prompt: list[int]
    """The exact prompt token ids: the sequence's tokens + the new messages' rendering, or a fresh rendering."""
    kept: int
    """Leading prompt tokens that are the sequence's own (0 for a new sequence)."""
    history: list[str]
    messages: list[dict[str, Any]]
    new: bool


class EpisodeLog:
    """Every request of one episode (one client key), as training sequences; see the module docstring."""

    def __init__(self, renderer: Renderer, keep_all: bool = True) -> None:
        self.renderer = renderer
        self.keep_all = keep_all
        """False (`tiderl serve`): only the latest sequence is kept, for the next turn to continue."""
        self.sequences: list[_Sequence] = []
        self.last: _Sequence | None = None
        self.requests = 0
        """Replies recorded."""
        self.submitted = 0
        """Requests sent to the engine (each its own sampling stream)."""
        self.last_text = ""
        self.tool_calls = 0
        self.truncation: str | None = None

    def chat_turn(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> Turn:
        """Place a chat request (normalized messages) on the sequence it extends, or on a new one."""
        tools_key = json.dumps(tools or None, sort_keys=True)
        history = [canonical(m) for m in messages]
        for seq in self._extendable("chat", tools_key):
            n = len(seq.history)
            if len(history) >= n and history[:n] == seq.history:
                closing = [] if seq.ended_turn else [self.renderer.eos_token_id]  # a cut reply gets its end of turn
                prompt = seq.ids + closing + self.renderer.observation_ids(messages[n:])
                return self._claim(Turn(seq, prompt, len(seq.ids), history, messages, new=False))
        prompt = self.renderer.prompt_ids(messages, tools)
        seq = _Sequence(len(self.sequences), "chat", tools_key)
        return self._claim(Turn(seq, prompt, 0, history, messages, new=True))

    def text_turn(self, prompt: str | list[int]) -> Turn:
        """Place a completions request (text, or token ids) on the sequence it extends, or on a new one."""
        if isinstance(prompt, list):
            for seq in self._extendable("text", ""):
                if not seq.ended_turn and prompt[: len(seq.ids)] == seq.ids:
                    return self._claim(Turn(seq, list(prompt), len(seq.ids), [], [], new=False))
            return self._claim(Turn(_Sequence(len(self.sequences), "text", ""), list(prompt), 0, [], [], new=True))
        for seq in self._extendable("text", ""):
            so_far = seq.history[0] if seq.history else None
            if so_far is not None and not seq.ended_turn and prompt.startswith(so_far):
                ids = seq.ids + self.renderer.encode(prompt[len(so_far) :])
                return self._claim(Turn(seq, ids, len(seq.ids), [prompt], [], new=False))
        ids = self.renderer.encode(prompt)
        return self._claim(Turn(_Sequence(len(self.sequences), "text", ""), ids, 0, [prompt], [], new=True))

    def _extendable(self, kind: str, tools_key: str) -> list[_Sequence]:
        """Sequences a request of `kind` may continue, longest first (the deepest shared state wins)."""
        live = [s for s in self.sequences if s.kind == kind and s.tools == tools_key and not s.busy]
        return sorted(live, key=lambda s: -len(s.ids))

    def _claim(self, turn: Turn) -> Turn:
        if not turn.prompt:
            raise APIError("the prompt renders to no tokens", param="messages")
        turn.sequence.busy = True
        return turn

    def refuse(self, limit: str) -> None:
        """A request refused at an episode limit (`max_turns`, `max_tokens_per_sample`): the episode is truncated."""
        self.truncation = limit

    def release(self, turn: Turn) -> None:
        """A request that got no reply (refused, timed out): the sequence is as it was before it."""
        turn.sequence.busy = False

    def record(self, turn: Turn, reply: Reply, cut_by: str | None = None) -> None:
        """Commit a reply: the sequence now holds the prompt and the sampled tokens (logprobs on them, mask 1).
        `cut_by` names the limit that cut the reply short (None: it ended its turn)."""
        seq = turn.sequence
        seq.busy = False
        added = len(turn.prompt) - turn.kept
        seq.ids = turn.prompt + reply.token_ids
        seq.logprobs = seq.logprobs[: turn.kept] + [0.0] * added + reply.logprobs
        seq.mask = seq.mask[: turn.kept] + [0.0] * added + [1.0] * len(reply.token_ids)
        start = len(turn.prompt)
        if reply.token_ids:
            seq.segments.append((start, start + len(reply.token_ids), reply.version))
        if turn.new:
            seq.prompt_length = len(turn.prompt)
            self.sequences.append(seq)
            if not self.keep_all:
                self.sequences = [seq]
        seq.ended_turn = bool(reply.token_ids) and reply.token_ids[-1] == self.renderer.eos_token_id
        if seq.kind == "chat":
            seq.messages = turn.messages + [{"role": "assistant", "content": reply.text}]
            seq.history = turn.history + [canonical(reply.message())]
        else:
            seq.history = [turn.history[0] + reply.text] if turn.history else []
        self.last, self.last_text = seq, reply.text
        self.requests += 1
        self.tool_calls += len(reply.tool_calls)
        self.truncation = cut_by  # the episode's end is judged by its last reply

    def trajectory(self, sample: Sample, error: str | None = None) -> Trajectory:
        """The episode's record: the sequence of its last reply as the trajectory's tokens, every other sequence
        in `earlier` (oldest first). Its status: `error` when `error` is given or the agent made no request (then
        nothing trains), `truncated` when the last reply was cut or a request refused at a limit, else `finished`."""
        sample.num_turns, sample.num_tool_calls = self.requests, self.tool_calls
        main = self.last
        if main is None or error is not None:
            sample.error = error or "the agent made no request to the endpoint"
            empty = torch.zeros(0)
            return Trajectory(
                sample=sample,
                token_ids=empty.long(),
                logprobs=empty,
                loss_mask=empty.clone(),
                policy_version=0,
                status=TrajectoryStatus.ERROR,
            )
        status = TrajectoryStatus.TRUNCATED if self.truncation else TrajectoryStatus.FINISHED
        sample.messages = main.messages
        sample.response_text = self.last_text
        sample.prompt_length = main.prompt_length
        sample.segments = list(main.segments)
        sample.context_rewrites = len(self.sequences) - 1
        sample.truncation = self.truncation
        earlier = [
            TokenSequence(
                torch.tensor(s.ids, dtype=torch.long),
                torch.tensor(s.logprobs, dtype=torch.float32),
                torch.tensor(s.mask, dtype=torch.float32),
                list(s.segments),
            )
            for s in self.sequences
            if s is not main
        ]
        versions = [v for s in self.sequences for *_, v in s.segments]
        return Trajectory(
            sample=sample,
            token_ids=torch.tensor(main.ids, dtype=torch.long),
            logprobs=torch.tensor(main.logprobs, dtype=torch.float32),
            loss_mask=torch.tensor(main.mask, dtype=torch.float32),
            policy_version=min(versions, default=0),
            status=status,
            earlier=earlier,
        )
