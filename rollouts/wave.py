"""The `Batcher` API for models the slot decoder (`rollouts/decoder.py`) does not cover: their own HF forward, in
waves (every waiting request at once, to the end); same sampling, no continuous batching."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from rollouts.requests import _Item, _Queue
from rollouts.sampling import SamplingParams, _LoopDetector, sample_kept

if TYPE_CHECKING:
    from rollouts.engine import Engine


class WaveBatcher(_Queue):
    """The `Batcher` API for models the slot decoder does not cover: each `step()` runs every waiting request to
    its end through the model's own HF forward (left-padded batch, `DynamicCache`), sampling as `Batcher` does."""

    def __init__(self, engine: Engine, sampling: SamplingParams) -> None:
        self.engine, self.sampling = engine, sampling
        self.waiting: list[_Item] = []

    @property
    def busy(self) -> bool:
        return bool(self.waiting)

    @torch.inference_mode()
    def step(self) -> None:
        wave, self.waiting = self.waiting, []
        if not wave:
            return
        engine, model = self.engine, self.engine.model
        requests = [r for r, _ in wave]
        batch, width = len(requests), max(len(r.prompt) for r in requests)
        device = model.device
        input_ids = torch.full((batch, width), engine.pad_token_id, dtype=torch.long)
        attention = torch.zeros((batch, width), dtype=torch.long)
        for i, r in enumerate(requests):
            input_ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt, dtype=torch.long)
            attention[i, width - len(r.prompt) :] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        budget = torch.tensor([r.max_new_tokens for r in requests], device=device)
        seeds = torch.tensor([r.seed for r in requests], device=device)
        rows = torch.arange(batch, device=device)
        loops = None
        if engine.repeat_window:
            loops = _LoopDetector(engine.repeat_window, engine.repeat_max_period, batch, device)
            loops.reset(rows, [r.turn_prefix for r in requests])
        cache = DynamicCache(config=model.config)
        mixed = (  # the matmuls in `engine.matmul_dtype` (mixed precision), as the learner's autocast runs them
            torch.autocast(device.type, dtype=engine.matmul_dtype) if engine.matmul_dtype else contextlib.nullcontext()
        )
        with mixed:
            out = model(
                input_ids=input_ids,
                attention_mask=attention,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        next_pos = positions[:, -1] + 1
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        looping = torch.zeros_like(done)
        count = torch.zeros_like(budget)
        tokens, logps, kepts = [], [], []
        for t in range(int(budget.max().item())):
            tok, logp, kept = sample_kept(out.logits[:, -1].float(), self.sampling, seeds, count)
            tok = torch.where(done, engine.pad_token_id, tok)
            tokens.append(tok)
            logps.append(logp)
            kepts.append(kept)
            live = ~done
            count = count + live.long()
            if loops is not None:
                looping = looping | (live & loops.push(rows, tok))
            done = done | (tok == engine.stop_token_id) | (count >= budget) | looping
            if bool(done.all()):
                break
            attention = torch.cat([attention, live.long()[:, None]], dim=-1)
            with mixed:
                out = model(
                    input_ids=tok[:, None],
                    attention_mask=attention,
                    position_ids=next_pos[:, None],
                    past_key_values=cache,
                    use_cache=True,
                )
            next_pos = next_pos + 1
        ids, lps = torch.stack(tokens, 1).cpu(), torch.stack(logps, 1).cpu()
        counts, looped = count.tolist(), looping.tolist()
        kept = torch.stack(kepts, 1).cpu() if kepts[0] is not None else None
        for i, (_, on_done) in enumerate(wave):
            on_done(
                engine.finished(
                    ids[i, : counts[i]].tolist(),
                    lps[i, : counts[i]].tolist(),
                    looped[i],
                    kept=kept[i, : counts[i]] if kept is not None else None,
                )
            )
