"""Sharded vs replicated learners: update time per step and what each learner holds of parameters, gradients and
optimizer state (`trainer.sharding`, rl/trainer/sharding.py).

    python benchmarks/sharded.py                    # the default job's policy, 2 learners, 6 updates per row
    python benchmarks/sharded.py --steps 8 --json out.json

Each row starts 2 learner processes (torch.multiprocessing, gloo: the same `Learner.init_distributed` the Ray actors
call, without Ray's start-up) on the default job's model built from its config (`configs/calculator.yaml`, no warm
start: the update's cost does not depend on what the weights learned), INT4-aware (QAT on the routed experts), 1
torch thread per learner, and trains them on the same synthetic batches of the default job's size (16 prompts x 8
samples, prompts of 24 tokens, completions of 8-40). Printed: mean seconds per update (the first left out), and
per learner the bytes of parameters, gradients and optimizer state it holds, and their sum relative to a replica.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from rl.config import load_config
from rl.policy.warmstart import prepare_policy
from rl.trainer.batch import TrainBatch

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["logging.progress=false", "warm_start.enabled=false", "quant.enabled=true", "trainer.learner_threads=1"]


def batches(steps: int, vocab: int) -> list[TrainBatch]:
    """The default job's batch shape: 16 prompts x 8 samples, a shared 24-token prompt per group."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        n, prompt, width = 128, 24, 64
        lengths = prompt + torch.randint(8, width - prompt + 1, (n,), generator=g)
        ids = torch.randint(1, vocab, (n, width), generator=g)
        ids[:, :prompt] = ids[::8, :prompt].repeat_interleave(8, 0)
        attn = (torch.arange(width)[None] < lengths[:, None]).long()
        loss_mask = attn.float()
        loss_mask[:, :prompt] = 0
        adv = torch.randn(n, 1, generator=g).expand(n, width) * loss_mask
        logp = -torch.rand(n, width, generator=g) * loss_mask
        out.append(TrainBatch(ids * attn, attn, loss_mask, logp, adv.contiguous(), torch.zeros(n, dtype=torch.long)))
    return out


def learner(rank: int, port: int, policy: str, sharding: str, steps: int, queue) -> None:
    from rl.trainer.learner import Learner

    cfg = load_config(
        ROOT / "configs" / "calculator.yaml", [*OVERRIDES, "trainer.num_learners=2", f"trainer.sharding={sharding}"]
    )
    lrn = Learner(policy, cfg.learner_spec())
    lrn.init_distributed(rank, 2, "127.0.0.1", port)
    times = []
    for batch in batches(steps, int(lrn.model.config.vocab_size)):
        start = time.perf_counter()
        lrn.train_step(batch.shard(2)[rank])
        times.append(time.perf_counter() - start)
    queue.put((rank, times, lrn.held_bytes()))


def row(policy: str, sharding: str, steps: int) -> dict[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=learner, args=(r, port, policy, sharding, steps, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (t, h)) for r, t, h in (queue.get() for _ in procs))
    for p in procs:
        p.join()
    times, held = results[0][0], [results[r][1] for r in (0, 1)]
    return {
        "update_s": statistics.mean(times[1:]),
        **{f"rank{r}_{k}_bytes": float(v) for r in (0, 1) for k, v in held[r].items()},
        **{f"rank{r}_total_bytes": float(sum(held[r].values())) for r in (0, 1)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    policy = str(prepare_policy(load_config(ROOT / "configs" / "calculator.yaml", OVERRIDES), log=lambda *_: None))
    results = {sharding: row(policy, sharding, args.steps) for sharding in ("replicate", "fsdp")}
    replica = results["replicate"]["rank0_total_bytes"]
    print(f"{'':10} {'update':>9} {'params/rank':>14} {'grads/rank':>14} {'optimizer/rank':>16} {'vs replica':>11}")
    for sharding, r in results.items():
        parts = [f"{r[f'rank0_{k}_bytes'] / 1e6:.3f}/{r[f'rank1_{k}_bytes'] / 1e6:.3f} MB" for k in ("params", "grads")]
        opt = f"{r['rank0_optimizer_bytes'] / 1e6:.3f}/{r['rank1_optimizer_bytes'] / 1e6:.3f} MB"
        share = max(r["rank0_total_bytes"], r["rank1_total_bytes"]) / replica
        print(f"{sharding:10} {r['update_s']:8.3f}s {parts[0]:>14} {parts[1]:>14} {opt:>16} {share:10.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
