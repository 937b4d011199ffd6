"""Loading the policy: a Hugging Face causal LM and its tokenizer, from any HF directory.

`model.path` names a Hugging Face causal-LM directory (optionally a GGUF file inside it, dequantized on load), or a
`tiderl export` checkpoint in compressed-tensors `pack-quantized` format, decompressed to its exact INT4 values.
The built-in policy (`rl.policy.build`) is saved as an ordinary HF directory, so the learner, every rollout worker
and `tiderl export` load policies this one way.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationConfig
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from rollouts.config import ModelConfig

CHAT_TEMPLATE = (Path(__file__).parent / "chat_template.jinja").read_text()
"""ChatML with `<think>` and `<tool_call>` markup: the built-in policy's template, and the fallback of a tokenizer
that ships none."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_policy(path: str | os.PathLike, cfg: ModelConfig) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """Load a causal LM and its tokenizer from an HF directory (GGUF when `cfg.gguf_file` is set; a `tiderl export`
    pack-quantized checkpoint is decompressed to its exact INT4 values)."""
    if not cfg.gguf_file and is_exported(path):
        model, tokenizer = load_exported(path, DTYPES[cfg.dtype])
        return _finish(model, tokenizer)
    kwargs: dict = {"dtype": DTYPES[cfg.dtype]}
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(path, **({"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}))
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if cfg.gguf_file:
        # transformers dequantizes GGUF weights on load yet keeps the model marked as GGUF-quantized, which
        # makes save_pretrained refuse; the tensors in memory are plain `cfg.dtype`, so the marker goes.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return _finish(model, tokenizer)


def _finish(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    model.eval()
    return model, tokenizer


def save_policy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, path: str | os.PathLike) -> None:
    """Write an HF directory (config, safetensors weights, tokenizer with its chat template)."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def is_exported(path: str | Path) -> bool:
    """Whether `path` is an HF directory holding a compressed-tensors pack-quantized checkpoint."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    qc = json.loads(config.read_text()).get("quantization_config") or {}
    return qc.get("quant_method") == "compressed-tensors"


def load_exported(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, object]:
    """Load a pack-quantized checkpoint as a dense model: weight = q * scale, exactly.

    compressed-tensors' own decompressor does the unpacking and the product, fed fp32 scales: it multiplies in
    the scale's dtype, and q * scale is exact in fp32 but rounded in bf16 (what transformers' integration would
    do with the stored bf16 scales). transformers' loader then maps the per-expert names onto fused experts.
    """
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    qc = config.pop("quantization_config")
    if qc.get("format") != "pack-quantized":
        raise ValueError(f"{path}: quantization format {qc.get('format')!r}; tiderl loads pack-quantized checkpoints")
    schemes = list(QuantizationConfig.model_validate(qc).config_groups.values())
    args = schemes[0].weights
    if len(schemes) != 1 or args is None or args.num_bits != 4 or not args.symmetric or args.strategy != "group":
        raise ValueError(f"{path}: tiderl loads 4-bit symmetric group-quantized checkpoints, got {qc['config_groups']}")
    tensors = load_file(str(path / "model.safetensors"))
    dense: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith((".weight_scale", ".weight_shape")):
            continue
        if name.endswith(".weight_packed"):
            module = name.removesuffix(".weight_packed")
            parts = {"weight_packed": tensor, "weight_shape": tensors[f"{module}.weight_shape"]}
            parts["weight_scale"] = tensors[f"{module}.weight_scale"].to(torch.float32)
            dense[f"{module}.weight"] = PackedQuantizationCompressor.decompress(parts, schemes[0])["weight"].to(dtype)
        else:
            dense[name] = tensor
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        save_file(dense, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        if (path / "generation_config.json").is_file():
            shutil.copy(path / "generation_config.json", tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(path)
