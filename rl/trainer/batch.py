"""What the learner consumes: a step's scored trajectories right-padded into tensors, with their advantages.

A row is one training sequence. An episode whose context was rewritten (`env.context`) has several
(`Trajectory.sequences()`): each is a row of its own, and every row of an episode gets the episode's advantage
(`episode` maps rows back to trajectories)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from rewards.records import ScoredTrajectory
from rl.trainer.replay import replay_tensors


@dataclass
class TrainBatch:
    """A step's trajectories, right-padded into tensors, with their advantages: what the learner consumes."""

    input_ids: torch.Tensor  # [batch, seq] int64
    attention_mask: torch.Tensor  # [batch, seq] int64, 1 on real tokens
    loss_mask: torch.Tensor  # [batch, seq] float32, 1 on policy tokens
    rollout_logprobs: torch.Tensor  # [batch, seq] float32, 0 off the loss mask
    advantages: torch.Tensor  # [batch, seq] float32, each sequence's advantage on its policy tokens
    policy_versions: torch.Tensor  # [batch] int64
    episode: torch.Tensor | None = None  # [batch] int64
    """Index of the scored trajectory each row is a sequence of (None: one row per trajectory, in order)."""
    temperature: float | None = None
    """The sampling temperature the batch was generated at (the learner scores at it); None: `rollout.temperature`."""
    trace: torch.Tensor | None = None  # [batch] int64
    """Sequences whose per-token learner values the update records (`rl.trainer.trace`): a sequence's index among
    the samples the run keeps, -1 for the others; None: none recorded."""
    sampling_mask: torch.Tensor | None = None  # [batch, seq, k] int32
    """Sampling-mask replay: the ids each sampled token's draw kept, -1 padding and off sampled tokens (the learner
    renormalizes over them: `rl.trainer.replay`); None: not recorded."""
    routing: torch.Tensor | None = None  # [batch, seq, moe layers, top_k] int16
    """Routing replay: the rollout's experts per position and MoE layer, -1 where it computed none; None: not
    recorded."""

    @property
    def num_sequences(self) -> int:
        return int(self.input_ids.shape[0])

    def rows_of(self, num_episodes: int) -> torch.Tensor:
        """[batch] the trajectory each row is a sequence of (the identity when there is one row each)."""
        return self.episode if self.episode is not None else torch.arange(num_episodes)

    def per_episode(self, values: torch.Tensor, num_episodes: int) -> torch.Tensor:
        """Per-row values ([batch]) summed over each trajectory's sequences ([num_episodes])."""
        if self.episode is None:
            return values
        return torch.zeros(num_episodes, dtype=values.dtype).index_add_(0, self.episode, values.cpu())

    def last_rows(self, num_episodes: int) -> torch.Tensor:
        """[num_episodes] the row of each trajectory's last sequence (its own tokens)."""
        rows = self.rows_of(num_episodes)
        return torch.zeros(num_episodes, dtype=torch.long).scatter_reduce(0, rows, torch.arange(len(rows)), "amax")

    def to(self, device: torch.device | str) -> TrainBatch:
        """The batch with its tensors on `device` (itself when already there)."""
        if self.input_ids.device == torch.device(device):
            return self
        return self._map_tensors(lambda t: t.to(device))

    def select(self, rows: slice | torch.Tensor) -> TrainBatch:
        """The sequences `rows` (a range, or row indices in any order) as a batch of their own."""
        return self._map_tensors(lambda t: t[rows])

    def _map_tensors(self, fn) -> TrainBatch:
        tensors = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **{name: fn(t) for name, t in tensors.items()})

    def shard(self, n: int) -> list[TrainBatch]:
        """`n` contiguous shards with about equal numbers of real tokens (data-parallel learners); a shard may be
        empty when there are fewer sequences than shards."""
        before = [0.0] + self.attention_mask.sum(1).to(torch.float64).cumsum(0).tolist()  # tokens before sequence i
        total = before[-1]
        # shard k ends at the sequence boundary nearest to k/n of the tokens
        cuts = (
            [0]
            + [min(range(len(before)), key=lambda i, t=total * k / n: abs(before[i] - t)) for k in range(1, n)]
            + [self.num_sequences]
        )
        for k in range(1, len(cuts)):
            cuts[k] = max(cuts[k], cuts[k - 1])
        return [self.select(slice(cuts[k], cuts[k + 1])) for k in range(n)]

    @staticmethod
    def from_scored(
        scored: list[ScoredTrajectory], advantages: torch.Tensor, pad_token_id: int, temperature: float | None = None
    ) -> TrainBatch:
        """Right-pad the trajectories' sequences; `advantages` is one scalar per trajectory ([len(scored)]), given
        to every sequence of it."""
        if not scored:
            raise ValueError("cannot build a TrainBatch from zero trajectories")
        rows = [(i, sequence) for i, s in enumerate(scored) for sequence in s.trajectory.sequences()]
        lengths = [len(sequence.token_ids) for _, sequence in rows]
        batch, seq = len(rows), max(lengths)
        input_ids = torch.full((batch, seq), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, seq), dtype=torch.long)
        loss_mask = torch.zeros((batch, seq), dtype=torch.float32)
        logprobs = torch.zeros((batch, seq), dtype=torch.float32)
        for row, (_, t) in enumerate(rows):
            n = lengths[row]
            input_ids[row, :n] = t.token_ids
            attention_mask[row, :n] = 1
            loss_mask[row, :n] = t.loss_mask
            logprobs[row, :n] = t.logprobs
        episode = torch.tensor([i for i, _ in rows], dtype=torch.long)
        versions = torch.tensor(
            [min((v for *_, v in t.segments), default=scored[i].trajectory.policy_version) for i, t in rows],
            dtype=torch.long,
        )
        out = TrainBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            loss_mask=loss_mask,
            rollout_logprobs=logprobs,
            advantages=advantages.to(torch.float32)[episode][:, None] * loss_mask,
            policy_versions=versions,
            episode=episode if batch != len(scored) else None,
            temperature=temperature,
        )
        episodes = getattr(out, "episode", None)  # the row -> trajectory map, when trajectories span several rows
        last = {i: row for row, i in enumerate(episodes.tolist())} if episodes is not None else {}
        own = [last.get(i, i) for i in range(len(scored))]  # each trajectory's own tokens: its last sequence's row
        out.routing, out.sampling_mask = replay_tensors(scored, own, (input_ids.shape[0], input_ids.shape[1]))
        return out
