"""What the learner records of an update for people to look at (`tiderl view`, the trackers' sample tables).

For the few sequences the controller marks (`TrainBatch.trace`), the learner keeps its per-token values from the
forward that the mismatch metrics average: its logprob of each token before the update (beside the rollout's, the
per-token train-inference gap), the tokens the K2.5 token mask took out of the gradient, the rollout-correction
importance weight (0 where masked IS dropped a token) and where the loss clipped the ratio. Recording costs a copy of
a few rows of tensors the update computes anyway; nothing is recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TokenTrace:
    """One sequence's per-token view of an update; every list has one entry per token of the sequence."""

    index: int
    """The sequence's `TrainBatch.trace` value: its position in the list of samples the controller keeps."""
    tokens: list[str]
    """Each token decoded on its own."""
    learner_logprobs: list[float] | None
    """The learner's logprob of each token before the update (0 off the loss mask); None when the learner did not
    score the sequence (`trainer.score_zero_advantage: false` and an advantage of 0)."""
    train_mask: list[float] | None
    """The loss mask after `algorithm.token_mask` (0 where the token left the trust band); None without a token mask."""
    is_weight: list[float] | None
    """The rollout-correction importance weight (`algorithm.rollout_correction`; 0 where masked IS dropped the token,
    the cap where truncated IS cut it); None without a correction."""
    clipped: list[bool] | None
    """Whether the loss clipped the token's ratio; None when not scored."""


class TraceRecorder:
    """Collects the traced rows' values over an update's micro-batches (rows are indices into the learner's batch)."""

    def __init__(self, trace: torch.Tensor) -> None:
        self.trace = trace.cpu()  # [batch] int64, -1 on rows not traced
        self.values: dict[int, dict[str, torch.Tensor]] = {}

    def record(
        self,
        rows: torch.Tensor,
        logprobs: torch.Tensor,
        train_mask: torch.Tensor | None,
        is_weight: torch.Tensor | None,
        clipped: torch.Tensor,
    ) -> None:
        """One micro-batch: `rows` [mb] (batch rows), each tensor [mb, width]."""
        for i, row in enumerate(rows.tolist()):
            if self.trace[row] < 0:
                continue
            values = {"learner_logprobs": logprobs[i], "clipped": clipped[i]}
            if train_mask is not None:
                values["train_mask"] = train_mask[i]
            if is_weight is not None:
                values["is_weight"] = is_weight[i]
            self.values[row] = {k: v.detach().float().cpu() for k, v in values.items()}

    def finish(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer: Any) -> list[TokenTrace]:
        """The traces of the marked rows (scored or not), each trimmed to its sequence's length; `tokenizer` (a
        Hugging Face tokenizer) decodes each token alone."""
        out = []
        for row in (self.trace >= 0).nonzero().flatten().tolist():
            n = int(attention_mask[row].sum())
            values = self.values.get(row, {})

            def cut(name: str, n: int = n, values: dict = values) -> list[float] | None:
                tensor = values.get(name)
                if tensor is None:
                    return None
                return torch.nn.functional.pad(tensor[:n], (0, max(0, n - len(tensor)))).tolist()

            clipped = cut("clipped")
            out.append(
                TokenTrace(
                    index=int(self.trace[row]),
                    tokens=tokenizer.batch_decode([[i] for i in input_ids[row, :n].tolist()]),
                    learner_logprobs=cut("learner_logprobs"),
                    train_mask=cut("train_mask"),
                    is_weight=cut("is_weight"),
                    clipped=[bool(c) for c in clipped] if clipped is not None else None,
                )
            )
        return out
