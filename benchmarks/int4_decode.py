"""Decode speed of the rollout engine with INT4 weights vs full-precision weights, same model, one run.

    python benchmarks/int4_decode.py                      # CPU: a ~60M-parameter K2-style MoE, all linear layers INT4
    python benchmarks/int4_decode.py --device cuda --preset 1b

Every variant decodes the same random prompts with `rollouts.engine.Engine` (KV cache, sampling, logprobs), at
batch 1 and 16, for `--new-tokens` tokens (no stop token). Printed: tokens/s, the ratio to the fp32 and bf16 rows,
and the fraction of the memory-bandwidth roofline: weight bytes one decode step must read (dense weights, plus
the INT4 bytes of the experts the batch can touch) x steps/s / `--peak-gbps`.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import AutoModelForCausalLM, DeepseekV3Config

from rollouts.engine import Engine
from rollouts.int4 import Int4Experts, Int4Linear, convert_to_int4
from rollouts.quant import ALL_LINEAR, ROUTED_EXPERTS, QuantSpec, targeted_parameters

PRESETS = {
    # ~60M parameters: big enough that weight reads, not Python, dominate a CPU decode step
    "cpu": dict(
        hidden_size=1024,
        num_hidden_layers=4,
        n_routed_experts=8,
        moe_intermediate_size=512,
        intermediate_size=2048,
        num_attention_heads=8,
        kv_lora_rank=256,
        q_lora_rank=None,
        vocab_size=8192,
    ),
    # ~1B parameters for a GPU
    "1b": dict(
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
}


def k2_config(sizes: dict) -> DeepseekV3Config:
    """A K2-style MoE config (2 of the routed experts per token plus a shared one, MLA) of the given sizes."""
    return DeepseekV3Config(
        **sizes,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        qk_rope_head_dim=64,
        qk_nope_head_dim=64,
        v_head_dim=64,
        max_position_embeddings=4096,
        num_mtp_layers=0,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )


def build_model(preset: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(k2_config(PRESETS[preset]), dtype=torch.float32).eval()


def weight_bytes_per_step(model: torch.nn.Module, batch: int) -> int:
    """Bytes of weights one decode step reads: every dense tensor, and for INT4 experts the packed bytes of the
    experts `batch` tokens can route to (at most all of them)."""
    total = 0
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.ndim == 3 and not isinstance(module, Int4Experts):  # dense fused experts
                experts = param.shape[0]
                share = min(1.0, batch * model.config.num_experts_per_tok / experts)
                total += int(param.numel() * param.element_size() * share)
            elif module is not model.get_input_embeddings():  # embeddings: one row per token
                total += param.numel() * param.element_size()
        if isinstance(module, Int4Experts):
            share = min(1.0, batch * model.config.num_experts_per_tok / module.num_experts)
            total += int(sum(mm.weight.nbytes for mms in module.int4.values() for mm in mms) * share)
        if isinstance(module, Int4Linear) and module.matmul is not None:
            total += module.matmul.weight.nbytes
    return total


def decode_tokens_per_s(model: torch.nn.Module, batch: int, new_tokens: int, prompt_len: int, repeats: int) -> float:
    engine = Engine(model, pad_token_id=0, stop_token_id=-1)  # no stop token: every row decodes all tokens
    vocab = model.config.vocab_size
    prompts = torch.randint(2, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(0)).tolist()
    engine.generate(prompts, [4] * batch, 1.0, greedy=True)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        engine.generate(prompts, [new_tokens] * batch, 1.0, greedy=True)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return batch * new_tokens / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modules", choices=["all_linear", "routed_experts"], default="all_linear")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--peak-gbps", type=float, default=24.0, help="memory read bandwidth (this CPU: ~24 GB/s; H100: 3350)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    base = build_model(args.preset, seed=0)
    spec = QuantSpec(targets=ALL_LINEAR if args.modules == "all_linear" else ROUTED_EXPERTS)
    targets = targeted_parameters(base, spec)
    params = sum(p.numel() for p in base.parameters())
    quantized = sum(base.get_parameter(n).numel() for n in targets)
    print(
        f"model: {params / 1e6:.1f}M parameters, {quantized / params:.0%} of them INT4 ({args.modules}, group "
        f"{spec.group_size}); device {device}"
    )

    variants: dict[str, torch.nn.Module] = {}
    if device.type == "cpu":
        variants["fp32"] = base
    variants["bf16"] = copy.deepcopy(base).to(torch.bfloat16)
    # (label, activation dtype, dense_min_rows): the kernel at every batch size, and the engine's fp32 default
    # (from 8 rows on, unpack on the fly + one dense matmul)
    int4_variants = (
        [("int4 (fp32 act)", torch.float32, None), ("int4 (fp32 act, auto)", torch.float32, 8)]
        if device.type == "cpu"
        else []
    )
    int4_variants.append(("int4 (bf16 act)", torch.bfloat16, None))
    for label, act, dense_min_rows in int4_variants:
        model = copy.deepcopy(base).to(act)  # the untargeted weights in the activation dtype
        convert_to_int4(model, spec, targets, act, dense_min_rows)
        variants[label] = model
    for model in variants.values():
        model.to(device)

    header = f"{'weights':<22}{'batch':>6}{'tokens/s':>11}{'vs fp32':>9}{'vs bf16':>9}{'MB/step':>9}{'roofline':>10}"
    print(header)
    print("-" * len(header))
    for batch in args.batch:
        speeds = {
            name: decode_tokens_per_s(m, batch, args.new_tokens, args.prompt_len, args.repeats)
            for name, m in variants.items()
        }
        for name, tps in speeds.items():
            step_bytes = weight_bytes_per_step(variants[name], batch)
            roofline = step_bytes * (tps / batch) / (args.peak_gbps * 1e9)
            vs32 = f"{tps / speeds['fp32']:.2f}x" if "fp32" in speeds else "-"
            print(
                f"{name:<22}{batch:>6}{tps:>11.1f}{vs32:>9}{tps / speeds['bf16']:>8.2f}x"
                f"{step_bytes / 1e6:>9.1f}{roofline:>10.1%}"
            )


if __name__ == "__main__":
    main()
