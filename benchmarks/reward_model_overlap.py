"""Step time with a reward model scoring asynchronously (overlapping generation) vs as a barrier after it, one run.

    python benchmarks/reward_model_overlap.py                 # the default job + a 2.2M-parameter classifier RM
    python benchmarks/reward_model_overlap.py --steps 6 --rm-layers 8 --json out.json

Both rows run the default job (`configs/calculator.yaml`: 2 rollout workers, 16 prompts x 8 samples, the cached
warm-started policy) for `--steps` RL steps with the same randomly initialized classifier reward model on its own
actor (`--rm-cpus` Ray CPUs; the local Ray instance gets one logical CPU more than the job's other actors take,
so on a 2-core machine the reward model competes with generation for the cores, as it would on a full node), eval off:

- `async`: rollout workers send each group to the reward model as soon as its 8 samples are done
  (`reward.models_async=true`); the score stage only collects results.
- `barrier`: the controller sends the whole batch after generation (`reward.models_async=false`).

Printed: mean seconds per step and per stage (generate, score, update), the first step left out (warm-up).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from rl.config import load_config
from rl.loop.controller import train
from rl.policy.warmstart import prepare_policy

ROOT = Path(__file__).resolve().parents[1]


def build_reward_model(policy_dir: Path, out: Path, layers: int, hidden: int) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(
        f"reward model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {layers} layers, hidden "
        f"{hidden}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rm-layers", type=int, default=2)
    parser.add_argument("--rm-hidden", type=int, default=256)
    parser.add_argument("--rm-cpus", type=float, default=0.5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    base = load_config(ROOT / "configs" / "calculator.yaml", ["logging.progress=false"])
    policy = prepare_policy(base)
    work = Path(tempfile.mkdtemp(prefix="tiderl-rm-bench-"))
    build_reward_model(policy, work / "rm", args.rm_layers, args.rm_hidden)
    model = (
        f"reward.models=[{{name: rm, kind: classifier, path: '{work / 'rm'}', num_cpus: {args.rm_cpus}, "
        "batch_size: 16, weight: 0.1}]"
    )
    results = {}
    for mode, flag in (("async", "true"), ("barrier", "false")):
        cfg = load_config(
            ROOT / "configs" / "calculator.yaml",
            [
                model,
                f"reward.models_async={flag}",
                f"trainer.steps={args.steps}",
                "eval.enabled=false",
                "logging.progress=false",
                "trainer.checkpoint_every=0",
                f"cluster.num_cpus={3 if args.rm_cpus <= 1 else 2 + int(args.rm_cpus + 0.999)}",
            ],
        )
        run = work / mode
        train(cfg, run)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1:]
        results[mode] = {
            k: sum(r[k] for r in rows) / len(rows)
            for k in ("time_step_s", "time_generate_s", "time_score_s", "time_update_s")
        }
    print(f"{'mode':<10}{'step s':>9}{'generate s':>12}{'score s':>10}{'update s':>10}")
    for mode, r in results.items():
        print(
            f"{mode:<10}{r['time_step_s']:>9.2f}{r['time_generate_s']:>12.2f}{r['time_score_s']:>10.2f}{r['time_update_s']:>10.2f}"
        )
    print(f"async / barrier step time: {results['async']['time_step_s'] / results['barrier']['time_step_s']:.3f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"steps": args.steps, "rm_layers": args.rm_layers, "rm_hidden": args.rm_hidden, "results": results},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
