"""Batched sampling with a KV cache on a Hugging Face causal LM.

Prompts are left-padded into one batch, prefilled once, then decoded one token per forward pass with the cache;
finished rows keep riding along masked out. Every sampled token's logprob under the sampling distribution
(logits / temperature) is recorded: the rollout logprobs the learner compares against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class Generation:
    token_ids: list[int]
    """Sampled ids, including the stop token when `finished`."""
    logprobs: list[float]
    """Logprob of each sampled id under logits / temperature."""
    finished: bool
    """Ended with the stop token (False: the token budget ran out)."""


class Engine:
    def __init__(self, model: torch.nn.Module, pad_token_id: int, stop_token_id: int) -> None:
        self.model = model.eval()
        self.pad_token_id = pad_token_id
        self.stop_token_id = stop_token_id

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: list[int],
        temperature: float,
        greedy: bool,
        generator: torch.Generator | None = None,
    ) -> list[Generation]:
        """Sample a continuation of each prompt; `max_new_tokens[i]` caps row i."""
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
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
        next_pos = positions[:, -1] + 1  # [batch]
        done = budget <= 0  # [batch]
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
            done = done | (tok == self.stop_token_id) | (budget <= t + 1)
            if bool(done.all()):
                break
            attention = torch.cat([attention, (~was_done).long()[:, None]], dim=-1)
            out = self.model(input_ids=tok[:, None], attention_mask=attention, position_ids=next_pos[:, None], past_key_values=cache, use_cache=True)
            next_pos = next_pos + 1
        ids = torch.stack(tokens, 1).cpu() if tokens else torch.zeros((batch, 0), dtype=torch.long)
        lps = torch.stack(logps, 1).cpu() if logps else torch.zeros((batch, 0))
        results = []
        for i in range(batch):
            n = min(int(budget[i]), ids.shape[1])
            row = ids[i, :n].tolist()
            if self.stop_token_id in row:
                n = row.index(self.stop_token_id) + 1
            results.append(Generation(row[:n], lps[i, :n].tolist(), finished=self.stop_token_id in row[:n]))
        return results
