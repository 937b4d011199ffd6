"""Batched sampling with a KV cache on a Hugging Face causal LM.

Prompts are left-padded into one batch, prefilled once, then decoded one token per forward pass with the cache;
finished rows keep riding along masked out. Every sampled token's logprob under the sampling distribution
(logits / temperature) is recorded: the rollout logprobs the learner compares against.

A row stops at the stop token (`stop`), at its token budget (`length`), or when the loop detector sees one unit of
at most `repeat_max_period` tokens repeated over its last `repeat_window` (+ the unit's length) tokens (`repeat`: a
looping generation that would otherwise burn the whole budget). The detector runs on the device, in the same step as the stop check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import DynamicCache

StopReason = Literal["stop", "length", "repeat"]


@dataclass
class Generation:
    token_ids: list[int]
    """Sampled ids, including the stop token when `finished`."""
    logprobs: list[float]
    """Logprob of each sampled id under logits / temperature."""
    stop_reason: StopReason = "stop"

    @property
    def finished(self) -> bool:
        """Ended with the stop token."""
        return self.stop_reason == "stop"


class Engine:
    def __init__(self, model: torch.nn.Module, pad_token_id: int, stop_token_id: int, repeat_window: int = 0, repeat_max_period: int = 16) -> None:
        self.model = model.eval()
        self.pad_token_id = pad_token_id
        self.stop_token_id = stop_token_id
        self.repeat_window = repeat_window
        self.repeat_max_period = repeat_max_period

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: list[int],
        temperature: float,
        greedy: bool,
        generator: torch.Generator | None = None,
        turn_prefixes: list[list[int]] | None = None,
    ) -> list[Generation]:
        """Sample a continuation of each prompt; `max_new_tokens[i]` caps row i.

        `turn_prefixes[i]`: tokens row i already generated in this turn (the tail of its prompt, when a paused
        rollout resumes), so the loop detector sees the same history as in an uninterrupted generation.
        """
        batch, width = len(prompts), max(len(p) for p in prompts)
        device = self.model.device
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((batch, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention[i, width - len(p) :] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        budget = torch.tensor(max_new_tokens, dtype=torch.long, device=device)
        loops = _LoopDetector(self.repeat_window, self.repeat_max_period, turn_prefixes or [[] for _ in prompts], device) if self.repeat_window else None
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
        next_pos = positions[:, -1] + 1  # [batch]
        done = budget <= 0  # [batch]
        looping = torch.zeros_like(done)
        lengths = torch.zeros_like(budget)  # tokens each row generated before it was done
        tokens: list[torch.Tensor] = []
        logps: list[torch.Tensor] = []
        for t in range(int(budget.max().item())):
            logp = torch.log_softmax(out.logits[:, -1].float() / temperature, dim=-1)  # [batch, vocab]
            if greedy:
                tok = logp.argmax(-1)
            else:
                tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
            tok = torch.where(done, self.pad_token_id, tok)
            tokens.append(tok)
            logps.append(logp.gather(-1, tok[:, None]).squeeze(-1))
            was_done = done
            lengths = lengths + (~was_done).long()
            if loops is not None:
                looping = looping | (~was_done & loops.push(tok))
            done = done | (tok == self.stop_token_id) | (budget <= t + 1) | looping
            if bool(done.all()):
                break
            attention = torch.cat([attention, (~was_done).long()[:, None]], dim=-1)
            out = self.model(input_ids=tok[:, None], attention_mask=attention, position_ids=next_pos[:, None], past_key_values=cache, use_cache=True)
            next_pos = next_pos + 1
        ids = torch.stack(tokens, 1).cpu() if tokens else torch.zeros((batch, 0), dtype=torch.long)
        lps = torch.stack(logps, 1).cpu() if logps else torch.zeros((batch, 0))
        looped, lengths_list = looping.cpu().tolist(), lengths.cpu().tolist()
        results = []
        for i in range(batch):
            n = lengths_list[i]
            row = ids[i, :n].tolist()
            reason: StopReason = "length"
            if n and row[-1] == self.stop_token_id:
                reason = "stop"
            elif looped[i]:
                reason = "repeat"
            results.append(Generation(row, lps[i, :n].tolist(), stop_reason=reason))
        return results


class _LoopDetector:
    """Per row, the recent tokens; a row loops when each of its last `window` tokens equals the token p places
    before it, for some period p <= `max_period` (one unit of p tokens repeated over the last window + p tokens).

    All periods are checked in one gather. Slots not yet filled hold distinct negative ids, so a short history
    never looks periodic.
    """

    def __init__(self, window: int, max_period: int, prefixes: list[list[int]], device: torch.device) -> None:
        size = window + max_period
        self.tail = -torch.arange(1, size + 1, device=device).repeat(len(prefixes), 1)  # [batch, window + max_period]
        for i, prefix in enumerate(prefixes):
            kept = prefix[-size:]
            if kept:
                self.tail[i, size - len(kept) :] = torch.tensor(kept, device=device)
        later = torch.arange(max_period, size, device=device)  # the last `window` positions
        periods = torch.arange(1, max_period + 1, device=device)[:, None]
        self.later, self.earlier = later.expand(max_period, -1), later - periods  # [max_period, window]

    def push(self, tok: torch.Tensor) -> torch.Tensor:
        """Append each row's new token; [batch] bool: the row is now looping."""
        self.tail = torch.cat([self.tail[:, 1:], tok[:, None]], dim=1)
        same = self.tail[:, self.later] == self.tail[:, self.earlier]  # [batch, max_period, window]
        return same.all(-1).any(-1)
