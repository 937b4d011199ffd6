"""Step time of the synchronous loop vs the async pipeline (`rollout.max_staleness` 0 vs 1), each stage's time,
and held-out accuracy after the same steps.

    python benchmarks/async_overlap.py                      # the default job, 30 steps per mode
    python benchmarks/async_overlap.py --steps 12 --json out.json

Both modes run the default job (`configs/calculator.yaml`, the cached warm-started policy) on a fresh local Ray
instance, same seed, with one rollout worker (1 torch thread) and one learner (1 thread): on a 2-core machine
generation and the update each have a core, which is what overlapping needs (with both stages already using both
cores, running them at once only shares the cores). Generation time and training time are the synchronous run's
per-step means (`generate`; `score` + `advantages` + `update` + `sync`); the async step is compared with their
maximum. The first step is left out of the means (the pipeline's first step has nothing to overlap with).
Accuracy: held-out greedy and sampled (T=1) accuracy after the run, on the job's eval set.
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
TRAIN_STAGES = ("time_score_s", "time_advantages_s", "time_update_s", "time_sync_s")


def run(mode: int, steps: int, work: Path, extra: list[str]) -> dict:
    cfg = load_config(
        ROOT / "configs" / "calculator.yaml",
        [
            f"trainer.steps={steps}",
            "logging.progress=false",
            "trainer.checkpoint_every=0",
            f"rollout.max_staleness={mode}",
            "rollout.num_workers=1",
            "rollout.threads_per_worker=1",
            "trainer.learner_threads=1",
            *extra,
        ],
    )
    out = work / f"staleness{mode}"
    evals = train(cfg, out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:] if len(rows) > 1 else rows
    mean = lambda key: sum(r.get(key, 0.0) for r in timed) / len(timed)  # noqa: E731
    return {
        "step_s": mean("time_step_s"),
        "generate_s": mean("time_generate_s"),
        "train_s": sum(mean(k) for k in TRAIN_STAGES),
        "policy_lag_mean": mean("policy_lag_mean"),
        "reward_last5": sum(r["reward_mean"] for r in rows[-5:]) / len(rows[-5:]),
        "greedy_before": evals["before"]["accuracy"],
        "greedy_after": evals["after"]["accuracy"],
        "sampled_before": evals["before"].get("accuracy_sampled"),
        "sampled_after": evals["after"].get("accuracy_sampled"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="extra config overrides for both runs (key=value)")
    args = parser.parse_args()

    prepare_policy(load_config(ROOT / "configs" / "calculator.yaml", ["logging.progress=false"]))
    work = Path(tempfile.mkdtemp(prefix="tiderl-async-bench-"))
    sync, async_ = run(0, args.steps, work, args.overrides), run(1, args.steps, work, args.overrides)
    bound = max(sync["generate_s"], sync["train_s"])
    print(f"{'':<26}{'step s':>8}{'generate s':>12}{'train s':>9}{'lag':>6}{'greedy':>14}{'sampled':>14}")
    for name, r in (("synchronous (staleness 0)", sync), ("async (staleness 1)", async_)):
        print(
            f"{name:<26}{r['step_s']:>8.2f}{r['generate_s']:>12.2f}{r['train_s']:>9.2f}{r['policy_lag_mean']:>6.2f}"
            f"{r['greedy_before']:>7.3f}→{r['greedy_after']:.3f}{r['sampled_before']:>7.3f}→{r['sampled_after']:.3f}"
        )
    print(
        f"async step / max(generate, train) of the synchronous run = {async_['step_s']:.2f} / {bound:.2f} = "
        f"{async_['step_s'] / bound:.2f}x "
        f"(target <= 1.15x); async / sync step = {async_['step_s'] / sync['step_s']:.2f}x"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"steps": args.steps, "sync": sync, "async": async_, "async_over_bound": async_["step_s"] / bound},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
