"""The record a rollout produces: a `Trajectory` (token-in/token-out: ids, per-token rollout logprobs, loss mask and
the policy version that generated it), how it ended (`TrajectoryStatus`), and its `Sample` (which sample it is, its
conversation and counters: what the agent loop's episode fills in as it runs). Reward scoring wraps each in a
`rewards.records.ScoredTrajectory`; nothing downstream re-tokenizes text.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from envs.base import PromptRow


class TrajectoryStatus(str, enum.Enum):
    """How a trajectory ended."""

    FINISHED = "finished"  # the model ended its turn without a tool call: a final answer
    TRUNCATED = "truncated"  # a token or turn budget ran out before a final answer
    PARTIAL = "partial"  # paused mid-generation, to be resumed in a later iteration
    ERROR = "error"  # the environment or the engine failed on this sample; it is counted and skipped


def completion_messages(
    messages: list[dict[str, Any]], fallback_prompt: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split a conversation into (prompt, completion) at the first assistant turn: what reward functions and
    reward models see as the question and the answer."""
    first = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), len(messages))
    return messages[:first] or list(fallback_prompt), messages[first:]


@dataclass
class Sample:
    """One sample of a prompt apart from its tokens: which it is, its conversation and what happened in it. The agent
    loop's `Episode` fills it in as the sample runs; the `Trajectory` the episode becomes holds the same record."""

    sample_id: str
    """`"{prompt_index}-{k}"` for sample k of a prompt: the id named in logs and errors."""
    group_id: int
    """Samples of the same prompt share a group id; group advantages are computed within it."""
    row: PromptRow
    """The dataset row the episode started from."""
    messages: list[dict[str, Any]] = field(default_factory=list)
    """The whole conversation as chat messages, for logs and for reward functions that want it."""
    response_text: str = ""
    """The final assistant turn, decoded (what answer verifiers read)."""
    prompt_length: int = 0
    """Number of leading prompt tokens."""
    segments: list[tuple[int, int, int]] = field(default_factory=list)
    """(start, end, policy version) of the generated token spans, adjacent spans of one version merged: more than
    one version when a partial rollout was paused and resumed under newer weights."""
    num_turns: int = 0
    """Assistant turns taken."""
    num_tool_calls: int = 0
    """Tool calls parsed and executed (well-formed or not)."""
    num_tool_errors: int = 0
    """Tool calls that were malformed or failed; the model saw an error observation for each."""
    truncation: str | None = None
    """Which limit truncated the sample (`max_new_tokens_per_turn`, `token_budget`, `max_tokens_per_sample`,
    `max_turns`, `max_tool_calls`, `repeat`) when its status is TRUNCATED."""
    error: str | None = None
    """What went wrong when its status is ERROR."""
    env_reward: float | None = None
    """The environment's own score of the episode, if it gave one."""
    env_reward_parts: dict[str, float] = field(default_factory=dict)
    """Named components of `env_reward` (their sum), when an agent function returned a dict (`envs.agent`)."""
    context_rewrites: int = 0
    """Times context management (`env.context`) rewrote the context; the episode has this many + 1 sequences."""


@dataclass
class TokenSequence:
    """One training sequence of an episode whose context was rewritten (`env.context`): the tokens the engine saw
    and sampled up to a rewrite. Each policy token is trained in the one sequence it was sampled in; carried into
    a later context it is context there (mask 0)."""

    token_ids: torch.Tensor  # [num_tokens] int64
    logprobs: torch.Tensor  # [num_tokens] float32, 0 where `loss_mask` is 0
    loss_mask: torch.Tensor  # [num_tokens] float32
    segments: list[tuple[int, int, int]]
    """(start, end, policy version) of this sequence's generated spans (as `Sample.segments`)."""


@dataclass
class Trajectory:
    """One sampled episode: the prompt, every model turn and every tool observation, as token ids, with its `Sample`
    record (whose fields read through: `traj.num_turns` is `traj.sample.num_turns`)."""

    sample: Sample
    """Which sample this is, its conversation and what happened in it."""
    token_ids: torch.Tensor  # [num_tokens] int64
    """Prompt + all assistant turns + tool observations, exactly the tokens the model saw and produced."""
    logprobs: torch.Tensor  # [num_tokens] float32
    """Rollout logprob of each token under the sampling policy; 0 where `loss_mask` is 0."""
    loss_mask: torch.Tensor  # [num_tokens] float32
    """1 on tokens the policy generated, 0 on prompt and tool-output tokens."""
    policy_version: int
    """Oldest version of the weights that generated a policy token of this trajectory (see `segments`)."""
    status: TrajectoryStatus
    """How the episode ended."""
    routing: torch.Tensor | None = None  # [num_routed, num_moe_layers, top_k] uint8 (int16 beyond 256 experts)
    """Routing replay (`algorithm.routing_replay`): the experts each MoE layer routed positions 0..num_routed-1 to in
    the rollout engine, sorted per layer (`rollouts.replay`); the positions after them (the last token, trailing
    tool tokens) were never computed and score no token. None: not recorded."""
    sampling_mask: torch.Tensor | None = None  # [num_tokens, k] int32
    """Sampling-mask replay (`rollout.sampling_mask_replay`): the ids each sampled token's top-k / top-p draw kept,
    -1 padding (all -1 on tokens that were not sampled). None: not recorded."""
    earlier: list[TokenSequence] = field(default_factory=list)
    """The episode's sequences before its last context rewrite, oldest first (empty without `env.context`); the
    fields above are its last sequence. All of them train with the episode's reward and advantage."""
    model_score_refs: dict[str, tuple[Any, int]] = field(default_factory=dict)
    """Reward model name -> (Ray ObjectRef of a batch's scores, this sample's position in it), when the worker
    sent the episode for scoring as soon as its group finished (`reward.models_async`)."""
    model_scores: dict[str, float | None] | None = None
    """Reward model name -> score (None: the model gave no verdict), once fetched; None: not scored by models."""
    model_score_failures: dict[str, str] = field(default_factory=dict)
    """Reward model name -> why it has no score for this sample (it failed on the batch, or the sample was never
    sent to it), once fetched: the scorer counts it as that model's failure and leaves the sample out."""

    @property
    def response_length(self) -> int:
        """Number of policy-generated tokens (of every sequence of the episode)."""
        return int(self.loss_mask.sum().item()) + sum(int(s.loss_mask.sum().item()) for s in self.earlier)

    def sequences(self) -> list[TokenSequence]:
        """The episode's training sequences, oldest first: the earlier ones and the last (this record's tokens)."""
        return [*self.earlier, TokenSequence(self.token_ids, self.logprobs, self.loss_mask, self.segments)]

    # the sample's fields, read through
    @property
    def sample_id(self) -> str:
        return self.sample.sample_id

    @property
    def group_id(self) -> int:
        return self.sample.group_id

    @property
    def row(self) -> PromptRow:
        return self.sample.row

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.sample.messages

    @property
    def response_text(self) -> str:
        return self.sample.response_text

    @property
    def prompt_length(self) -> int:
        return self.sample.prompt_length

    @property
    def segments(self) -> list[tuple[int, int, int]]:
        return self.sample.segments

    @property
    def num_turns(self) -> int:
        return self.sample.num_turns

    @property
    def num_tool_calls(self) -> int:
        return self.sample.num_tool_calls

    @property
    def num_tool_errors(self) -> int:
        return self.sample.num_tool_errors

    @property
    def truncation(self) -> str | None:
        return self.sample.truncation

    @property
    def error(self) -> str | None:
        return self.sample.error

    @property
    def env_reward(self) -> float | None:
        return self.sample.env_reward
