"""Typed records that cross stage boundaries: Trajectory -> ScoredTrajectory -> TrainBatch.

Rollout workers produce `Trajectory` (token-in/token-out: ids, per-token rollout logprobs, loss mask and the
policy version that generated it), reward scoring wraps each in a `ScoredTrajectory`, and the controller packs
a step's worth into one padded `TrainBatch` for the learner. Nothing downstream re-tokenizes text.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

import torch


class TrajectoryStatus(str, enum.Enum):
    """How a trajectory ended."""

    FINISHED = "finished"  # the model ended its turn without a tool call: a final answer
    TRUNCATED = "truncated"  # a token or turn budget ran out before a final answer
    PARTIAL = "partial"  # paused mid-generation, to be resumed in a later iteration
    ERROR = "error"  # the environment or the engine failed on this sample; it is counted and skipped


def completion_messages(messages: list[dict[str, Any]], fallback_prompt: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split a conversation into (prompt, completion) at the first assistant turn: what reward functions and
    reward models see as the question and the answer."""
    first = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), len(messages))
    return messages[:first] or list(fallback_prompt), messages[first:]


@dataclass
class PromptRow:
    """One prompt in verl's parquet layout, as the environment and the reward functions see it."""

    index: int
    """Position of the row in its dataset; with `data_source` it identifies the prompt in logs."""
    messages: list[dict[str, Any]]
    """Opening chat messages (`[{"role": ..., "content": ...}]`)."""
    data_source: str
    """Which task the row comes from; reward functions may dispatch on it (verl convention)."""
    ground_truth: Any
    """`reward_model.ground_truth`: what the verifier checks the answer against."""
    extra_info: dict[str, Any] = field(default_factory=dict)
    """Free-form per-row data passed through to environments and reward functions."""


@dataclass
class Trajectory:
    """One sampled episode: the prompt, every model turn and every tool observation, as token ids."""

    sample_id: str
    """`"{prompt_index}-{k}"` for sample k of a prompt: the id named in logs and errors."""
    group_id: int
    """Samples of the same prompt share a group id; group advantages are computed within it."""
    row: PromptRow
    """The dataset row the episode started from."""
    token_ids: torch.Tensor  # [num_tokens] int64
    """Prompt + all assistant turns + tool observations, exactly the tokens the model saw and produced."""
    logprobs: torch.Tensor  # [num_tokens] float32
    """Rollout logprob of each token under the sampling policy; 0 where `loss_mask` is 0."""
    loss_mask: torch.Tensor  # [num_tokens] float32
    """1 on tokens the policy generated, 0 on prompt and tool-output tokens."""
    prompt_length: int
    """Number of leading prompt tokens."""
    policy_version: int
    """Oldest version of the weights that generated a policy token of this trajectory (see `segments`)."""
    status: TrajectoryStatus
    """How the episode ended."""
    response_text: str
    """The final assistant turn, decoded (what answer verifiers read)."""
    messages: list[dict[str, Any]]
    """The whole conversation as chat messages, for logs and for reward functions that want it."""
    num_turns: int
    """Assistant turns taken."""
    num_tool_calls: int
    """Tool calls parsed and executed (well-formed or not)."""
    num_tool_errors: int = 0
    """Tool calls that were malformed or failed; the model saw an error observation for each."""
    error: str | None = None
    """What went wrong when `status` is ERROR."""
    segments: list[tuple[int, int, int]] = field(default_factory=list)
    """(start, end, policy version) of the generated token spans: more than one version when a partial rollout
    was paused and resumed under newer weights."""
    truncation: str | None = None
    """Which limit truncated the sample (`max_new_tokens_per_turn`, `token_budget`, `max_tokens_per_sample`,
    `max_turns`, `max_tool_calls`, `repeat`) when `status` is TRUNCATED."""
    env_reward: float | None = None
    """The environment's own score of the episode, if it gave one."""
    model_score_refs: dict[str, tuple[Any, int]] = field(default_factory=dict)
    """Reward model name -> (Ray ObjectRef of a batch's scores, this sample's position in it), when the worker
    sent the episode for scoring as soon as its group finished (`reward.models_async`)."""
    model_scores: dict[str, float | None] | None = None
    """Reward model name -> score (None: the model gave no verdict), once fetched; None: not scored by models."""

    @property
    def response_length(self) -> int:
        """Number of policy-generated tokens."""
        return int(self.loss_mask.sum().item())


@dataclass
class ScoredTrajectory:
    """A trajectory with its reward."""

    trajectory: Trajectory
    reward: float
    """Weighted sum of the reward functions' scores: what advantages are computed from."""
    reward_breakdown: dict[str, float]
    """Each reward function's own score, by name, for metrics and saved trajectories."""
    correct: bool
    """Whether the task's verifier judged the answer correct (what `accuracy` averages)."""


@dataclass
class TrainBatch:
    """A step's trajectories, right-padded into tensors, with their advantages: what the learner consumes."""

    input_ids: torch.Tensor  # [batch, seq] int64
    attention_mask: torch.Tensor  # [batch, seq] int64, 1 on real tokens
    loss_mask: torch.Tensor  # [batch, seq] float32, 1 on policy tokens
    rollout_logprobs: torch.Tensor  # [batch, seq] float32, 0 off the loss mask
    advantages: torch.Tensor  # [batch, seq] float32, each sequence's advantage on its policy tokens
    policy_versions: torch.Tensor  # [batch] int64
    temperature: float | None = None
    """The sampling temperature the batch was generated at (the learner scores at it); None: `rollout.temperature`."""

    @property
    def num_sequences(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> TrainBatch:
        """The batch with its tensors on `device` (itself when already there)."""
        if self.input_ids.device == torch.device(device):
            return self
        return self._map_tensors(lambda t: t.to(device))

    def select(self, rows: slice | torch.Tensor) -> TrainBatch:
        """The sequences `rows` (a range, or row indices in any order) as a batch of their own."""
        return self._map_tensors(lambda t: t[rows])

    def _map_tensors(self, fn) -> TrainBatch:
        tensors = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **{name: fn(t) for name, t in tensors.items()})

    def shard(self, n: int) -> list[TrainBatch]:
        """`n` contiguous shards with about equal numbers of real tokens (data-parallel learners); a shard may be
        empty when there are fewer sequences than shards."""
        before = [0.0] + self.attention_mask.sum(1).to(torch.float64).cumsum(0).tolist()  # tokens before sequence i
        total = before[-1]
        # shard k ends at the sequence boundary nearest to k/n of the tokens
        cuts = [0] + [min(range(len(before)), key=lambda i, t=total * k / n: abs(before[i] - t)) for k in range(1, n)] + [self.num_sequences]
        for k in range(1, len(cuts)):
            cuts[k] = max(cuts[k], cuts[k - 1])
        return [self.select(slice(cuts[k], cuts[k + 1])) for k in range(n)]

    @staticmethod
    def from_scored(scored: list[ScoredTrajectory], advantages: torch.Tensor, pad_token_id: int, temperature: float | None = None) -> TrainBatch:
        """Right-pad the trajectories; `advantages` is one scalar per trajectory ([batch])."""
        if not scored:
            raise ValueError("cannot build a TrainBatch from zero trajectories")
        lengths = [len(s.trajectory.token_ids) for s in scored]
        batch, seq = len(scored), max(lengths)
        input_ids = torch.full((batch, seq), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, seq), dtype=torch.long)
        loss_mask = torch.zeros((batch, seq), dtype=torch.float32)
        logprobs = torch.zeros((batch, seq), dtype=torch.float32)
        for i, s in enumerate(scored):
            t, n = s.trajectory, lengths[i]
            input_ids[i, :n] = t.token_ids
            attention_mask[i, :n] = 1
            loss_mask[i, :n] = t.loss_mask
            logprobs[i, :n] = t.logprobs
        versions = torch.tensor([s.trajectory.policy_version for s in scored], dtype=torch.long)
        return TrainBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            loss_mask=loss_mask,
            rollout_logprobs=logprobs,
            advantages=advantages.to(torch.float32)[:, None] * loss_mask,
            policy_versions=versions,
            temperature=temperature,
        )
