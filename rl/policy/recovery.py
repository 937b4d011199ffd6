"""INT4 recovery: before RL, distil the INT4 (fake-quant) policy from the full-precision policy it starts from.

Why: quantizing a small pretrained model's linear layers to INT4 by rounding can cost most of what RL needs to
start from. SmolLM2-135M-Instruct answers 30% of the word problems greedily in full precision and 6% with every
linear layer but `lm_head` in INT4 (group 32, `docs/models.md`); sampled, the INT4 policy is almost never right, so
RL's group baselines see almost no reward to reinforce, and QAT's RL steps alone do not close the gap in a job's
budget. Recovery follows LLM-QAT's data-free distillation (Liu et al., 2023): the full-precision model writes the
data (its own samples on the job's training prompts, at the rollout temperature; no labels, no reward), and the INT4
student minimizes KL(teacher || student) on every sampled token over the whole vocabulary, through the same
straight-through fake-quant the QAT learner trains with. Recovery changes the master weights only; what the rollout
engine runs afterwards is still their INT4 round trip, the one `rollouts.quant` defines, and RL's step 0 evaluation
measures the recovered INT4 policy.

The result is an ordinary HF directory cached under a hash of everything that shaped it (model, quantization,
recovery settings, the prompts, the seed), so only the first job pays for it; `recovery.json` beside the weights
records the teacher samples' statistics and the KL by step.
"""

from __future__ import annotations

import copy
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch.func import functional_call

from envs.base import PromptRow
from rl.config import JobConfig
from rl.trainer.forward import compute_autocast, head_on_hidden_states, scoring_states, use_learner_attention
from rollouts.model import load_policy, save_policy
from rollouts.quant import QuantSpec, fake_quantize, targeted_parameters
from rollouts.records import Trajectory
from rollouts.shipping import cache_dir
from rollouts.worker import RolloutWorker

CACHE_FORMAT = 1  # bump when the recipe below changes in a way the config hash cannot see


def recovery_key(cfg: JobConfig, source: Path, rows: list[PromptRow]) -> str:
    """Hash of everything that shapes the recovered weights."""
    shape = {
        "format": CACHE_FORMAT,
        "source": str(source.resolve()),
        "model": cfg.model.model_dump(exclude={"path"}),
        "quant": cfg.quant.model_dump(exclude={"mode", "fake_quant_start_step"}),
        "recovery": cfg.int4_recovery.model_dump(),
        "temperature": cfg.rollout.temperature,
        "max_new_tokens_per_turn": cfg.rollout.max_new_tokens_per_turn,
        "prompts": [row.messages for row in rows],
        "seed": cfg.seed,
    }
    if cfg.trainer.compute_dtype != "float32":  # keyed only when set, so that fp32 recoveries keep their old keys
        shape["compute_dtype"] = cfg.trainer.compute_dtype
    engine = cfg.worker_spec().rollout.matmul_dtype  # the teacher's samples come from the engine
    if engine != "float32":
        shape["rollout_matmul_dtype"] = engine
    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recovered_config(cfg: JobConfig, policy_dir: Path) -> JobConfig:
    """The job's config with its model read from the recovered directory (plain safetensors: no GGUF file)."""
    model = cfg.model.model_copy(update={"path": str(policy_dir), "gguf_file": None})
    return cfg.model_copy(update={"model": model})


def recover_int4(cfg: JobConfig, source: Path, train_rows: list[PromptRow], log=print) -> Path:
    """The recovered policy's directory for this job (built and cached if absent)."""
    rc = cfg.int4_recovery
    rows = random.Random(cfg.seed).sample(train_rows, min(rc.prompts, len(train_rows)))
    name = Path(cfg.model.gguf_file or source.name).stem.replace(" ", "_")
    key = recovery_key(cfg, source, rows)
    target = cache_dir(cfg.warm_start.cache_dir) / "policies" / f"int4-recovered-{name}-{key}"
    if (target / "config.json").is_file():
        log(f"using cached INT4-recovered policy {target}")
        return target
    log(f"INT4 recovery: distilling the INT4 policy from full precision on {len(rows)} prompts into {target}")
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # In a child process: teacher, student, optimizer state and full-vocabulary logits peak at ~8 GB on a 135M model,
    # and memory freed inside a process mostly stays with it, so in the driver it would be held through the whole RL
    # job beside the learner and the rollout workers (a bf16 job was killed by Ray's memory monitor at its final
    # checkpoint so). Spawned, not forked: the driver may hold threads. Its errors re-raise here with their trace.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        report = pool.submit(_recover, cfg, source, rows, tmp).result()
    (tmp / "recovery.json").write_text(json.dumps(report, indent=2))
    log(
        f"INT4 recovery: {rc.steps} steps in {report['seconds']:.0f}s "
        f"(of which teacher samples {report['teacher_seconds']:.0f}s), "
        f"KL {report['kl_first']:.3f} -> {report['kl_last']:.3f}"
    )
    if target.exists():  # another job built the same policy meanwhile
        shutil.rmtree(tmp)
    else:
        tmp.replace(target)
    return target


def _teacher_samples(cfg: JobConfig, source: Path, rows: list[PromptRow]) -> list[Trajectory]:
    """The full-precision policy's own samples on `rows`, from the rollout engine, one per prompt."""
    full_precision = cfg.model_copy(update={"quant": cfg.quant.model_copy(update={"enabled": False})})
    worker = RolloutWorker(str(source), full_precision.worker_spec(), 0)
    samples = worker.generate(rows, 1, greedy=False, seed=cfg.seed + 7919)
    usable = [t for t in samples if t.error is None and t.response_length > 0]
    if not usable:
        raise RuntimeError("INT4 recovery: the full-precision policy produced no usable sample to distil from")
    return usable


def _recover(cfg: JobConfig, source: Path, rows: list[PromptRow], out: Path) -> dict:
    rc = cfg.int4_recovery
    start = time.perf_counter()
    samples = _teacher_samples(cfg, source, rows)
    teacher_seconds = time.perf_counter() - start
    torch.set_num_threads(cfg.trainer.learner_threads)
    torch.manual_seed(cfg.seed)
    teacher, tokenizer = load_policy(source, cfg.model)
    use_learner_attention(teacher)  # the learner's attention kernels (float32 under bf16 autocast on a CPU)
    student = copy.deepcopy(teacher)  # one load (a GGUF file is dequantized on every load)
    teacher.requires_grad_(False)
    spec = QuantSpec.from_config(cfg.quant)
    targets = targeted_parameters(student, spec)
    params = dict(student.named_parameters())
    optimizer = torch.optim.AdamW(params.values(), lr=rc.lr, weight_decay=0.0)
    order = random.Random(cfg.seed + 1)
    pad = tokenizer.pad_token_id
    head_on_hidden = head_on_hidden_states(teacher)
    kls: list[float] = []
    with Progress(
        TextColumn("INT4 recovery"), BarColumn(), TextColumn("{task.completed}/{task.total} KL {task.fields[kl]}"),
        TimeElapsedColumn(), disable=not cfg.logging.progress,
    ) as progress:  # fmt: skip
        bar = progress.add_task("recovery", total=rc.steps, kl="-")
        for step in range(rc.steps):
            lr_scale = 1.0 - step / rc.steps  # linear decay to zero: the last steps settle on the INT4 grid
            for group in optimizer.param_groups:
                group["lr"] = rc.lr * lr_scale
            batch = order.sample(samples, min(rc.batch_size, len(samples)))
            optimizer.zero_grad(set_to_none=True)
            tokens = sum(t.response_length for t in batch)
            kl_sum = 0.0
            # The step's fake-quant weights, computed once and held as leaves: the micro-batches (one micro-batch's
            # full-vocabulary logits in memory at a time) accumulate their gradients there, and the straight-through
            # estimator hands the sum to the master weights unchanged, as the QAT learner does.
            swapped = {name: fake_quantize(params[name].detach(), spec).requires_grad_() for name in targets}
            ordered = sorted(batch, key=lambda t: len(t.token_ids))  # similar lengths together: less padding
            for first in range(0, len(ordered), rc.micro_batch_size):
                micro = ordered[first : first + rc.micro_batch_size]
                with compute_autocast(cfg.trainer.compute_dtype, torch.device("cpu")):  # the learner's, here too
                    kl = _kl_sum(teacher, student, swapped, micro, pad, head_on_hidden)
                (kl / tokens).backward()
                kl_sum += kl.item()
            for name, leaf in swapped.items():
                params[name].grad = leaf.grad
            torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
            optimizer.step()
            kls.append(kl_sum / tokens)
            progress.update(bar, advance=1, kl=f"{kls[-1]:.3f}")
    student.eval()
    save_policy(student, tokenizer, out)
    finished = [t for t in samples if t.status.value == "finished"]
    return {
        "steps": rc.steps,
        "teacher_samples": len(samples),
        "teacher_finished_fraction": len(finished) / len(samples),
        "teacher_seconds": teacher_seconds,
        "seconds": time.perf_counter() - start,
        "kl_first": kls[0],
        "kl_last": sum(kls[-5:]) / len(kls[-5:]),
        "kl_by_step": kls,
    }


def _kl_sum(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    swapped: dict[str, torch.Tensor],
    batch: list[Trajectory],
    pad: int,
    head_on_hidden: bool,
) -> torch.Tensor:
    """Sum over the batch's sampled tokens of KL(teacher || INT4 student), over the whole vocabulary.

    With `head_on_hidden` (the model's logits are its output embedding of its last hidden state; checked once),
    the output embedding runs on the sampled tokens' states only, as the RL learner's does: prompts are about half
    of each sequence here, and the [tokens, vocabulary] logits and their KL are most of a step's memory and
    elementwise work. Otherwise the whole sequences' logits, masked."""
    length = max(len(t.token_ids) for t in batch)
    ids = torch.full((len(batch), length), pad, dtype=torch.long)
    attention = torch.zeros(len(batch), length, dtype=torch.long)
    where = torch.zeros(len(batch), length)
    for k, t in enumerate(batch):
        n = len(t.token_ids)
        ids[k, :n], attention[k, :n], where[k, :n] = t.token_ids, 1, t.loss_mask
    student_forward = lambda **kwargs: functional_call(student, swapped, args=(), kwargs=kwargs, strict=False)  # noqa: E731
    if head_on_hidden:
        with torch.no_grad():
            states, _ = scoring_states(teacher, ids, attention, where)
            teacher_logp = torch.log_softmax(teacher.get_output_embeddings()(states).float(), dim=-1)
        states, _ = scoring_states(student_forward, ids, attention, where)
        student_logp = torch.log_softmax(student.get_output_embeddings()(states).float(), dim=-1)
        return (teacher_logp.exp() * (teacher_logp - student_logp)).sum()
    inputs = {"input_ids": ids, "attention_mask": attention}
    with torch.no_grad():
        teacher_logp = torch.log_softmax(teacher(**inputs).logits[:, :-1].float(), dim=-1)
    student_logp = torch.log_softmax(student_forward(**inputs).logits[:, :-1].float(), dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)  # the token at t+1 is predicted at t
    return (kl * where[:, 1:]).sum()
