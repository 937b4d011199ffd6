"""Build the default policy: tokenizer + tiny DeepseekV3 model + a short supervised warm start, cached.

The warm start fits generated demonstrations of the calculator task in which only `warm_start.tool_use_rate` of
the solutions call the tool; the rest answer unaided, which a tiny model cannot do reliably. The resulting policy
is imperfect on purpose: it mostly skips the tool, so its greedy accuracy is low, yet it sometimes calls the tool
and succeeds, which is the signal RL amplifies. The result is an ordinary HF directory cached under a hash of
everything that shaped it, so only the first job pays for it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from envs.calculator import CALC_TOOL, demonstration, make_calculator_rows
from rl.config import JobConfig
from rl.policy import CHAT_TEMPLATE, build_tiny_policy, save_policy
from transformers.utils.chat_template_utils import render_jinja_template
from rollouts.renderer import Renderer, assistant_ids

CACHE_FORMAT = 1  # bump when the recipe below changes in a way the config hash cannot see


def cache_root(cfg: JobConfig) -> Path:
    if cfg.warm_start.cache_dir:
        return Path(cfg.warm_start.cache_dir).expanduser()
    return Path(os.environ.get("TIDERL_CACHE", Path.home() / ".cache" / "tiderl")).expanduser()


def policy_key(cfg: JobConfig) -> str:
    shape = {
        "format": CACHE_FORMAT,
        "tiny": cfg.model.tiny.model_dump(),
        "warm_start": cfg.warm_start.model_dump(exclude={"cache_dir"}),
        "task": cfg.data.task,
        "seed": cfg.seed,
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def prepare_policy(cfg: JobConfig, log=print) -> Path:
    """The policy directory this job starts from: `model.path`, or the cached built-in policy (built if absent)."""
    if cfg.model.path:
        return Path(cfg.model.path)
    target = cache_root(cfg) / "policies" / f"tiny-k2-{cfg.data.task}-{policy_key(cfg)}"
    if (target / "config.json").is_file():
        log(f"using cached warm-started policy {target}")
        return target
    log(f"building the default policy (tokenizer, tiny DeepseekV3, warm start) into {target}")
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build_default_policy(cfg, tmp)
    tmp.replace(target) if not target.exists() else shutil.rmtree(tmp)
    return target


def _demonstrations(cfg: JobConfig, n: int, rng: random.Random) -> list[tuple[list[dict], list[dict]]]:
    """(prompt messages, assistant-side messages) pairs; the eval split's problems are never used."""
    rows = make_calculator_rows(n, seed=cfg.seed, split="warmstart")
    return [(row["prompt"], demonstration(row["extra_info"]["expression"], rng.random() < cfg.warm_start.tool_use_rate)) for row in rows]


def build_default_policy(cfg: JobConfig, out: Path) -> None:
    ws = cfg.warm_start
    rng = random.Random(cfg.seed)
    demos = _demonstrations(cfg, ws.num_demos, rng)
    model, tokenizer = build_tiny_policy(cfg.model.tiny, _template_texts(demos[:2000]), cfg.seed)
    renderer = Renderer(tokenizer)
    sequences = [_demo_tokens(renderer, prompt, turns) for prompt, turns in demos]
    if ws.enabled:
        supervised_warm_start(model, sequences, ws.steps, ws.batch_size, ws.lr, tokenizer.pad_token_id, cfg.seed)
    save_policy(model, tokenizer, out)


def _template_texts(demos: list[tuple[list[dict], list[dict]]]) -> list[str]:
    """Whole conversations rendered with the chat template: the tokenizer's training corpus."""
    conversations = [prompt + turns for prompt, turns in demos]
    texts, _ = render_jinja_template(conversations, tools=[CALC_TOOL], chat_template=CHAT_TEMPLATE)
    return texts


def _demo_tokens(renderer: Renderer, prompt: list[dict], turns: list[dict]) -> tuple[list[int], list[float]]:
    """Token ids and loss mask of one demonstration, built piece by piece exactly as rollouts build them."""
    ids = renderer.prompt_ids(prompt, [CALC_TOOL])
    mask = [0.0] * len(ids)
    for message in turns:
        piece = assistant_ids(renderer, message) if message["role"] == "assistant" else renderer.observation_ids([message])
        ids += piece
        mask += [1.0 if message["role"] == "assistant" else 0.0] * len(piece)
    return ids, mask


def supervised_warm_start(
    model: torch.nn.Module, sequences: list[tuple[list[int], list[float]]], steps: int, batch_size: int, lr: float, pad_id: int, seed: int
) -> list[float]:
    """Masked next-token cross-entropy on the assistant tokens, AdamW with warmup + cosine decay. Returns losses."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    model.train()
    losses: list[float] = []
    start = time.time()
    columns = [TextColumn("warm start"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.3f}"), TimeElapsedColumn()]
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("warm start", total=steps, loss=float("nan"))
        for _ in range(steps):
            pick = torch.randint(len(sequences), (batch_size,), generator=gen).tolist()
            width = max(len(sequences[i][0]) for i in pick)
            ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
            mask = torch.zeros((batch_size, width))
            attn = torch.zeros((batch_size, width), dtype=torch.long)
            for row, i in enumerate(pick):
                seq, m = sequences[i]
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = torch.tensor(m)
                attn[row, : len(seq)] = 1
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()  # [b, t-1, vocab]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [b, t-1]
            loss = (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            progress.update(task, advance=1, loss=loss.item())
    model.eval()
    print(f"warm start: {steps} steps in {time.time() - start:.0f}s, final loss {sum(losses[-20:]) / min(20, len(losses)):.3f}")
    return losses
