"""Prompt data: `datasets` (jsonl, parquet, saved datasets) in verl's layout, or the built-in generated task.

Rows need `prompt` (a list of chat messages, or a string taken as one user message) and
`reward_model.ground_truth`; `data_source` and `extra_info` are optional. A malformed row is counted and skipped
with a warning naming the file and row, never a crashed job; a file with no usable row is an error.
`PromptSampler` walks the training rows in a per-epoch shuffled order and keeps a cursor that checkpoints save.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from envs.base import PromptRow
from rl.config import JobConfig
from rl.tasks.registry import get_task

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Prompt data could not be used; the message names the file and the row."""


def load_split(cfg: JobConfig, split: str, data_dir: Path) -> list[PromptRow]:
    """Training (`split="train"`) or held-out (`"eval"`) prompts for the job."""
    files = cfg.data.train_files if split == "train" else cfg.data.eval_files
    if not files:
        if cfg.data.task is None:
            raise DataError(f"data.{split}_files is empty and no built-in data.task is set")
        files = [str(_write_builtin(cfg, split, data_dir))]
    rows = [row for f in files for row in read_rows(f)]
    if split == "eval":
        rows = rows[: cfg.data.eval_size]
    return [to_prompt_row(i, row) for i, row in enumerate(rows)]


def builtin_rows(task: str, n: int, seed: int, split: str) -> list[dict[str, Any]]:
    """Rows of a registered generated task (`data.task`), in verl's layout."""
    return get_task(task).make_rows(n, seed, split)


def _write_builtin(cfg: JobConfig, split: str, data_dir: Path) -> Path:
    assert cfg.data.task is not None
    task = get_task(cfg.data.task)  # a `file.py:TASK` reference names its file by the task's own name
    size = cfg.data.train_size if split == "train" else cfg.data.eval_size
    path = data_dir / f"{task.name}-{split}-{size}-seed{cfg.seed}.jsonl"
    if not path.is_file():
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in task.make_rows(size, cfg.seed, split)))
        tmp.replace(path)
    return path


def read_rows(path: str) -> list[dict[str, Any]]:
    import datasets

    p = Path(path)
    if not p.exists():
        raise DataError(f"data file {p} does not exist")
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
    elif p.suffix in (".jsonl", ".json"):
        ds = datasets.load_dataset("json", data_files=str(p), split="train")
    elif p.suffix == ".parquet":
        ds = datasets.load_dataset("parquet", data_files=str(p), split="train")
    else:
        raise DataError(f"data file {p}: unsupported format (use .jsonl, .json, .parquet or a saved dataset directory)")
    good, skipped = [], 0
    for i, row in enumerate(ds):
        problem = _row_problem(row)
        if problem:
            skipped += 1
            log.warning("skipping row %d of %s: %s", i, p, problem)
        else:
            good.append({**row, "_source": f"{p}#{i}"})
    if not good:
        raise DataError(
            f"{p}: none of its {skipped} rows is usable (each needs `prompt` and `reward_model.ground_truth`)"
        )
    if skipped:
        log.warning("%s: skipped %d of %d rows", p, skipped, skipped + len(good))
    return good


def _row_problem(row: dict[str, Any]) -> str | None:
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        pass
    elif not isinstance(prompt, list) or not prompt:
        return "`prompt` must be a non-empty list of chat messages or a string"
    elif not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
    ):
        return "every `prompt` message needs string `role` and `content`"
    rm = row.get("reward_model")
    if not isinstance(rm, dict) or rm.get("ground_truth") is None:
        return "missing `reward_model.ground_truth`"
    return None


def to_prompt_row(index: int, row: dict[str, Any]) -> PromptRow:
    """A validated verl-layout row (see `_row_problem`) as the typed record rollouts and rewards take."""
    prompt = row["prompt"]
    messages = (
        [{"role": "user", "content": prompt}]
        if isinstance(prompt, str)
        else [{"role": m["role"], "content": m["content"]} for m in prompt]
    )
    extra = dict(row.get("extra_info") or {})
    if "_source" in row:
        extra.setdefault("source", row["_source"])
    return PromptRow(
        index=index,
        messages=messages,
        data_source=str(row.get("data_source") or "unknown"),
        ground_truth=row["reward_model"]["ground_truth"],
        extra_info=extra,
    )


@dataclass
class PromptSampler:
    """Which training prompts each step gets.

    `epoch`: an epoch-shuffled walk over the rows; (epoch, position) is the data cursor. `prioritized` (Kimi
    K1.5): each draw picks prompt i with probability (1 - s_i) / sum_j (1 - s_j), s_i the prompt's tracked success
    rate (an exponential moving average of its groups' accuracy, `update`); unseen prompts have s = 0. When every
    prompt is solved (all weights 0) it draws uniformly. The cursor then also holds the success rates and the
    draw counter, so a resumed job draws the same prompts. `curriculum` (K1.5): the epoch walk ordered from easy to
    hard by each row's `extra_info.difficulty`.
    """

    rows: list[PromptRow]
    seed: int
    shuffle: bool = True
    mode: str = "epoch"
    success_ema: float = 0.5
    epoch: int = 0
    position: int = 0
    draws: int = 0
    success: dict[int, float] = field(default_factory=dict)

    def _order(self) -> list[int]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(self.seed * 100003 + self.epoch).shuffle(order)
        if self.mode == "curriculum":  # easy to hard; the shuffle above orders prompts of equal difficulty
            order.sort(key=lambda i: float(self.rows[i].extra_info["difficulty"]))
        return order

    def check(self) -> None:
        """Fail early, naming a row, when the sampling mode needs data the rows lack."""
        if self.mode == "curriculum":
            for row in self.rows:
                value = row.extra_info.get("difficulty")
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise DataError(
                        f"data.sampling=curriculum needs a numeric extra_info.difficulty in every row; row {row.index} "
                        f"({row.extra_info.get('source', row.data_source)}) has {value!r}"
                    )

    def next(self, n: int) -> list[PromptRow]:
        if self.mode == "prioritized":
            return [self.rows[i] for i in self.draw_indices(n)]
        out: list[PromptRow] = []
        order = self._order()
        while len(out) < n:
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order()
            out.append(self.rows[order[self.position]])
            self.position += 1
        return out

    def weights(self) -> torch.Tensor:
        """Current draw probabilities over the rows (prioritized mode)."""
        w = torch.tensor([1.0 - self.success.get(i, 0.0) for i in range(len(self.rows))], dtype=torch.float64)
        return w / w.sum() if w.sum() > 0 else torch.full_like(w, 1.0 / len(w))

    def draw_indices(self, n: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.draws)
        self.draws += 1
        return torch.multinomial(self.weights(), n, replacement=True, generator=generator).tolist()

    def update(self, accuracy_by_row: dict[int, float]) -> None:
        """Fold a step's per-prompt accuracy (row index -> share of its samples judged correct) into the rates."""
        for i, acc in accuracy_by_row.items():
            old = self.success.get(i)
            self.success[i] = acc if old is None else (1 - self.success_ema) * old + self.success_ema * acc

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "draws": self.draws,
            "success": {str(k): v for k, v in self.success.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.draws = int(state.get("draws", 0))
        self.success = {int(k): float(v) for k, v in state.get("success", {}).items()}
