"""On-device sampling and stop detection for the rollout engine (`rollouts/engine.py`).

The engine's batchers call these once per decode step, on the device and without a host round trip:
`sample_kept` draws each row's next token (temperature, top-k, top-p; greedy: argmax), its logprob under the
distribution it was drawn from and, for sampling-mask replay, the ids that distribution keeps; `_LoopDetector`
flags a sequence whose last tokens repeat one short unit, so a looping generation stops early (`repeat`) instead of
burning its whole budget.

Sampling is counter-based (`uniform`): token t of a request uses a hash of (request seed, t), so a sample's
tokens do not depend on which other requests shared its batch, or when it was admitted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    greedy: bool = False
    top_p: float = 1.0
    top_k: int = 0
    record_kept: int = 0
    """Record the ids each draw keeps, at most this many per token (0 = off): sampling-mask replay's record."""

    def __post_init__(self) -> None:
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.record_kept < 0:
            raise ValueError(
                f"sampling needs temperature > 0, 0 < top_p <= 1, top_k >= 0, record_kept >= 0; got {self}"
            )


# splitmix64 constants as signed int64 (torch integer arithmetic wraps around)
_GAMMA = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def uniform(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One float64 in (0, 1) per row: splitmix64 of (seed, counter). Hand-written because torch's generators
    draw one stream per generator; a counter-based draw makes each request's stream its own, batch or not."""
    z = seeds * _GAMMA + (counters + 1) * _MIX2
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return (_shr(z, 11).double() + 0.5) * 2.0**-53


def _sample(
    logits: torch.Tensor, sampling: SamplingParams, seeds: torch.Tensor, counters: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token per row and its logprob (`sample_kept` without the kept sets)."""
    tok, logp, _ = sample_kept(logits, sampling, seeds, counters)
    return tok, logp


def truncates(sampling: SamplingParams) -> bool:
    """Whether top-k / top-p restrict the draw (greedy draws no sample: nothing to replay)."""
    return not sampling.greedy and (sampling.top_p < 1.0 or sampling.top_k > 0)


def sample_kept(
    logits: torch.Tensor, sampling: SamplingParams, seeds: torch.Tensor, counters: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Next token per row, its logprob under the distribution it was drawn from, and with `sampling.record_kept`
    the ids of the tokens that distribution keeps ([rows, record_kept] int32, -1 padding; None otherwise).

    The logprob is of logits / temperature; with top-k / top-p, renormalized over the tokens they keep (vLLM's
    `processed_logprobs`): the behaviour policy's, which importance ratios need. The learner rebuilds the same
    distribution from the kept ids (sampling-mask replay, `rl.trainer.sampling_mask`); it recomputes the full
    one when none are recorded, which differs from this logprob by the kept mass's log."""
    scaled = logits.float() / sampling.temperature
    if sampling.greedy:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(scaled, dim=-1).gather(-1, tok[:, None])[:, 0], None
    allowed = scaled
    if sampling.top_k and sampling.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, sampling.top_k, dim=-1).values[:, -1:]
        allowed = allowed.masked_fill(allowed < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(allowed, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        drop = probs.cumsum(-1) - probs >= sampling.top_p  # the mass before a token already reaches top_p
        allowed = allowed.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    cdf = torch.softmax(allowed, dim=-1).double().cumsum(-1)
    u = uniform(seeds, counters)[:, None] * cdf[:, -1:]
    tok = torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=scaled.shape[-1] - 1)
    logp = torch.log_softmax(allowed, dim=-1)
    ids, kept = None, sampling.record_kept
    if kept:
        # the kept tokens are the leading ones of the order by logit (top-k and top-p keep a prefix of it); a row
        # keeps at most `kept` (the sampler's top-k bound when mask replay is on, so this loses nothing)
        values, ids = torch.topk(allowed, min(kept, scaled.shape[-1]), dim=-1)
        ids = ids.to(torch.int32).masked_fill(values == float("-inf"), -1)
    return tok, logp.gather(-1, tok[:, None])[:, 0], ids


class _LoopDetector:
    """Per slot and period p <= `max_period`, how many of its latest tokens each equal the token p places before
    it; a slot loops once that run reaches `window` for some p (one unit of p tokens repeated over the last
    window + p tokens).

    Kept as run lengths, so a step compares each new token with `max_period` earlier ones instead of rescanning
    the window for every period. Positions before a slot's history hold distinct negative ids, so a short history
    never looks periodic.
    """

    def __init__(self, window: int, max_period: int, slots: int, device: torch.device) -> None:
        self.window, self.max_period = window, max_period
        self.recent = -torch.arange(1, max_period + 1, device=device).repeat(
            slots, 1
        )  # [slots, max_period], oldest first
        self.runs = torch.zeros(
            slots, max_period, dtype=torch.long, device=device
        )  # [slots, max_period]: run at period p = index + 1
        self.periods = torch.arange(1, max_period + 1, device=device)
        self.back = max_period - self.periods  # where in `recent` the token p places back sits

    def reset(self, rows: torch.Tensor, prefixes: list[list[int]]) -> None:
        """Start slots `rows` afresh, each with the tokens its turn already produced."""
        size = self.window + self.max_period  # enough history to tell a run of `window` at every period
        fresh = -torch.arange(1, size + 1, device=self.recent.device).repeat(len(prefixes), 1)
        for i, prefix in enumerate(prefixes):
            kept = prefix[-size:]
            if kept:
                fresh[i, size - len(kept) :] = torch.tensor(kept, device=fresh.device)
        later = torch.arange(self.max_period, size, device=fresh.device)  # the last `window` positions
        same = (
            fresh[:, later.expand(self.max_period, -1)] == fresh[:, later - self.periods[:, None]]
        )  # [rows, max_period, window]
        self.runs[rows] = same.flip(-1).long().cumprod(-1).sum(-1)  # trailing matches, capped at the window
        self.recent[rows] = fresh[:, -self.max_period :]

    def push(self, rows: slice | torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        """Append each row's new token; [rows] bool: the row is now looping."""
        recent = self.recent[rows]
        runs = (self.runs[rows] + 1) * (recent[:, self.back] == tok[:, None])
        self.runs[rows] = runs
        self.recent[rows] = torch.cat([recent[:, 1:], tok[:, None]], dim=1)
        return (runs >= self.window).any(-1)
