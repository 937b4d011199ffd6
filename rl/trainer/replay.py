"""The learner's side of the two replays, so that its logprob is of the distribution and the network the rollout
sampled from.

- **Sampling-mask replay** (`token_logprobs` with `kept`): with top-k / top-p the rollout draws from the tokens it
  keeps, renormalized, and records that logprob (`rollouts.sampling.sample_kept`). The learner renormalizes its own
  logits over the same kept ids. The kept set is the rollout's (its distribution defines it), recorded as ids: a
  set rebuilt from the learner's logits (the same top-k / top-p on them, or the rollout's kept-set size) differs
  wherever the two orders differ near the cut, and can leave out the sampled token itself. With the same weights
  the two logprobs are then equal to float rounding; scoring the full distribution instead is off by the log of
  the kept mass, a bias in every ratio (TRL#6789; DeepSeek V3.2's "keep sampling mask").
- **Routing replay** (`RoutingReplay`, R3, arXiv 2510.11370): a forward hook on every MoE router. `record` compares
  the router's own top-k with the rollout's per (token, layer) (`routing_agreement`); `replay` also hands the
  experts the rollout's choice, weighted by the learner router's own scores at those experts (sigmoid of its
  logits, normalized and scaled as the router does), so the router still gets its gradient, as the paper does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from rewards.records import ScoredTrajectory
from rollouts.routing import moe_blocks

if TYPE_CHECKING:
    from rl.trainer.batch import TrainBatch

NOT_RECORDED = -1
"""A routing or kept-id entry the rollout did not record: the learner's own routing, the full distribution."""


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, kept: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprob of each target [...], entropy of the distribution it was drawn from [...]) from `logits` [..., V]
    at `temperature`; with `kept` ([..., k] token ids, -1 padding) renormalized over the kept ids of each position
    that has any (the rollout's truncation), the full distribution elsewhere."""
    scaled = logits.float() / temperature
    if kept is not None:
        vocab = scaled.shape[-1]
        has = kept[..., 0] >= 0
        ids = torch.where(kept >= 0, kept.long(), vocab)  # padding scatters into a spare column, dropped after
        keep = torch.zeros(*scaled.shape[:-1], vocab + 1, dtype=torch.bool, device=scaled.device)
        keep = keep.scatter(-1, ids, True)[..., :vocab] | ~has[..., None]
        scaled = scaled.masked_fill(~keep, float("-inf"))
    logp_all = torch.log_softmax(scaled, dim=-1)
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    plogp = logp_all.exp() * logp_all
    if kept is not None:
        plogp = plogp.masked_fill(~keep, 0.0)  # 0 * -inf: tokens outside the kept set add no entropy
    return logp, -plogp.sum(-1)


class RoutingReplay:
    """Forward hooks on the learner's MoE routers: measure (`record`) or replay (`replay`) the rollout's routing.

    A forward wrapped by `wrap` takes `routing=` ([batch, seq, layers, top_k], aligned with its `input_ids`; -1:
    not recorded) and hands each router its layer's slice; forwards without it (probes, PTX examples) route as the
    model does. `take()` returns the (matching, compared) (token, layer) counts since the last call."""

    def __init__(self, model: torch.nn.Module, mode: str) -> None:
        self.mode = mode
        blocks = moe_blocks(model, f"algorithm.routing_replay={mode}")
        self._routing: torch.Tensor | None = None  # [tokens, layers, top_k] of the running forward
        self._matches = self._compared = 0.0
        for layer, block in enumerate(blocks):
            block.gate.register_forward_hook(functools.partial(self._hook, layer))

    @staticmethod
    def of(model: torch.nn.Module, mode: str) -> RoutingReplay | None:
        """The hooks for `algorithm.routing_replay` = `mode` (None when off)."""
        return RoutingReplay(model, mode) if mode != "off" else None

    def wrap(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        """`forward` taking `routing=` as well as the model's own arguments."""

        def call(routing: torch.Tensor | None = None, **kwargs: Any) -> Any:
            self._routing = routing.reshape(-1, *routing.shape[-2:]) if routing is not None else None
            try:
                return forward(**kwargs)
            finally:
                self._routing = None

        return call

    def take(self) -> tuple[float, float]:
        """(token-layer pairs whose router's own top-k set equals the rollout's, pairs compared) since the last take."""
        out, self._matches, self._compared = (self._matches, self._compared), 0.0, 0.0
        return out

    def _hook(self, layer: int, gate: torch.nn.Module, inputs: tuple, output: tuple) -> tuple | None:
        if self._routing is None:
            return None
        logits, _, own = output  # [tokens, experts] fp32, [tokens, top_k] weights, [tokens, top_k] experts
        rollout = self._routing[:, layer].long()
        if rollout.shape != own.shape:
            raise ValueError(
                f"routing replay: layer {layer}'s router saw {tuple(own.shape)} (tokens, top_k), the batch's routing "
                f"holds {tuple(rollout.shape)}; the rollout and the learner must run the same model"
            )
        recorded = rollout[:, 0] >= 0
        with torch.no_grad():
            same = (own.sort(-1).values == rollout).all(-1) & recorded
            self._matches += float(same.sum())
            self._compared += float(recorded.sum())
        if self.mode != "replay":
            return None
        chosen = torch.where(recorded[:, None], rollout, own)
        weights = logits.sigmoid().gather(1, chosen)  # the router's own scores at the replayed experts
        if gate.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, weights * gate.routed_scaling_factor, chosen


def agreement(replay: RoutingReplay | None) -> tuple[float, float]:
    """`replay.take()`, or nothing counted without routing replay."""
    return replay.take() if replay is not None else (0.0, 0.0)


def replayed_routing(batch: TrainBatch, replay: RoutingReplay | None) -> torch.Tensor | None:
    """The batch's routing when the learner replays or records it; an error when it replays and the batch has none.

    `record` only measures: a batch without routing (an agent's episodes, served by the OpenAI endpoint, carry none)
    trains as it would with routing replay off and adds nothing to `routing_agreement`."""
    if replay is None:
        return None
    if batch.routing is None and replay.mode == "record":
        return None
    if batch.routing is None:
        raise ValueError(
            f"algorithm.routing_replay={replay.mode}, but the batch carries no rollout routing: its rollouts came from "
            "a backend that does not record it (the rollout engine records it when the job sets routing_replay)"
        )
    return batch.routing


def replay_inputs(
    batch: TrainBatch, routing: torch.Tensor | None, rows: torch.Tensor, width: int, where: torch.Tensor
) -> dict[str, torch.Tensor | None]:
    """`Learner.sequence_logprobs`'s scoring arguments for the micro-batch `rows` trimmed to `width` positions:
    the tokens scored, the rollout's kept ids and its routing (None when not recorded or not replayed)."""
    kept = batch.sampling_mask
    return {
        "where": where,
        "kept": kept[rows, :width] if kept is not None else None,
        "routing": routing[rows, :width] if routing is not None else None,
    }


def routed(routing: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The `routing=` argument of a forward wrapped by `RoutingReplay.wrap`, when there is routing to pass."""
    return {"routing": routing} if routing is not None else {}


def replay_tensors(
    scored: list[ScoredTrajectory], rows: list[int], shape: tuple[int, int]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The batch's (routing [batch, seq, layers, top_k] int16, kept ids [batch, seq, k] int32), -1 where not
    recorded, or None for either when no trajectory carries it. `rows[i]`: the batch row holding trajectory i's
    tokens (its last sequence); `shape`: the batch's (rows, positions)."""
    trajectories = [s.trajectory for s in scored]
    routing = kept = None
    with_routing = [t.routing for t in trajectories if t.routing is not None]
    if with_routing:
        routing = torch.full((*shape, *with_routing[0].shape[1:]), NOT_RECORDED, dtype=torch.int16)
    with_kept = [t.sampling_mask for t in trajectories if t.sampling_mask is not None]
    if with_kept:
        width = max(m.shape[1] for m in with_kept)
        kept = torch.full((*shape, width), NOT_RECORDED, dtype=torch.int32)
    for t, row in zip(trajectories, rows, strict=True):
        if routing is not None and t.routing is not None:
            routing[row, : len(t.routing)] = t.routing.to(torch.int16)
        if kept is not None and t.sampling_mask is not None:
            kept[row, : len(t.sampling_mask), : t.sampling_mask.shape[1]] = t.sampling_mask
    return routing, kept
