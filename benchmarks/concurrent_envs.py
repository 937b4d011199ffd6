"""Many environments with random latencies on one rollout worker: trajectories/s, in one run.

    python benchmarks/concurrent_envs.py                  # 64 environments, latency U(0, 200 ms) per reset and per call
    python benchmarks/concurrent_envs.py --envs 64 --max-latency 0.5 --json out.json

One `RolloutWorker` (the class the Ray actor wraps, here in-process) with the default job's policy warm-started
on demonstrations that all call the tool (`warm_start.tool_use_rate=1`, so episodes are multi-turn; built and
cached on first use, ~90 s) runs the calculator task behind an environment that sleeps a random time
in every reset and tool call, as a remote tool or a sandbox would. Rows, side by side:

- `concurrent`: all episodes at once, as a training step runs them (asyncio; generation batched over the episodes
  that are ready; environment calls overlap with each other and with generation),
- `concurrent, no latency`: the same with instant environments (the compute-bound floor),
- `one at a time`: the same episodes each run alone (no overlap; what a loop without concurrency would take).

`latency hidden` = 1 - (concurrent - no latency) / (sum of every episode's sleeps): the share of environment
waiting that concurrency took off the wall clock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import torch

from envs.calculator import CalculatorEnv
from envs.registry import register_env
from rl.config import load_config
from rl.loop.data import builtin_rows, to_prompt_row
from rl.policy.warmstart import prepare_policy
from rollouts.worker import RolloutWorker

ROOT = Path(__file__).resolve().parents[1]
SLEPT: list[float] = []


@register_env("bench_slow_calculator")
class SlowCalculator(CalculatorEnv):
    """The calculator behind a random latency in every reset and every step."""

    def __init__(self, max_latency_s: float = 0.2) -> None:
        self.max_latency_s = max_latency_s

    async def _wait(self) -> None:
        delay = random.uniform(0, self.max_latency_s)
        SLEPT.append(delay)
        await asyncio.sleep(delay)

    async def reset(self, row):
        await self._wait()
        return await super().reset(row)

    async def step(self, calls):
        await self._wait()
        return await super().step(calls)


def run(worker: RolloutWorker, rows, samples: int, first_group: int) -> tuple[float, list]:
    start = time.perf_counter()
    trajectories = worker.generate_step(
        rows, list(range(first_group, first_group + len(rows))), samples, iteration_budget=0
    )
    return time.perf_counter() - start, trajectories


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", type=int, default=64, help="concurrent environments (episodes)")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt (envs / samples prompts)")
    parser.add_argument("--max-latency", type=float, default=0.2, help="seconds; each reset and call sleeps U(0, this)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(0)

    def config(latency: float):
        return load_config(
            ROOT / "configs" / "calculator.yaml",
            [
                "env.name=bench_slow_calculator",
                f"env.kwargs={{max_latency_s: {latency}}}",
                "warm_start.tool_use_rate=1.0",
                f"rollout.threads_per_worker={args.threads}",
                "logging.progress=false",
            ],
        )

    policy = prepare_policy(config(0.0))
    rows = [to_prompt_row(i, r) for i, r in enumerate(builtin_rows("calculator", args.envs // args.samples, 7, "eval"))]
    slow, instant = (
        RolloutWorker(str(policy), config(args.max_latency).worker_spec(), 0),
        RolloutWorker(str(policy), config(0.0).worker_spec(), 0),
    )
    run(instant, rows[:1], 2, 10_000)  # warm-up: first-call allocations and kernel selection

    results = {}
    SLEPT.clear()
    results["concurrent"], trajs = run(slow, rows, args.samples, 0)
    slept_concurrent = sum(SLEPT)
    results["concurrent, no latency"], _ = run(instant, rows, args.samples, 1000)
    SLEPT.clear()
    one_by_one = 0.0
    for i, row in enumerate(rows):
        for k in range(args.samples):
            seconds, _ = run(slow, [row], 1, 2000 + i * args.samples + k)
            one_by_one += seconds
    results["one at a time"] = one_by_one
    n = len(rows) * args.samples
    assert len(trajs) == n, f"{len(trajs)} of {n} trajectories came back"

    calls = sum(t.num_tool_calls for t in trajs) / n
    hidden = 1 - (results["concurrent"] - results["concurrent, no latency"]) / max(slept_concurrent, 1e-9)
    print(
        f"{n} episodes, latency U(0, {args.max_latency * 1000:.0f} ms) per reset and per call, {calls:.2f} tool calls "
        f"per episode, "
        f"sum of sleeps {slept_concurrent:.1f} s"
    )
    print(f"{'run':<24}{'wall s':>9}{'traj/s':>9}{'vs one at a time':>18}")
    for name, seconds in results.items():
        print(f"{name:<24}{seconds:>9.2f}{n / seconds:>9.1f}{results['one at a time'] / seconds:>17.1f}x")
    print(f"latency hidden by concurrency: {hidden:.0%}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "episodes": n,
                    "max_latency_s": args.max_latency,
                    "tool_calls_per_episode": calls,
                    "seconds": results,
                    "trajectories_per_s": {k: n / v for k, v in results.items()},
                    "latency_hidden": hidden,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
