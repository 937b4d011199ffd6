"""Decode tokens/s of tiderl's rollout engine vs Hugging Face `generate` on the same model, prompts and lengths.

    python benchmarks/engine_vs_hf.py                         # the default job's policy, batch 1, 16, 64
    python benchmarks/engine_vs_hf.py --new-tokens 64 --json out.json

Both decode greedily from the same prompts (calculator task prompts rendered with the chat template; HF gets them
left-padded, the engine one cache slot each) for exactly `--new-tokens` tokens (no early stop: the stop token is
ignored on both sides, so both do the same work), one torch thread each, in full precision (fp32) and with the
INT4 rollout weights (routed experts, tiderl's INT4 modules, which HF `generate` runs too since they are ordinary
modules). Times include the prefill; best of `--repeats` rounds, the two sides alternating. The sequences are
checked to be identical. Printed:
tokens/s per batch size and the ratio engine / HF.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rl.config import load_config
from rl.loop.data import builtin_rows, to_prompt_row
from rl.policy.warmstart import prepare_policy
from rollouts.engine import Engine
from rollouts.int4 import convert_to_int4
from rollouts.model import load_policy
from rollouts.quant import QuantSpec, targeted_parameters
from rollouts.renderer import Renderer
from rollouts.worker import int4_kernel_settings

ROOT = Path(__file__).resolve().parents[1]


def hf_generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=None,
        use_cache=True,
    )
    return out[:, width:].tolist()


def timed_pair(first, second, repeats: int) -> tuple[float, object, float, object]:
    """Best wall time of each of two functions over `repeats` rounds, run alternately, so that the machine's
    drift over the run (shared cores) touches both sides alike."""
    best, results = [float("inf"), float("inf")], [None, None]
    for _ in range(repeats):
        for k, fn in enumerate((first, second)):
            start = time.perf_counter()
            results[k] = fn()
            best[k] = min(best[k], time.perf_counter() - start)
    return best[0], results[0], best[1], results[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    cfg = load_config(ROOT / "configs" / "calculator.yaml", ["logging.progress=false"])
    policy = prepare_policy(cfg)
    results: dict[str, dict[int, dict[str, float]]] = {}
    for weights in ("fp32", "int4"):
        model, tokenizer = load_policy(policy, cfg.model)
        if weights == "int4":
            spec = QuantSpec.from_config(cfg.quant)
            convert_to_int4(
                model, spec, targeted_parameters(model, spec), *int4_kernel_settings(cfg.quant, cfg.model.dtype)
            )
        renderer = Renderer(tokenizer)
        engine = Engine(
            model, renderer.pad_token_id, stop_token_id=-1
        )  # never stops early: both sides do the same work
        rows = [
            to_prompt_row(i, r)
            for i, r in enumerate(builtin_rows("calculator", max(args.batches), seed=3, split="eval"))
        ]
        results[weights] = {}
        for batch in args.batches:
            prompts = [renderer.prompt_ids(r.messages, None) for r in rows[:batch]]
            ours_s, ours, hf_s, hf = timed_pair(
                lambda: engine.generate(prompts, [args.new_tokens] * batch, 1.0, greedy=True),
                lambda: hf_generate(model, prompts, args.new_tokens, renderer.pad_token_id),
                args.repeats,
            )
            same = [g.token_ids for g in ours] == hf
            tokens = batch * args.new_tokens
            results[weights][batch] = {
                "engine_tok_s": tokens / ours_s,
                "hf_tok_s": tokens / hf_s,
                "ratio": hf_s / ours_s,
                "identical": same,
            }
            print(
                f"{weights:>5} batch {batch:>3}: engine {tokens / ours_s:8.0f} tok/s   HF generate "
                f"{tokens / hf_s:8.0f} tok/s   "
                f"ratio {hf_s / ours_s:5.2f}x   identical greedy tokens: {same}"
            )
    if args.json:
        args.json.write_text(json.dumps({"new_tokens": args.new_tokens, "results": results}, indent=2))


if __name__ == "__main__":
    main()
