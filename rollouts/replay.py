"""What an episode records for the learner to replay: each position's routed experts (routing replay, R3) and each
sampled token's kept set (sampling-mask replay), gathered over the episode's generations.

An episode's tokens reach the engine over several requests (turns, and a paused partial rollout's resumption), each
of which reports the routing of every position of its context and the kept ids of the tokens it sampled. A position
keeps the routing of the *first* request that computed it: the routing its successors in that generation were
sampled under. With prefix reuse the next turn reads those positions from its cache anyway (the same routing); a
re-prefill (no prefix reuse, or a partial rollout resumed under newer weights) computes them again, and that second
routing only shaped tokens sampled after it, so the first one stands (docs/algorithms.md, "Routing replay").

An episode whose context was rewritten (`env.context`) restarts its records with the new context: they describe the
tokens of its current (last) sequence, checked against them, never positions of another sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rollouts.engine import Generation


@dataclass
class ReplayRecord:
    """An episode's routing and kept ids so far, over the tokens `ids` (the records' positions)."""

    ids: list[int] = field(default_factory=list)
    """The tokens the records describe: the context of the latest request and what it sampled."""
    routing: list[torch.Tensor] = field(default_factory=list)
    """Chunks of [positions, moe layers, top_k]: positions 0.. in order, each computed once (the first time)."""
    kept: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    """(position of the first token, [tokens, k] int32 kept ids) per generation."""

    @property
    def routed(self) -> int:
        return sum(len(chunk) for chunk in self.routing)

    def add(self, context: list[int], out: Generation) -> None:
        """Record a generation that continued `context` (the request's prompt: the episode's tokens so far)."""
        if context[: len(self.ids)] != self.ids:  # the context was rewritten: the old positions are another sequence's
            self.ids, self.routing, self.kept = [], [], []
        if out.routing is not None:
            self.routing.append(out.routing[self.routed :])
        if out.kept is not None and len(out.kept):
            self.kept.append((len(context), out.kept))
        self.ids = list(context) + list(out.token_ids)

    def tensors(self, ids: list[int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(routing [positions, layers, top_k] or None, kept ids [len(ids), k] int32 with -1 padding or None) of the
        episode whose tokens are `ids`; rows of tokens that were not sampled keep no ids (-1)."""
        if ids[: len(self.ids)] != self.ids:
            return None, None
        routing = torch.cat(self.routing) if self.routing else None
        mask = None
        if self.kept:
            width = max(int((k >= 0).sum(1).max()) for _, k in self.kept)  # the widest kept set, not the bound
            mask = torch.full((len(ids), max(width, 1)), -1, dtype=torch.int32)
            for start, k in self.kept:
                mask[start : start + len(k)] = k[:, : mask.shape[1]]
        return routing, mask
