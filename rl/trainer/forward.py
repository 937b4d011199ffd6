"""How the learner runs the policy over a batch: exact, and with as few token positions as it can.

Three savings, each the same logprobs and gradients as one forward over whole padded sequences (tests pin them):

- **micro-batches of similar lengths** (`plan`): sequences are ordered by length before they are cut, so a
  micro-batch pads little; the update is a sum over sequences, so their order changes it by float rounding only.
- **each prompt once** (`scoring_states` with `prompts`): the samples of a GRPO group share their prompt, so it is
  forwarded once per micro-batch and every sample's continuation runs on its KV cache (the cache rows are indexed
  per sample, so the gradient of each sample flows back into the one prompt forward and adds up there). With 8
  samples per prompt and a prompt of ~40% of a sequence this skips about a third of the positions.
- **the head on scored tokens only**: the model returns no logits; its last hidden states go through the output
  embedding at the tokens the loss scores (the policy's own tokens; not prompts or tool results).

Causal attention makes the first two exact: a prompt's hidden states do not depend on what follows it. Both need
the model's logits to be its output embedding of its last hidden state and a KV cache that takes per-row
positions and a padding mask; `head_on_hidden_states` and `shares_prompt_cache` check that on a 4-token forward
when the learner starts, and a model that fails them gets the plain forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Forward = Callable[..., Any]
"""The model call (the module, or a functional call with fake-quant weights), taking Hugging Face's kwargs."""


@dataclass(frozen=True)
class Prompts:
    """Each row's prompt: the tokens before its first scored token (the whole row when it has none)."""

    ids: list[int]
    """Per row, the index of its distinct prompt (rows with equal prompts share one)."""
    lengths: torch.Tensor
    """[rows] prompt lengths, >= 1."""

    @staticmethod
    def of(
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        where: torch.Tensor,
        routing: torch.Tensor | None = None,
    ) -> Prompts:
        """With `routing` (routing replay), rows share a prompt only if the rollout routed it the same way too."""
        scored = _scorable(where, attention_mask)
        first = scored.float().argmax(1)
        lengths = torch.where(scored.any(1), first, attention_mask.sum(1)).clamp(min=1)
        seen: dict[tuple, int] = {}
        ids = [
            seen.setdefault(
                (tuple(row[:n].tolist()), routing[r, :n].cpu().numpy().tobytes() if routing is not None else b""),
                len(seen),
            )
            for r, (row, n) in enumerate(zip(input_ids, lengths.tolist(), strict=True))
        ]
        return Prompts(ids, lengths)

    def rows(self, index: torch.Tensor) -> Prompts:
        """The prompts of rows `index`."""
        return Prompts([self.ids[i] for i in index.tolist()], self.lengths[index])


def plan(
    attention_mask: torch.Tensor, max_sequences: int, max_tokens: int = 0, prompts: Prompts | None = None
) -> list[torch.Tensor]:
    """Micro-batches (row indices into the batch) of at most `max_sequences` rows and, with `max_tokens`, at most
    that many forwarded positions; a row over `max_tokens` alone gets a micro-batch of its own.

    Without `prompts`: rows by length, shortest first; a micro-batch forwards rows x its longest row. With
    `prompts`: groups of rows sharing a prompt, ordered by their longest continuation, each group's rows together;
    a micro-batch forwards its distinct prompts x the longest of them plus rows x the longest continuation.
    """
    lengths = attention_mask.sum(1)
    if prompts is None:
        order = torch.argsort(lengths, stable=True).tolist()
        prompt_len, cont, group = [0] * len(order), lengths.tolist(), list(range(len(order)))
    else:
        cont = (lengths - prompts.lengths).clamp(min=0).tolist()
        prompt_len, group = prompts.lengths.tolist(), prompts.ids
        longest: dict[int, int] = {}
        for row, g in enumerate(group):
            longest[g] = max(longest.get(g, 0), cont[row])
        order = sorted(range(len(group)), key=lambda row: (longest[group[row]], group[row], cont[row]))
    out: list[torch.Tensor] = []
    rows: list[int] = []
    for row in order:
        candidate = [*rows, row]
        distinct = {group[r] for r in candidate}
        cost = len(distinct) * max(prompt_len[r] for r in candidate) + len(candidate) * max(cont[r] for r in candidate)
        if rows and (len(candidate) > max_sequences or (max_tokens and cost > max_tokens)):
            out.append(torch.tensor(rows))
            candidate = [row]
        rows = candidate
    if rows:
        out.append(torch.tensor(rows))
    return out


def forwarded_positions(attention_mask: torch.Tensor, prompts: Prompts | None) -> int:
    """Positions one micro-batch's forward runs (padding included): what `plan` bounds."""
    lengths = attention_mask.sum(1)
    if prompts is None:
        return int(attention_mask.shape[0] * lengths.max())
    distinct = len(set(prompts.ids))
    return int(
        distinct * prompts.lengths.max() + attention_mask.shape[0] * (lengths - prompts.lengths).clamp(min=0).max()
    )


def scoring_states(
    forward: Forward,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    where: torch.Tensor,
    prompts: Prompts | None = None,
    routing: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The last hidden states that score the tokens at `where` ([n, hidden]: the state at position i - 1 scores
    token i) and those tokens' (rows, positions). Position 0 is never scored. With `prompts`, each distinct
    prompt is forwarded once and the continuations on its KV cache. With `routing` ([b, t, layers, top_k], routing
    replay), each forward gets the slice of it aligned with its own tokens (`rl.trainer.replay.RoutingReplay`)."""
    scored = _scorable(where, attention_mask)
    if prompts is None:
        out = forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            logits_to_keep=_no_logits(input_ids),
            **({"routing": routing} if routing is not None else {}),
        )
        rows, cols = scored[:, 1:].nonzero(as_tuple=True)
        return out.hidden_states[-1][rows, cols], (rows, cols + 1)

    starts = prompts.lengths.to(input_ids.device)
    group = torch.tensor(prompts.ids, device=input_ids.device)
    first_row = {g: row for row, g in reversed(list(enumerate(prompts.ids)))}  # a row holding each distinct prompt
    width = int(starts.max())
    prompt_ids, prompt_mask = (
        input_ids.new_zeros(len(first_row), width),
        attention_mask.new_zeros(len(first_row), width),
    )
    prompt_routing = routing.new_full((len(first_row), width, *routing.shape[2:]), -1) if routing is not None else None
    for g, row in first_row.items():
        n = int(starts[row])
        prompt_ids[g, :n], prompt_mask[g, :n] = input_ids[row, :n], 1
        if prompt_routing is not None:
            prompt_routing[g, :n] = routing[row, :n]
    head = forward(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        use_cache=True,
        output_hidden_states=True,
        logits_to_keep=_no_logits(input_ids),
        **({"routing": prompt_routing} if prompt_routing is not None else {}),
    )
    last_prompt_state = head.hidden_states[-1][
        group, starts - 1
    ]  # [rows, hidden]: scores each row's first continuation token
    cont_len = (attention_mask.sum(1) - starts).clamp(min=0)
    span = int(cont_len.max())
    if span == 0:
        states = last_prompt_state[:, None]
    else:
        cols = torch.arange(span, device=input_ids.device)
        cont_mask = (cols[None] < cont_len[:, None]).to(attention_mask.dtype)
        at = (starts[:, None] + cols[None]).clamp(max=input_ids.shape[1] - 1)
        cont_ids = input_ids.gather(1, at) * cont_mask
        extra = {}
        if routing is not None:  # each continuation position's routing; padding routes as the model does
            cont_routing = routing[torch.arange(len(at), device=at.device)[:, None], at]
            extra["routing"] = cont_routing.masked_fill(~cont_mask.bool()[:, :, None, None], -1)
        cache = head.past_key_values
        cache.batch_select_indices(group)  # row r attends to its prompt's keys and values (indexing: gradients add up)
        tail = forward(
            input_ids=cont_ids,
            attention_mask=torch.cat([prompt_mask[group], cont_mask], 1),
            position_ids=starts[:, None] + cols[None],
            past_key_values=cache,
            output_hidden_states=True,
            logits_to_keep=_no_logits(input_ids),
            **extra,
        )
        states = torch.cat(
            [last_prompt_state[:, None], tail.hidden_states[-1][:, :-1]], 1
        )  # [rows, span]: j scores token start + j
    rows, positions = scored.nonzero(as_tuple=True)
    return states[rows, positions - starts[rows]], (rows, positions)


LEARNER_SDPA = "sdpa_learner"


def _sdpa_learner(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, **kwargs
):
    """SDPA as the learner runs it: the same attention as transformers' `sdpa`, with two changes of kernel.

    - Value heads narrower than the query's (MLA) are zero-padded to its head size and the padding dropped from the
      output (padded value columns only add zero columns), so SDPA takes its flash kernel.
    - Under CPU autocast (`trainer.compute_dtype: bfloat16`) it runs in float32 on the bf16 projections' outputs
      and hands back their dtype: torch's CPU flash-attention backward is ~3x slower in bf16 than in float32
      (SmolLM2's update on the real-model batch: 1.5 against 0.45 s), and the rollout engine's attention is float32
      too, so this also keeps the two closer."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype, width = query.dtype, value.shape[-1]
    upcast = query.device.type == "cpu" and torch.is_autocast_enabled("cpu") and dtype != torch.float32
    if width < query.shape[-1]:
        value = torch.nn.functional.pad(value, (0, query.shape[-1] - width))
    with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
        if upcast:
            query, key, value = query.float(), key.float(), value.float()
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return out[..., :width].to(dtype), weights


def use_learner_attention(model: torch.nn.Module) -> bool:
    """Switch an SDPA model to `_sdpa_learner` (MLA's narrower value heads padded; float32 attention under CPU
    autocast); returns whether it did (a model on another attention implementation keeps it).

    SDPA's flash kernels (CPU and CUDA) need one head size for query, key and value; with MLA's narrower values
    (DeepSeek V3, Kimi K2: v_head_dim 16 vs 32 in the built-in policy) it falls back to its math path (the
    attention matrix materialized, plus a scan for fully masked rows), about 5% of the tiny policy's update on a
    CPU core. Hand-written because transformers pads values only for its flash-attention-2 integration, which
    needs CUDA and the flash-attn package, and picks no attention dtype apart from the matmuls'."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(LEARNER_SDPA, _sdpa_learner)
    AttentionMaskInterface.register(LEARNER_SDPA, sdpa_mask)
    model.set_attn_implementation(LEARNER_SDPA)
    return True


def head_on_hidden_states(model: torch.nn.Module) -> bool:
    """Whether the model's logits are its output embedding applied to its last hidden state (true of the Llama
    and DeepSeek families; not of models that scale or soft-cap logits), checked on a 4-token forward."""
    head = model.get_output_embeddings()
    if head is None:
        return False
    ids = _probe_ids(model)[:1]
    try:
        with _eval(model), torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
            return bool(out.hidden_states) and _close(head(out.hidden_states[-1]), out.logits)
    except (TypeError, ValueError, RuntimeError, AttributeError, IndexError):
        return False


def shares_prompt_cache(model: torch.nn.Module) -> bool:
    """Whether forwarding a shared prompt once and the continuations on its cache gives the whole sequences' hidden
    states, on two rows with one prompt and different continuations (one of them shorter)."""
    ids = _probe_ids(model)
    mask = torch.ones_like(ids)
    mask[1, -1] = 0
    where = torch.zeros_like(ids, dtype=torch.bool)
    where[:, 2:] = True
    try:
        with _eval(model), torch.no_grad():
            plain, at = scoring_states(model, ids, mask, where)
            shared, at_shared = scoring_states(model, ids, mask, where, Prompts.of(ids, mask, where))
    except (TypeError, ValueError, RuntimeError, AttributeError, IndexError):
        return False
    return all(torch.equal(a, b) for a, b in zip(at, at_shared, strict=True)) and _close(shared, plain)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 rounding, relative to the largest value: a 30-layer model's hidden states reach ~50,
    and two exact paths (one forward, or prompt and continuation on its cache) differ by ~1e-5 of that."""
    return a.shape == b.shape and float((a - b).abs().max()) <= 1e-4 * max(float(b.abs().max()), 1.0)


def _scorable(where: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    scored = where.bool() & attention_mask.bool()
    scored[:, 0] = False
    return scored


def _no_logits(like: torch.Tensor) -> torch.Tensor:
    """`logits_to_keep` selecting no position: the model returns hidden states and no logits."""
    return torch.zeros(0, dtype=torch.long, device=like.device)


def _probe_ids(model: torch.nn.Module) -> torch.Tensor:
    """Two 5-token rows sharing a 2-token prompt."""
    vocab = max(int(model.config.vocab_size), 8)
    ids = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 6, 7, 5]]) % vocab
    return ids.to(next(model.parameters()).device)


class _eval:
    """Eval mode for a probe (dropout would make two forwards differ), restored after."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.training)


def compute_autocast(compute_dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    """`trainer.compute_dtype`'s context for a learner forward: bf16 mixed precision under autocast (each matmul's
    operands, the fp32 master weights or their fake-quant and the activations, cast to bf16; its backward hands fp32
    gradients to the fp32 leaves; `token_logprobs` takes the logits back to fp32 before the softmax), or nothing."""
    if compute_dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
