"""The PTX loss (Kimi K1.5/K2, after InstructGPT): an auxiliary NLL on curated examples, added to the RL loss with
weight `algorithm.ptx_coef`, so RL does not erode what supervised data taught.

Examples come from JSONL files (`algorithm.ptx_files`), one per line: `{"messages": [...]}` (chat messages; the
loss covers every assistant turn, rendered with the policy's chat template) or `{"text": "..."}` (the loss covers
all of it). Each learner step draws `algorithm.ptx_batch_size` examples with its own seeded generator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rl.trainer.config import AlgorithmConfig


class PtxData:
    def __init__(self, cfg: AlgorithmConfig, tokenizer: Any, seed: int, max_tokens: int) -> None:
        self.examples: list[tuple[list[int], list[float]]] = []
        for file in cfg.ptx_files:
            path = Path(file).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"algorithm.ptx_files: {path} does not exist")
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    self.examples.append(self._encode(json.loads(line), tokenizer, f"{path}:{n}", max_tokens))
        if not self.examples:
            raise ValueError(
                "algorithm.ptx_coef > 0 needs examples: set algorithm.ptx_files to JSONL files of {messages} or {text}"
            )
        self.batch_size = cfg.ptx_batch_size
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.generator = torch.Generator().manual_seed(seed * 7919 + 17)

    @staticmethod
    def _encode(example: dict[str, Any], tokenizer: Any, where: str, max_tokens: int) -> tuple[list[int], list[float]]:
        if isinstance(example.get("text"), str):
            ids = tokenizer.encode(example["text"], add_special_tokens=False)
            return ids[:max_tokens], [1.0] * min(len(ids), max_tokens)
        messages = example.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: a PTX example needs 'messages' (chat messages) or 'text'")
        ids: list[int] = []
        mask: list[float] = []
        for k, message in enumerate(messages):  # each message's tokens are the template's text delta it adds
            before = tokenizer.apply_chat_template(messages[:k], tokenize=False) if k else ""
            after = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
            piece = tokenizer.encode(after[len(before) :], add_special_tokens=False)
            ids += piece
            mask += [1.0 if message.get("role") == "assistant" else 0.0] * len(piece)
        return ids[:max_tokens], mask[:max_tokens]

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, loss_mask) of the next draw, right-padded."""
        picks = torch.randint(len(self.examples), (self.batch_size,), generator=self.generator).tolist()
        width = max(len(self.examples[i][0]) for i in picks)
        ids = torch.full((len(picks), width), self.pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        loss_mask = torch.zeros((len(picks), width))
        for row, i in enumerate(picks):
            tokens, mask = self.examples[i]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            attention[row, : len(tokens)] = 1
            loss_mask[row, : len(tokens)] = torch.tensor(mask)
        return ids, attention, loss_mask
