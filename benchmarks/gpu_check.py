"""The GPU check: tiderl's GPU code paths, measured in one run of a few minutes on a CUDA machine that has torch,
transformers (and accelerate, peft, triton) but no Ray. Run it as `benchmarks/gpu_check.sh` (docs/speed.md "GPU
check"); `--cpu-dry-run` runs the same code at tiny sizes on the CPU (tests/test_gpu_check.py).

Sections, each a line in the terminal and an entry of the JSON report (a section that fails is reported as failed
and the others still run; the exit status is 1 then):

1. `int4_layout`: our symmetric INT4 grid through torch's tinygemm kernel (`rollouts.int4.Int4Matmul`, which packs
   for `torch._weight_int4pack_mm` on CUDA). Identity activations read the kernel's weight back, which must equal
   `dequantize(q, scale, bf16)` bit for bit (the layout and zero-point convention are right, see rollouts/int4.py);
   random activations give the error against an fp32 product with that weight.
2. `int4_matvec`: one batch-1 product with a large weight, bf16 `F.linear` against the INT4 kernel: time per call,
   bytes the kernel reads, achieved GB/s and the fraction of the memory-bandwidth roofline (`--peak-gbps`, H200
   ~4800).
3. `decode`: the rollout engine (`rollouts.engine.Engine`) decoding a ~1B-parameter K2-style MoE
   (`benchmarks/int4_decode.py`'s 1b preset) with bf16 weights and with every linear weight INT4: tokens/s at
   batch 1 and 16, and the roofline fraction (weight bytes a decode step reads x steps/s / peak).
4. `engine_vs_hf`: the engine against Hugging Face `generate` on the same bf16 model, prompts and lengths (greedy,
   no stop token): tokens/s, and how many sequences came out identical (bf16 kernels may break ties differently).
5. `learner`: the default job's recipe on a larger built-in policy: the INT4 rollout engine samples a batch, and
   the QAT learner (`rl.trainer.learner.Learner`, fake-quant with straight-through gradients, on the GPU) takes
   two updates on it. Reported: time per update and the INT4 rollout-vs-learner mismatch of the first update
   (mean |Δ logp| and KL over the sampled tokens, before any update), and its quantization part
   (`mismatch_quant_abs_logp`), for an fp32 and a bf16 learner.

Nothing here imports Ray: the check installs an import hook that refuses it, so a module that pulls Ray fails here,
on the CPU, rather than on the GPU machine. Packages the GPU machine lacks come as wheels in `.gpu_wheels/`
(`gpu_check.sh --fetch-wheels`, listed in benchmarks/gpu_wheels.txt), unpacked onto sys.path when missing.
"""

from __future__ import annotations

import argparse
import copy
import importlib.abc
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# sizes: (n, k, group) weights for the layout check; the matvec weight; the decode model; the learner's policy
GPU = {
    "layout": [(4096, 4096, 32), (14336, 4096, 32), (4096, 14336, 32), (2048, 7168, 128), (256, 96, 32)],
    "matvec": (28672, 8192),
    "decode": dict(
        hidden_size=2048,
        num_hidden_layers=12,
        n_routed_experts=16,
        moe_intermediate_size=1024,
        intermediate_size=4096,
        num_attention_heads=16,
        kv_lora_rank=512,
        q_lora_rank=768,
        vocab_size=32768,
    ),
    "batches": [1, 16],
    "new_tokens": 64,
    "learner": dict(
        hidden_size=1024, num_layers=8, num_heads=16, n_routed_experts=16, moe_intermediate_size=512, vocab_size=2048
    ),
    "learner_batch": (32, 24, 160),  # sequences, prompt tokens, new tokens
    "peak_gbps": 4800.0,
    "repeats": 3,
}
CPU = {
    "layout": [(64, 128, 32), (32, 256, 64)],
    "matvec": (256, 512),
    "decode": dict(
        hidden_size=128,
        num_hidden_layers=2,
        n_routed_experts=4,
        moe_intermediate_size=64,
        intermediate_size=256,
        num_attention_heads=2,
        kv_lora_rank=32,
        q_lora_rank=None,
        vocab_size=512,
    ),
    "batches": [1, 2],
    "new_tokens": 4,
    "learner": dict(
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        n_routed_experts=4,
        moe_intermediate_size=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        vocab_size=320,
    ),
    "learner_batch": (4, 8, 8),
    "peak_gbps": 24.0,
    "repeats": 1,
}


class _NoRay(importlib.abc.MetaPathFinder):
    """Refuse `import ray`: the GPU machine has no Ray, and this check must not need it."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(
                f"the GPU check imports no Ray (the GPU machine has none), yet {name!r} was asked"
            )
        return None


def use_carried_wheels(wheel_dir: Path) -> list[str]:
    """Unpack each wheel of `wheel_dir` whose top-level packages this machine lacks into a directory put first on
    sys.path. A wheel is a zip laid out as site-packages, so no pip is needed; a package the machine has is used as
    it is."""
    target = Path(tempfile.mkdtemp(prefix="tiderl-gpu-check-site-"))
    used = []
    for wheel in sorted(wheel_dir.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            tops = {
                name.split("/")[0].removesuffix(".py")
                for name in archive.namelist()
                if not name.split("/")[0].endswith((".dist-info", ".data"))
            }
            if all(importlib.util.find_spec(top) is not None for top in tops):
                continue
            archive.extractall(target)
            used.append(wheel.name)
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    return used


def timed(fn: Callable[[], Any], iters: int, device: Any) -> float:
    """Seconds per call of `fn`, after warm-up (CUDA: synchronized around the loop)."""
    import torch

    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def int4_layout(device, sizes: dict) -> dict:
    import torch

    from rollouts.int4 import Int4Matmul
    from rollouts.quant import ALL_LINEAR, PackedInt4, QuantSpec

    rows = []
    for n, k, group in sizes["layout"]:
        torch.manual_seed(0)
        packed = PackedInt4.from_weight(
            torch.randn(n, k, device=device) * 0.02, QuantSpec(group_size=group, targets=ALL_LINEAR)
        )
        matmul = Int4Matmul(packed, torch.bfloat16, None)
        reference = packed.dequantize(torch.bfloat16)  # [n, k]: round_bf16(q * scale), the bf16 fake-quant weight
        read_back = matmul(torch.eye(k, dtype=torch.bfloat16, device=device)).T  # row i of I picks input channel i
        x = torch.randn(8, k, dtype=torch.bfloat16, device=device)
        y, exact = matmul(x).float(), x.float() @ reference.float().T
        rows.append(
            {
                "shape": [n, k],
                "group": group,
                "kernel": matmul.kernel_weight is not None,
                "weight_exact": bool(torch.equal(read_back, reference)),
                "max_rel_err": float((y - exact).abs().max() / exact.abs().max()),
            }
        )
    ok = all(r["weight_exact"] for r in rows) and all(r["kernel"] for r in rows)
    return {"ok": ok, "shapes": rows}


def int4_matvec(device, sizes: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from rollouts.int4 import Int4Matmul
    from rollouts.quant import ALL_LINEAR, PackedInt4, QuantSpec

    n, k = sizes["matvec"]
    torch.manual_seed(0)
    weight = torch.randn(n, k, device=device) * 0.02
    dense = weight.to(torch.bfloat16)
    matmul = Int4Matmul(PackedInt4.from_weight(weight, QuantSpec(targets=ALL_LINEAR)), torch.bfloat16, None)
    del weight
    x = torch.randn(1, k, dtype=torch.bfloat16, device=device)
    iters = 50 if device.type == "cuda" else 5
    out = {"shape": [n, k], "kernel": matmul.kernel_weight is not None}
    int4_bytes = matmul.kernel_weight.numel() * matmul.kernel_weight.element_size() + (
        matmul.scales_and_zeros.numel() * matmul.scales_and_zeros.element_size()
    )
    for name, fn, nbytes in (
        ("bf16", lambda: F.linear(x, dense), dense.numel() * 2),
        ("int4", lambda: matmul(x), int4_bytes),
    ):
        seconds = timed(fn, iters, device)
        out[name] = {
            "us": seconds * 1e6,
            "mb_read": nbytes / 1e6,
            "gbps": nbytes / seconds / 1e9,
            "roofline": nbytes / seconds / 1e9 / sizes["peak_gbps"],
        }
    out["speedup"] = out["bf16"]["us"] / out["int4"]["us"]
    return out


def build_decode_model(device, sizes: dict):
    """A random K2-style MoE in bf16 on `device`, configured as benchmarks/int4_decode.py builds its presets."""
    import torch
    from int4_decode import k2_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = k2_config(sizes["decode"])
    with torch.device(device):  # built in fp32 and cast, as int4_decode.py does: every buffer becomes bf16 too
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(torch.bfloat16).eval()


def decode(device, sizes: dict, model) -> dict:
    import torch
    from int4_decode import decode_tokens_per_s, weight_bytes_per_step

    from rollouts.int4 import convert_to_int4
    from rollouts.quant import ALL_LINEAR, QuantSpec, targeted_parameters

    spec = QuantSpec(targets=ALL_LINEAR)
    int4 = copy.deepcopy(model)
    convert_to_int4(int4, spec, targeted_parameters(int4, spec), torch.bfloat16, None)
    params = sum(p.numel() for p in model.parameters())
    out: dict[str, Any] = {"parameters_m": params / 1e6, "new_tokens": sizes["new_tokens"]}
    for batch in sizes["batches"]:
        for name, m in (("bf16", model), ("int4", int4)):
            tps = decode_tokens_per_s(m, batch, sizes["new_tokens"], 16, sizes["repeats"])
            step_bytes = weight_bytes_per_step(m, batch)
            out[f"{name}_batch{batch}"] = {
                "tokens_per_s": tps,
                "mb_per_step": step_bytes / 1e6,
                "roofline": step_bytes * (tps / batch) / (sizes["peak_gbps"] * 1e9),
            }
        out[f"int4_vs_bf16_batch{batch}"] = (
            out[f"int4_batch{batch}"]["tokens_per_s"] / out[f"bf16_batch{batch}"]["tokens_per_s"]
        )
    del int4
    return out


def hf_generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> list[list[int]]:
    """Greedy HF `generate` for exactly `new_tokens` tokens from left-padded prompts (as benchmarks/engine_vs_hf.py
    calls it; that script imports the job's data layer, this one must not)."""
    import torch

    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=None,
        use_cache=True,
    )
    return out[:, width:].tolist()


def engine_vs_hf(device, sizes: dict, model) -> dict:
    import torch

    from rollouts.engine import Engine

    engine = Engine(model, pad_token_id=0, stop_token_id=-1)  # no stop token: both sides decode every token
    vocab, new = model.config.vocab_size, sizes["new_tokens"]
    out: dict[str, Any] = {"new_tokens": new}
    for batch in sizes["batches"]:
        prompts = torch.randint(2, vocab, (batch, 16), generator=torch.Generator().manual_seed(batch)).tolist()
        ours: list = []
        theirs: list = []
        ours_s = timed(lambda p=prompts: ours.append(engine.generate(p, [new] * len(p), 1.0, greedy=True)), 1, device)
        hf_s = timed(lambda p=prompts: theirs.append(hf_generate(model, p, new, 0)), 1, device)
        same = sum(g.token_ids == h for g, h in zip(ours[-1], theirs[-1], strict=True))
        out[f"batch{batch}"] = {
            "engine_tokens_per_s": batch * new / ours_s,
            "hf_tokens_per_s": batch * new / hf_s,
            "engine_vs_hf": hf_s / ours_s,
            "identical_sequences": f"{same}/{batch}",
        }
    return out


def learner(device, sizes: dict, dtype: str) -> dict:
    """The INT4 engine samples a batch from a built-in policy; the QAT learner takes two updates on it."""
    import torch

    from rl.config import load_config
    from rl.policy.build import build_tiny_policy
    from rl.tasks.calculator import make_rows
    from rl.trainer.batch import TrainBatch
    from rl.trainer.learner import Learner
    from rollouts.engine import Engine
    from rollouts.int4 import convert_to_int4
    from rollouts.model import load_policy, save_policy
    from rollouts.quant import QuantSpec, targeted_parameters

    gpu = device.type == "cuda"
    tiny = [f"model.tiny.{k}={v}" for k, v in sizes["learner"].items()]
    overrides = [*tiny, f"model.dtype={dtype}", f"trainer.learner_gpus={1 if gpu else 0}", "quant.attribution_every=1"]
    cfg = load_config(ROOT / "configs" / "calculator.yaml", [*overrides, "quant.measure_attribution=true"])
    policy_dir = Path(tempfile.mkdtemp(prefix="tiderl-gpu-check-policy-"))
    corpus = [json.dumps(row["prompt"]) for row in make_rows(300, 0, "warm_start")]
    model, tokenizer = build_tiny_policy(cfg.model.tiny, corpus, seed=0)
    save_policy(model, tokenizer, policy_dir)
    cfg.model.path = str(policy_dir)

    # the rollout side as a rollout worker given a GPU builds it (rollouts/worker.py, which imports Ray): the policy
    # on the device, its routed experts INT4 (bf16 activations on CUDA; the CPU's as int4_kernel_settings picks)
    rollout, tokenizer = load_policy(policy_dir, cfg.model)
    rollout.to(device)
    spec = QuantSpec.from_config(cfg.quant)
    activation = torch.float32 if dtype == "float32" and not gpu else torch.bfloat16
    convert_to_int4(
        rollout, spec, targeted_parameters(rollout, spec), activation, 8 if activation == torch.float32 else None
    )
    engine = Engine(rollout, tokenizer.pad_token_id, stop_token_id=-1)
    num, prompt_len, new = sizes["learner_batch"]
    prompts = torch.randint(10, len(tokenizer), (num, prompt_len), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    generations = engine.generate(
        prompts.tolist(), [new] * num, 1.0, greedy=False, generator=torch.Generator().manual_seed(1)
    )
    generate_s = time.perf_counter() - start
    width = prompt_len + new
    batch = TrainBatch(
        input_ids=torch.cat([prompts, torch.tensor([g.token_ids for g in generations])], 1),
        attention_mask=torch.ones(num, width, dtype=torch.long),
        loss_mask=torch.cat([torch.zeros(num, prompt_len), torch.ones(num, new)], 1),
        rollout_logprobs=torch.cat([torch.zeros(num, prompt_len), torch.tensor([g.logprobs for g in generations])], 1),
        advantages=torch.cat(
            [torch.zeros(num, prompt_len), torch.tensor([[1.0 - 2 * (i % 2)] * new for i in range(num)])], 1
        ),
        policy_versions=torch.zeros(num, dtype=torch.long),
        temperature=1.0,
    )
    del rollout, engine
    trainer = Learner(str(policy_dir), cfg.learner_spec())
    times, metrics = [], []
    for _ in range(2):
        start = time.perf_counter()
        metrics.append(trainer.train_step(batch))
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    first = metrics[0]
    keys = ("mismatch_abs_logp", "mismatch_kl", "mismatch_quant_abs_logp", "loss", "grad_norm")
    return {
        "learner_dtype": dtype,
        "on": str(next(trainer.model.parameters()).device),
        "parameters_m": sum(p.numel() for p in trainer.model.parameters()) / 1e6,
        "sequences": num,
        "tokens": num * width,
        "generate_s": generate_s,
        "update_s": times,
        **{k: first[k] for k in keys if k in first},
        "fake_quant": first.get("fake_quant", None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-dry-run", action="store_true", help="The same code paths at tiny sizes on the CPU.")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default: $OUT/gpu_check.json or .).")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".gpu_wheels", help="Carried wheels.")
    parser.add_argument("--peak-gbps", type=float, default=None, help="Memory bandwidth for the roofline.")
    parser.add_argument("--only", nargs="+", default=None, help="Run only these sections.")
    args = parser.parse_args()
    begin = time.perf_counter()
    carried = use_carried_wheels(args.wheels) if args.wheels.is_dir() else []
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    import torch
    import transformers

    sys.meta_path.insert(0, _NoRay())
    if not args.cpu_dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (run with --cpu-dry-run for the CPU dry run)")
    device = torch.device("cpu" if args.cpu_dry_run else "cuda")
    sizes = CPU if args.cpu_dry_run else GPU
    if args.peak_gbps:
        sizes = {**sizes, "peak_gbps": args.peak_gbps}
    if args.cpu_dry_run:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "carried_wheels": carried,
        "peak_gbps": sizes["peak_gbps"],
    }
    print(f"gpu_check on {report['device']}: torch {torch.__version__}, transformers {transformers.__version__}")
    state: dict[str, Any] = {}

    def decode_model():
        if "model" not in state:
            state["model"] = build_decode_model(device, sizes)
        return state["model"]

    sections = {
        "int4_layout": lambda: int4_layout(device, sizes),
        "int4_matvec": lambda: int4_matvec(device, sizes),
        "decode": lambda: decode(device, sizes, decode_model()),
        "engine_vs_hf": lambda: engine_vs_hf(device, sizes, decode_model()),
        "learner_fp32": lambda: learner(device, sizes, "float32"),
        "learner_bf16": lambda: learner(device, sizes, "bfloat16"),
    }
    failed = []
    for name, run in sections.items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        try:
            result = run()
        except Exception as e:  # one failing section must not cost the others their device time
            result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            failed.append(name)
        if name == "engine_vs_hf":
            state.pop("model", None)  # the decode model is not needed past here
        result["seconds"] = time.perf_counter() - start
        report[name] = result
        print(f"[{name}] {json.dumps(result if 'error' not in result else result['error'], default=str)}", flush=True)
    report["ray_imported"] = any(m == "ray" or m.startswith("ray.") for m in sys.modules)
    report["failed"] = failed
    report["total_s"] = time.perf_counter() - begin
    out = args.out or Path(os.environ.get("OUT", ".")) / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"gpu_check: {len(failed)} section(s) failed {failed}; {report['total_s']:.0f} s; report {out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
