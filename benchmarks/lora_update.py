"""The learner's update, full parameters vs LoRA (`trainer.lora`), on one batch of the default job.

    python benchmarks/lora_update.py                 # configs/calculator.yaml, 16 prompts x 8 samples, 6 rounds

One rollout worker generates a batch of the calculator task from the job's starting policy (its cached warm
start), scored and given GRPO advantages; one learner per variant then trains on that same batch, the variants
taking turns each round, so a machine shared with other work slows them alike. Printed: the median update time
over the rounds after the first (which pays for allocations) and every round's time, and each variant's bytes per
weight push. See docs/lora.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from envs.base import PromptRow
from rewards.scoring import RewardScorer
from rl.config import load_config
from rl.loop.data import to_prompt_row
from rl.policy.warmstart import prepare_policy
from rl.tasks.calculator import make_rows
from rl.trainer.advantages import grpo
from rl.trainer.batch import TrainBatch
from rl.trainer.learner import Learner
from rollouts.worker import RolloutWorker

VARIANTS = {
    "full parameters": [],
    "LoRA rank 8, all targets": ["trainer.lora.rank=8", "trainer.lr=2e-3"],
    "LoRA rank 8, self_attn": ["trainer.lora.rank=8", "trainer.lora.targets=[self_attn]", "trainer.lr=2e-3"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/calculator.yaml")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()

    cfgs = {name: load_config(args.config, ["logging.progress=false", *o]) for name, o in VARIANTS.items()}
    first = next(iter(cfgs.values()))
    policy = str(prepare_policy(first, log=print))
    worker = RolloutWorker(policy, first.worker_spec(), 0)
    rows: list[PromptRow] = [to_prompt_row(i, r) for i, r in enumerate(make_rows(args.prompts, seed=1, split="train"))]
    scored = RewardScorer(first.reward).score(worker.generate(rows, first.rollout.samples_per_prompt)).scored
    rewards = torch.tensor([s.reward for s in scored])
    advantages = grpo(rewards, torch.tensor([s.trajectory.group_id for s in scored]))
    batch = TrainBatch.from_scored(scored, advantages, worker.renderer.pad_token_id)
    learners = {name: Learner(policy, cfg.learner_spec()) for name, cfg in cfgs.items()}
    times: dict[str, list[float]] = {name: [] for name in learners}
    for _ in range(args.rounds):
        for name, learner in learners.items():
            start = time.perf_counter()
            learner.train_step(batch)
            times[name].append(time.perf_counter() - start)
    print(f"{len(scored)} samples, {int(batch.attention_mask.sum())} tokens per update")
    for name, learner in learners.items():
        sync = learner.weight_sync_bytes()
        push = sync.get("lora_adapter_bytes", sync["int4_bytes"] + sync["dense_bytes"])
        median = statistics.median(times[name][1:])
        rounds = " ".join(f"{t:.2f}" for t in times[name])
        print(f"{name:28s} update median {median:.3f} s  (rounds: {rounds})  push {push / 1e6:.3f} MB")


if __name__ == "__main__":
    main()
