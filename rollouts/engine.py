"""The rollout engine: continuous batching over a preallocated KV cache, sampling on the device.

`Engine.batcher(...)` opens a `Batcher`: requests (`Request`: prompt ids, a token budget, a sampling seed) are
submitted at any time and each `step()` (1) admits waiting requests into free cache slots, prefilling each distinct
prompt once and copying its cache entries to every slot that shares it (a GRPO group's samples), (2) decodes one
token for every running sequence, (3) retires finished sequences, calling their `on_done`. A finished sequence
leaves at once and a waiting one takes its slot at the next step: no one waits for the batch's longest sample.
`Engine.generate(prompts, ...)` is the one-shot form (submit all, step until done).

Prefix reuse across turns (`Engine(prefix_reuse=True)`, `rollout.prefix_reuse`): a retired sequence's slot keeps
its cache, remembered under the request's `session` (an episode). When the session's next request (its next turn:
the history, the turn just generated and the tool's result) finds that slot free, it continues there from the
longest prefix the slot holds and prefills only the new tokens (`Decoder.extend`); new sessions take slots that
hold no reusable cache first. SGLang's RadixAttention and vLLM's automatic prefix caching do this by content
across requests; one slot per episode is the case that matters for agentic rollouts, and it costs no lookup.

Per step, on the device and without a host round trip: temperature, top-k and top-p sampling, the logprob of each
sampled token under logits / temperature (what the learner recomputes), the stop token, each sequence's budget and
the loop detector (the sampler and the detector: `rollouts/sampling.py`). The host looks at the finished flags
once per step on a CPU (where reading them costs nothing) and every `sync_every` steps on a GPU.

Sampling is counter-based: the uniform number for token t of a request is a hash of (request seed, t), so a
sample's tokens do not depend on which other requests shared its batch, or when it was admitted.

A sequence stops at the stop token (`stop`), its token budget (`length`), or when the loop detector sees one unit
of at most `repeat_max_period` tokens repeated over its last `repeat_window` (+ the unit's length) tokens
(`repeat`: a looping generation that would otherwise burn its whole budget).

Models the slot decoder (`rollouts/decoder.py`) does not cover run through their own HF forward in waves (every
waiting request at once, to the end); same API, same sampling, no continuous batching.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

import torch

from rollouts.decoder import SUPPORTED_MODEL_TYPES, Decoder
from rollouts.requests import Generation, Request, StopReason, _Item, _Queue
from rollouts.sampling import SamplingParams, _LoopDetector, sample_kept
from rollouts.wave import WaveBatcher

__all__ = ["Batcher", "Engine", "Generation", "Request", "SamplingParams", "StopReason", "WaveBatcher"]

GATHER_BELOW = 0.75
"""A decode step runs only the occupied slots (gathered) once fewer than this share of slots 0..width-1 are."""


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        pad_token_id: int,
        stop_token_id: int,
        repeat_window: int = 0,
        repeat_max_period: int = 16,
        max_num_seqs: int = 256,
        prefix_reuse: bool = True,
        record_routing: bool = False,
        matmul_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model.eval()
        self.pad_token_id = pad_token_id
        self.stop_token_id = stop_token_id
        self.repeat_window = repeat_window
        self.repeat_max_period = repeat_max_period
        self.max_num_seqs = max_num_seqs
        self.prefix_reuse = prefix_reuse
        self.continuous = model.config.model_type in SUPPORTED_MODEL_TYPES
        self.record_routing = record_routing
        """Record each position's routed experts (routing replay); needs the slot decoder and a DeepSeek-V3 MoE."""
        self.matmul_dtype = None if matmul_dtype in (None, next(model.parameters()).dtype) else matmul_dtype
        """Mixed precision (`rollout.matmul_dtype`): the dtype a float32 model's matmuls run in, as the learner's under
        autocast (the slot decoder's projections, `rollouts/projections.py`; the HF forward under `torch.autocast`);
        None = the model's own."""
        if record_routing and not self.continuous:
            raise ValueError(
                f"routing replay: the rollout engine runs {model.config.model_type!r} models through their HF forward, "
                f"which records no routing; it records it for {', '.join(SUPPORTED_MODEL_TYPES)} MoE models"
            )
        self._decoder: Decoder | None = None

    def finished(
        self,
        ids: list[int],
        logprobs: list[float],
        looped: bool,
        routing: torch.Tensor | None = None,
        kept: torch.Tensor | None = None,
    ) -> Generation:
        """A sequence's result: it stopped at the stop token, else at the loop detector, else at its budget."""
        reason: StopReason = "stop" if ids and ids[-1] == self.stop_token_id else ("repeat" if looped else "length")
        return Generation(ids, logprobs, reason, routing, kept)

    def decoder(self, slots: int, max_len: int) -> Decoder:
        """The slot decoder, its cache reused while big enough (allocated once per worker in practice)."""
        current = self._decoder
        if current is None or current.slots < slots or current.max_len < max_len:
            self._decoder = None  # free the old cache before allocating the new one
            self._decoder = Decoder(
                self.model,
                max(slots, current.slots if current else 0),
                max(max_len, current.max_len if current else 0),
                self.record_routing,
                self.matmul_dtype,
            )
        return self._decoder

    def batcher(self, sampling: SamplingParams, slots: int, max_len: int) -> Batcher | WaveBatcher:
        """Open a batch of up to `slots` concurrent sequences (capped by `max_num_seqs`) of up to `max_len` tokens."""
        slots = max(1, min(slots, self.max_num_seqs))
        if self.continuous:
            decoder = self.decoder(slots, max_len)
            decoder.refresh()
            return Batcher(self, decoder, sampling, slots, max_len)
        return WaveBatcher(self, sampling)

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: list[int],
        temperature: float,
        greedy: bool,
        generator: torch.Generator | None = None,
        turn_prefixes: list[list[int]] | None = None,
        top_p: float = 1.0,
        top_k: int = 0,
    ) -> list[Generation]:
        """Sample a continuation of each prompt; `max_new_tokens[i]` caps row i. Seeds come from `generator`."""
        seeds = torch.randint(0, 2**62, (len(prompts),), generator=generator).tolist()
        prefixes = turn_prefixes or [[] for _ in prompts]
        requests = [Request(p, n, s, t) for p, n, s, t in zip(prompts, max_new_tokens, seeds, prefixes, strict=True)]
        batcher = self.batcher(
            SamplingParams(temperature, greedy, top_p, top_k),
            len(requests),
            max(len(p) + n for p, n in zip(prompts, max_new_tokens, strict=True)),
        )
        results: list[Generation | None] = [None] * len(requests)
        for i, request in enumerate(requests):
            batcher.submit(request, lambda g, i=i: results.__setitem__(i, g))
        while batcher.busy:
            batcher.step()
        return results  # type: ignore[return-value]


class Batcher(_Queue):
    """Continuous batching over the decoder's slots; see the module docstring."""

    def __init__(self, engine: Engine, decoder: Decoder, sampling: SamplingParams, slots: int, max_len: int) -> None:
        self.engine, self.decoder, self.sampling = engine, decoder, sampling
        self.slots, self.max_len = slots, max_len
        self.device = decoder.device
        self.sync_every = 1 if self.device.type == "cpu" else 8
        self.waiting: deque[_Item] = deque()
        self.running: list[_Item | None] = [None] * slots
        self.host_pos = [0] * slots  # upper bound of each slot's next position, for the attention span
        dev = self.device
        self.tok = torch.zeros(slots, dtype=torch.long, device=dev)
        self.pos = torch.zeros(slots, dtype=torch.long, device=dev)
        self.count = torch.zeros(slots, dtype=torch.long, device=dev)  # tokens generated
        self.budget = torch.zeros(slots, dtype=torch.long, device=dev)
        self.seeds = torch.zeros(slots, dtype=torch.long, device=dev)
        self.done = torch.ones(slots, dtype=torch.bool, device=dev)
        self.looped = torch.zeros(slots, dtype=torch.bool, device=dev)
        self.out_ids = torch.zeros(slots, max_len, dtype=torch.long, device=dev)
        self.out_lp = torch.zeros(slots, max_len, dtype=torch.float32, device=dev)
        # sampling-mask replay: each draw's kept ids; routing replay: each position's experts (`rollouts.routing`)
        kept = min(sampling.record_kept, decoder.model.config.vocab_size)
        self.out_kept = torch.full((slots, max_len, kept), -1, dtype=torch.int32, device=dev) if kept else None
        routes = decoder.routes
        self.out_routing = (
            torch.zeros(slots, max_len, routes.num_layers, routes.top_k, dtype=routes.dtype, device=dev)
            if routes is not None
            else None
        )
        self.loops = (
            _LoopDetector(engine.repeat_window, engine.repeat_max_period, slots, dev) if engine.repeat_window else None
        )
        self.steps = 0
        # prefix reuse: the tokens whose cache entries each idle slot holds (positions 0..len-1), and whose they are
        self.cached: list[list[int] | None] = [None] * slots
        self.slot_session: list[Hashable | None] = [None] * slots
        self.session_slot: dict[Hashable, int] = {}

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.running)

    @torch.inference_mode()
    def step(self) -> None:
        self._admit()
        width = max((i + 1 for i, r in enumerate(self.running) if r is not None), default=0)
        if width:
            self._decode(width)
            self.steps += 1
            if self.steps % self.sync_every == 0:
                self._retire(width)

    def _admit(self) -> None:
        """Waiting requests into free slots: a request that continues its session in the slot holding the
        session's cache extends it by its new tokens; the others are prefilled (each distinct prompt once) in
        slots that hold no reusable cache first."""
        free = [s for s, r in enumerate(self.running) if r is None]
        if not free or not self.waiting:
            return
        admitted = [self.waiting.popleft() for _ in range(min(len(free), len(self.waiting)))]
        continued: list[tuple[int, int, _Item]] = []  # (slot, cached positions kept, item)
        fresh: list[_Item] = []
        taken: set[int] = set()
        for item in admitted:
            found = self._reusable(item[0], taken)
            if found is None:
                fresh.append(item)
            else:
                continued.append((*found, item))
                taken.add(found[0])
        spare = sorted((s for s in free if s not in taken), key=lambda s: (self.cached[s] is not None, s))
        placed, logits = self._prefill(list(zip(spare, fresh)))  # zip stops at the fresh requests
        for bucket in _by_length(continued, lambda c: len(c[2][0].prompt) - c[1]):
            logits.append(self._extend(bucket))
            placed += [(slot, item) for slot, _, item in bucket]
        self._start(placed, torch.cat(logits))

    def _prefill(self, placed: list[tuple[int, _Item]]) -> tuple[list[tuple[int, _Item]], list[torch.Tensor]]:
        """Prefill each distinct prompt of `placed` (slot, request) once into all its slots; returns the slots in
        logits order and the logits (one row per slot)."""
        if not placed:
            return [], []
        unique: dict[tuple[int, ...], list[int]] = {}
        for slot, (request, _) in placed:
            unique.setdefault(tuple(request.prompt), []).append(slot)
        prompts = list(unique)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        ids = self._padded(prompts).to(self.device)
        logits = self.decoder.prefill(ids, lengths, [unique[p] for p in prompts])
        if self.out_routing is not None:
            routing = self.decoder.routes.read().view(*ids.shape, *self.out_routing.shape[2:])
            for i, p in enumerate(prompts):
                self.out_routing[unique[p], : ids.shape[1]] = routing[i]
        by_slot = dict(placed)
        order = [(s, by_slot[s]) for p in prompts for s in unique[p]]
        return order, [logits[torch.tensor([i for i, p in enumerate(prompts) for _ in unique[p]], device=self.device)]]

    def _extend(self, bucket: list[tuple[int, int, _Item]]) -> torch.Tensor:
        """Continue each (slot, kept positions, request) of `bucket` past the positions its slot keeps."""
        tails = [item[0].prompt[keep:] for _, keep, item in bucket]
        starts = torch.tensor([keep for _, keep, _ in bucket], device=self.device)
        lengths = torch.tensor([len(t) for t in tails], device=self.device)
        ids = self._padded(tails).to(self.device)
        logits = self.decoder.extend(
            ids, starts, lengths, torch.tensor([slot for slot, _, _ in bucket], device=self.device)
        )
        if self.out_routing is not None:
            routing = self.decoder.routes.read().view(*ids.shape, *self.out_routing.shape[2:])
            for i, (slot, keep, _) in enumerate(bucket):
                self.out_routing[slot, keep : keep + len(tails[i])] = routing[i, : len(tails[i])]
        return logits

    def _start(self, placed: list[tuple[int, _Item]], logits: torch.Tensor) -> None:
        """Slots of `placed` (slot, request) start their requests; `logits` (one row each) give their first tokens."""
        for s, item in placed:
            self.running[s] = item
            self.host_pos[s] = len(item[0].prompt)
            self._bind(s, item[0].session)
        idx = torch.tensor([s for s, _ in placed], device=self.device)
        reqs = [item[0] for _, item in placed]
        self.pos[idx] = torch.tensor([len(r.prompt) for r in reqs], device=self.device)
        self.budget[idx] = torch.tensor([r.max_new_tokens for r in reqs], device=self.device)
        self.seeds[idx] = torch.tensor([r.seed for r in reqs], device=self.device)
        self.count[idx] = 0
        self.done[idx] = False
        self.looped[idx] = False
        if self.loops is not None:
            self.loops.reset(idx, [r.turn_prefix for r in reqs])
        self._record(idx, logits)

    def _padded(self, seqs: list[list[int]] | list[tuple[int, ...]]) -> torch.Tensor:
        ids = torch.full((len(seqs), max(map(len, seqs))), self.engine.pad_token_id, dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return ids

    def _reusable(self, request: Request, taken: set[int]) -> tuple[int, int] | None:
        """(slot, cached positions to keep) for a request that continues its session in the session's free slot."""
        slot = self.session_slot.get(request.session) if request.session is not None else None
        if slot is None or slot in taken or self.running[slot] is not None or self.cached[slot] is None:
            return None
        # at least the prompt's last token runs again: its logits give the first new token
        keep = min(_common_prefix(self.cached[slot], request.prompt), len(request.prompt) - 1)  # type: ignore[arg-type]
        return (slot, keep) if keep > 0 else None

    def _bind(self, slot: int, session: Hashable | None) -> None:
        """Slot `slot` now computes for `session`: whatever cache it held for another is gone."""
        previous = self.slot_session[slot]
        if previous is not None and self.session_slot.get(previous) == slot:
            del self.session_slot[previous]
        self.cached[slot], self.slot_session[slot] = None, session
        if session is not None and self.engine.prefix_reuse:
            old = self.session_slot.get(session)
            if old is not None and old != slot:  # the session moved (its slot was busy): the old cache is no one's
                self.cached[old], self.slot_session[old] = None, None
            self.session_slot[session] = slot

    def _record(self, rows: slice | torch.Tensor, logits: torch.Tensor) -> None:
        """Sample the next token of slots `rows` from `logits`, store it, update the slots' flags. A finished
        slot's write lands just past its end (its count no longer moves), where nothing reads it."""
        count, done = self.count[rows], self.done[rows]
        tok, logp, kept = sample_kept(logits, self.sampling, self.seeds[rows], count)
        at = count.clamp(max=self.max_len - 1)
        if self.out_kept is not None and kept is not None:
            index = torch.arange(self.slots, device=self.device)[rows]
            self.out_kept[index, at] = kept
        for buffer, values in ((self.out_ids, tok), (self.out_lp, logp)):
            if isinstance(rows, slice):
                buffer[rows].scatter_(1, at[:, None], values[:, None])
            else:
                buffer[rows, at] = values
        live = ~done
        count = count + live.long()
        looping = self.looped[rows]
        if self.loops is not None:
            looping = looping | (live & self.loops.push(rows, tok))
        self.count[rows], self.looped[rows], self.tok[rows] = count, looping, tok
        self.done[rows] = done | (tok == self.engine.stop_token_id) | (count >= self.budget[rows]) | looping

    def _decode(self, width: int) -> None:
        """One token for the slots in use: slots 0..width-1 as one slice while few of them are idle, else only
        the occupied ones (gathered: with prefix reuse, episodes keep their slots and the occupied ones scatter)."""
        occupied = [s for s in range(width) if self.running[s] is not None]
        rows: slice | torch.Tensor = slice(0, width)
        if len(occupied) < GATHER_BELOW * width:
            rows = torch.tensor(occupied, device=self.device)
        span = min(max(self.host_pos[s] for s in occupied) + 1, self.max_len)
        positions = self.pos[rows].clamp(max=self.max_len - 1)
        logits = self.decoder.decode(self.tok[rows], positions, span, None if isinstance(rows, slice) else rows)
        if self.out_routing is not None:  # the token fed at each slot's position (an idle slot's lands past its cache)
            index = torch.arange(self.slots, device=self.device)[rows]
            self.out_routing[index, positions] = self.decoder.routes.read()
        self.pos[rows] = self.pos[rows] + (~self.done[rows]).long()
        self._record(rows, logits)
        for s in occupied:
            self.host_pos[s] = min(self.host_pos[s] + 1, self.max_len - 1)

    def _retire(self, width: int) -> None:
        done = self.done[:width].tolist()
        finished = [s for s in range(width) if done[s] and self.running[s] is not None]
        if not finished:
            return
        idx = torch.tensor(finished, device=self.device)
        counts, looped = self.count[idx].tolist(), self.looped[idx].tolist()
        ids, lps = self.out_ids[idx].cpu(), self.out_lp[idx].cpu()
        for k, s in enumerate(finished):
            request, on_done = self.running[s]  # type: ignore[misc]
            self.running[s] = None
            tokens = ids[k, : counts[k]].tolist()
            if self.slot_session[s] is not None and self.engine.prefix_reuse:
                # the cache holds every position before the last sampled token (that one was never fed back)
                self.cached[s] = request.prompt + tokens[:-1]
            computed = len(request.prompt) + counts[k] - 1  # positions fed to the model: all but the last token
            routing = self.out_routing[s, :computed].to("cpu", copy=True) if self.out_routing is not None else None
            kept = self.out_kept[s, : counts[k]].to("cpu", copy=True) if self.out_kept is not None else None
            on_done(self.engine.finished(tokens, lps[k, : counts[k]].tolist(), looped[k], routing, kept))


def _by_length(items: list, length: Callable[[Any], int]) -> list[list]:
    """`items` in buckets of lengths within a factor of 2 (1-2, 3-4, 5-8, ...), shortest first: padded to its
    longest, a bucket runs at least half real tokens (one long tool error no longer pads every other row)."""
    buckets: dict[int, list] = {}
    for item in items:
        buckets.setdefault((length(item) - 1).bit_length(), []).append(item)
    return [buckets[k] for k in sorted(buckets)]


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(i for i in range(n) if a[i] != b[i])
