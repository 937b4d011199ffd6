"""Time per RL step with 1 vs 2 rollout workers and 1 vs 2 data-parallel learners, and the weight-sync time per push.

    python benchmarks/scale_out.py                  # the default job, 6 steps per row
    python benchmarks/scale_out.py --steps 8 --json out.json

Every row runs the default job (`configs/calculator.yaml`: 16 prompts x 8 samples, INT4-aware, the cached
warm-started policy) on a fresh local Ray instance, eval off, with the same total torch threads: each rollout
worker generates with one thread, and the learner side gets `--learner-threads` threads in all, split over the
learners (so 2 learners run 1 thread each on a 2-core machine). Printed: mean seconds per step and per stage,
the first step left out (warm-up), and each row's step time relative to 1 worker + 1 learner. `sync` is one
weight push: rank 0 packs its weights (routed experts as INT4), puts them in the object store once, and every
rollout worker loads them; the last row pushes by collective broadcast instead (`cluster.weight_sync=collective`,
gloo on the CPU).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from rl.config import load_config
from rl.loop.controller import train
from rl.policy.warmstart import prepare_policy

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("time_step_s", "time_generate_s", "time_update_s", "time_sync_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--learner-threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    prepare_policy(load_config(ROOT / "configs" / "calculator.yaml", ["logging.progress=false"]))
    work = Path(tempfile.mkdtemp(prefix="tiderl-scale-bench-"))
    results: dict[str, dict[str, float]] = {}
    for workers, learners, sync in (
        (1, 1, "object_store"),
        (2, 1, "object_store"),
        (1, 2, "object_store"),
        (2, 2, "object_store"),
        (2, 1, "collective"),
    ):
        name = f"{workers} worker{'s' if workers > 1 else ''}, {learners} learner{'s' if learners > 1 else ''}" + (
            ", broadcast" if sync == "collective" else ""
        )
        cfg = load_config(
            ROOT / "configs" / "calculator.yaml",
            [
                f"trainer.steps={args.steps}",
                "eval.enabled=false",
                "logging.progress=false",
                "trainer.checkpoint_every=0",
                f"rollout.num_workers={workers}",
                "rollout.cpus_per_worker=0.5",
                "rollout.threads_per_worker=1",
                f"trainer.num_learners={learners}",
                "trainer.learner_cpus=0.5",
                f"trainer.learner_threads={max(1, args.learner_threads // learners)}",
                f"cluster.weight_sync={sync}",
                "cluster.num_cpus=4",  # logical CPUs: every row's actors fit; the cores are what they share
            ],
        )
        run = work / f"w{workers}-l{learners}-{sync}"
        train(cfg, run)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1:]
        results[name] = {k: sum(r[k] for r in rows) / len(rows) for k in STAGES}
        results[name]["sync_bytes"] = json.loads((run / "weight_sync.json").read_text())
    base = results["1 worker, 1 learner"]["time_step_s"]
    print(f"{'':<35}{'step s':>8}{'generate s':>12}{'update s':>10}{'sync s':>9}{'vs 1+1':>8}")
    for name, r in results.items():
        print(
            f"{name:<35}{r['time_step_s']:>8.2f}{r['time_generate_s']:>12.2f}{r['time_update_s']:>10.2f}"
            f"{r['time_sync_s']:>9.3f}{r['time_step_s'] / base:>8.2f}"
        )
    sizes = next(iter(results.values()))["sync_bytes"]
    print(f"one push: {sizes['int4_bytes'] / 1e6:.2f} MB INT4 + {sizes['dense_bytes'] / 1e6:.2f} MB dense weights")
    if args.json:
        args.json.write_text(
            json.dumps({"steps": args.steps, "learner_threads": args.learner_threads, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
