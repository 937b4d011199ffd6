"""Prefix reuse across turns (`rollout.prefix_reuse`): one rollout worker generating the default job's batches with
it on and off, alternating in one run: seconds per batch, the tokens run through the model before the first new
token of each turn (prefill and extend), and the ratio.

    python benchmarks/prefix_reuse.py                      # 16 prompts x 8 samples, 4 batches per mode
    python benchmarks/prefix_reuse.py --rounds 6 --json out.json rollout.samples_per_prompt=4

The worker is the job's own (`rollouts.worker.RolloutWorker`, in this process, 1 torch thread) on the default
job's cached warm-started policy, INT4 rollouts, the calculator tool; each round generates the same prompts once
with reuse and once without (the order alternating), so both see the same episodes and the machine's noise
spreads over both. The samples are the same either way (counter-based sampling; a test pins the tokens).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from rl.config import load_config
from rl.loop.data import builtin_rows, to_prompt_row
from rl.policy.warmstart import prepare_policy
from rollouts.decoder import Decoder
from rollouts.worker import RolloutWorker

ROOT = Path(__file__).resolve().parents[1]


class PrefillCounter:
    """Counts the real (unpadded) tokens `Decoder.prefill` and `Decoder.extend` run, by wrapping both."""

    def __init__(self) -> None:
        self.tokens = {"prefill": 0, "extend": 0}
        prefill, extend = Decoder.prefill, Decoder.extend

        def counted_prefill(decoder, ids, lengths, slots):
            self.tokens["prefill"] += int(lengths.sum())
            return prefill(decoder, ids, lengths, slots)

        def counted_extend(decoder, ids, starts, lengths, rows):
            self.tokens["extend"] += int(lengths.sum())
            return extend(decoder, ids, starts, lengths, rows)

        Decoder.prefill, Decoder.extend = counted_prefill, counted_extend

    def take(self) -> dict[str, int]:
        out, self.tokens = self.tokens, {"prefill": 0, "extend": 0}
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="extra config overrides (key=value)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    base = load_config(ROOT / "configs" / "calculator.yaml", ["logging.progress=false", *args.overrides])
    policy = prepare_policy(base)
    n, k = base.trainer.prompts_per_step, base.rollout.samples_per_prompt
    rows = [
        to_prompt_row(i, r)
        for i, r in enumerate(builtin_rows(base.data.task, n * (args.rounds + 1), base.seed, "train"))
    ]
    counter = PrefillCounter()
    workers = {
        reuse: RolloutWorker(
            str(policy),
            load_config(
                ROOT / "configs" / "calculator.yaml", [*args.overrides, f"rollout.prefix_reuse={str(reuse).lower()}"]
            ).worker_spec(),
            0,
        )
        for reuse in (True, False)
    }
    for worker in workers.values():
        worker.generate(rows[:n], k)  # warm-up: allocations, first-call costs
    counter.take()
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for r in range(args.rounds):
        batch = rows[n * (r + 1) : n * (r + 2)]
        for reuse in (True, False) if r % 2 == 0 else (False, True):
            start = time.perf_counter()
            trajectories = workers[reuse].generate(batch, k)
            seconds = time.perf_counter() - start
            turns = sum(t.num_turns for t in trajectories) / len(trajectories)
            runs[reuse].append({"seconds": seconds, "turns_per_sample": turns, **counter.take()})

    def summary(reuse: bool) -> dict:
        rs = runs[reuse]
        return {
            "seconds_median": statistics.median(r["seconds"] for r in rs),
            "seconds_min": min(r["seconds"] for r in rs),
            "prefill_tokens": sum(r["prefill"] for r in rs) / len(rs),
            "extend_tokens": sum(r["extend"] for r in rs) / len(rs),
            "turns_per_sample": sum(r["turns_per_sample"] for r in rs) / len(rs),
        }

    on, off = summary(True), summary(False)
    print(
        f"\none rollout worker, {n} prompts x {k} samples per batch, {args.rounds} batches per mode (alternating), 1 "
        f"thread\n"
    )
    print("| | s / batch (median) | s / batch (min) | tokens prefilled | tokens extended | turns / sample |")
    print("|---|---|---|---|---|---|")
    for name, s in (("prefix reuse on", on), ("prefix reuse off", off)):
        print(
            f"| {name} | {s['seconds_median']:.3f} | {s['seconds_min']:.3f} | {s['prefill_tokens']:.0f} | "
            f"{s['extend_tokens']:.0f} | {s['turns_per_sample']:.2f} |"
        )
    speedup = off["seconds_median"] / on["seconds_median"]
    fed = (on["prefill_tokens"] + on["extend_tokens"]) / max(off["prefill_tokens"], 1)
    print(
        f"| off / on | **{speedup:.2f}x** | {off['seconds_min'] / on['seconds_min']:.2f}x | {fed:.2f}x the tokens run "
        f"| | |"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "on": on,
                    "off": off,
                    "speedup_median": speedup,
                    "tokens_run_ratio": fed,
                    "runs": {str(k): v for k, v in runs.items()},
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
