"""`tiderl export RUN_DIR OUT`: a run's policy as a Hugging Face checkpoint in compressed-tensors `pack-quantized`
format, the layout Kimi K2 Thinking ships and vLLM / SGLang load.

Each targeted weight becomes `<module>.weight_packed` (int32, 8 values per word along the input dim),
`<module>.weight_scale` (the spec's scale dtype, one per group) and `<module>.weight_shape`; fused experts are
written per expert (`mlp.experts.<e>.{gate,up,down}_proj`), the names transformers saves and serving engines load.
The values come from `rl.quant.quantize`, the function behind the learner's fake-quant and the weight sync, so
`load_exported` gives back the learner's fake-quant weights bit for bit. `quantization_config` is built with
compressed-tensors' own pydantic models, so a malformed field fails here rather than in a serving engine.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rl.checkpoint import checkpoint_dir, latest_checkpoint
from rl.config import ModelConfig, QuantConfig, validate_config
from rl.quant import PackedInt4, QuantSpec, targeted_parameters

SPEC_FILE = "tiderl_quant.json"
"""The full spec next to the weights (scale rule and targets are not part of compressed-tensors' config)."""


def export_run(run_dir: Path, out: Path, step: int | None = None) -> Path:
    """Export the policy of `run_dir`'s latest checkpoint (or of `step`) with the run's `quant` settings."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.yaml: not a tiderl run directory")
    cfg = validate_config(yaml.safe_load(config_path.read_text()), str(config_path))
    checkpoint = checkpoint_dir(run_dir) / f"step_{step:06d}" if step is not None else latest_checkpoint(run_dir)
    if checkpoint is None or not (checkpoint / "policy").is_dir():
        which = f"for step {step} " if step is not None else ""
        raise FileNotFoundError(f"no checkpoint {which}with a policy in {checkpoint_dir(run_dir)}")
    return export_policy(checkpoint / "policy", cfg.quant, out, cfg.model.dtype)


def export_policy(policy_dir: Path, quant: QuantConfig, out: Path, dtype: str = "float32") -> Path:
    """Write `policy_dir` (an HF directory of master weights) to `out` as a pack-quantized checkpoint."""
    from rl.policy import load_policy  # rl.policy imports this module's loader

    model, tokenizer = load_policy(policy_dir, ModelConfig(path=str(policy_dir), dtype=dtype))
    spec = QuantSpec.from_config(quant)
    targets = targeted_parameters(model, spec)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)  # transformers' canonical checkpoint names: fused experts split per expert
        dense = {k: v for f in sorted(Path(tmp).glob("*.safetensors")) for k, v in load_file(f).items()}
    quantized = _checkpoint_names(targets, dense, model)

    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in dense.items():
        if name in quantized:
            packed = PackedInt4.from_weight(tensor, spec)
            module = name.removesuffix(".weight")
            tensors[f"{module}.weight_packed"] = packed.packed
            tensors[f"{module}.weight_scale"] = packed.scale
            tensors[f"{module}.weight_shape"] = torch.tensor(packed.shape, dtype=torch.int64)
        else:
            tensors[name] = tensor.contiguous()
    embeddings = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    ignore = sorted(
        n.removesuffix(".weight")
        for n, t in dense.items()
        if n.endswith(".weight") and t.ndim == 2 and n not in quantized and n.removesuffix(".weight") not in embeddings
    )

    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(spec, ignore)
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    tokenizer.save_pretrained(out)
    (out / SPEC_FILE).write_text(json.dumps({**quant.model_dump(mode="json"), "quantized_tensors": len(quantized)}, indent=2))
    return out


def quantization_config(spec: QuantSpec, ignore: list[str]) -> dict:
    """The `quantization_config` of config.json: W4A16, symmetric int, group strategy (as K2 Thinking)."""
    weights = QuantizationArgs(num_bits=spec.bits, type="int", symmetric=True, strategy="group", group_size=spec.group_size, dynamic=False)
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        format="pack-quantized",
        quantization_status="compressed",
        ignore=ignore,
    )
    return config.model_dump(mode="json")


def _checkpoint_names(targets: list[str], saved: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    """The saved (per-expert) tensor names of the in-memory targets: `X.weight` stays; fused `P.gate_up_proj`
    is `P.<e>.gate_proj.weight` + `P.<e>.up_proj.weight`, `P.down_proj` is `P.<e>.down_proj.weight`."""
    names: set[str] = set()
    for target in targets:
        if target in saved:
            names.add(target)
            continue
        prefix, _, fused = target.rpartition(".")
        parts = {"gate_up_proj": "(gate_proj|up_proj)", "down_proj": "down_proj"}.get(fused)
        pattern = re.compile(rf"{re.escape(prefix)}\.\d+\.{parts}\.weight") if parts else None
        found = {n for n in saved if pattern and pattern.fullmatch(n)}
        experts = model.get_parameter(target).shape[0]
        if len(found) != experts * (2 if fused == "gate_up_proj" else 1):
            raise ValueError(f"export: cannot find the checkpoint tensors of {target} ({len(found)} found); unsupported expert layout")
        names |= found
    return names


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
