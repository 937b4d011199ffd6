"""The default task through the OpenAI-compatible endpoint against the in-process agent loop: tokens/s, requests/s.

    python benchmarks/agent_endpoint.py                        # 16 prompts x 8 samples, 3 rounds each
    python benchmarks/agent_endpoint.py --prompts 16 --rounds 3 --json out.json

One `RolloutWorker` (the class the Ray actor wraps, here in-process) with the default job's policy (warm-started as
`configs/calculator.yaml` builds it; cached) generates one RL step's rollouts of the calculator task twice over:

- `in-process loop`: the built-in `calculator` environment driven by the agent loop (`rollouts.agent_loop`),
- `endpoint + openai agent`: `examples/calculator_agent.py`, the same tool loop written with the `openai` package,
  each request an HTTP round trip to the worker's endpoint (`rollouts.endpoint`), stitched into trajectories.

Both sample from the same engine at the same temperature; the rows report tokens generated per second, model
requests (assistant turns) per second, the wall time of a step, and tokens per CPU second of the process (every
thread: the HTTP server, the agents and the engine), which a machine shared with other jobs distorts less than the
wall clock; medians over the rounds after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from rl.config import load_config
from rl.loop.data import builtin_rows, to_prompt_row
from rl.policy.warmstart import prepare_policy
from rollouts.worker import RolloutWorker

ROOT = Path(__file__).resolve().parents[1]
AGENT = f"{ROOT / 'examples' / 'calculator_agent.py'}:run"


def measure(worker: RolloutWorker, rows: list, samples: int, rounds: int) -> dict[str, float]:
    runs = []
    for i in range(rounds + 1):
        start, cpu = time.perf_counter(), time.process_time()
        trajectories = worker.generate_step(rows, list(range(len(rows))), samples, 0)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        if i:  # the first round warms the engine's cache allocation and the renderer's memo
            tokens = sum(t.response_length for t in trajectories)
            requests = sum(t.num_turns for t in trajectories)
            runs.append((wall, tokens / wall, requests / wall, tokens / cpu))
    return {
        "step_s": statistics.median(r[0] for r in runs),
        "tokens_per_s": statistics.median(r[1] for r in runs),
        "requests_per_s": statistics.median(r[2] for r in runs),
        "tokens_per_cpu_s": statistics.median(r[3] for r in runs),
        "failed": float(sum(t.error is not None for t in trajectories)),
        "turns_per_sample": sum(t.num_turns for t in trajectories) / len(trajectories),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    base = load_config(ROOT / "configs" / "calculator.yaml", [])
    policy = prepare_policy(base, log=print)
    rows = [to_prompt_row(i, r) for i, r in enumerate(builtin_rows("calculator", args.prompts, 7, "eval"))]
    results = {}
    for label, overrides in (
        ("in-process loop", []),
        ("endpoint + openai agent", [f"env.name={AGENT}", "reward.functions=[]"]),
    ):
        cfg = load_config(ROOT / "configs" / "calculator.yaml", overrides)
        worker = RolloutWorker(str(policy), cfg.worker_spec(), 0)
        results[label] = measure(worker, rows, args.samples, args.rounds)
        if worker.agents is not None:
            worker.agents.endpoint.stop()
    head = f"{'':26} {'step s':>8} {'tokens/s':>9} {'requests/s':>11} {'tokens/CPU s':>13} {'turns/sample':>13}"
    print(head + f" {'failed':>7}")
    for label, r in results.items():
        print(
            f"{label:26} {r['step_s']:8.2f} {r['tokens_per_s']:9.0f} {r['requests_per_s']:11.1f} "
            f"{r['tokens_per_cpu_s']:13.0f} {r['turns_per_sample']:13.2f} {r['failed']:7.0f}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
