"""`tiderl export RUN_DIR OUT`: a run's policy as a Hugging Face checkpoint in compressed-tensors `pack-quantized`
format, the layout Kimi K2 Thinking ships and vLLM / SGLang load.

Each targeted weight becomes `<module>.weight_packed` (int32, 8 values per word along the input dim),
`<module>.weight_scale` (the spec's scale dtype, one per group) and `<module>.weight_shape`; fused experts are
written per expert (`mlp.experts.<e>.{gate,up,down}_proj`), the names transformers saves and serving engines load.
The values come from `rollouts.quant.quantize`, the function behind the learner's fake-quant and the weight sync, so
`rollouts.model.load_exported` gives back the learner's fake-quant weights bit for bit. `quantization_config` is built
with
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
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from safetensors.torch import load_file, save_file

from rl.config import JobConfig, validate_config
from rl.loop.checkpoint import checkpoint_dir, latest_checkpoint
from rollouts.config import ModelConfig, QuantConfig
from rollouts.model import load_policy
from rollouts.quant import PackedInt4, QuantSpec, targeted_parameters

SPEC_FILE = "tiderl_quant.json"
"""The full spec next to the weights (scale rule and targets are not part of compressed-tensors' config)."""


def export_run(run_dir: Path, out: Path, step: int | None = None) -> Path:
    """Export the policy of `run_dir`'s latest checkpoint (or of `step`) with the run's `quant` settings. A LoRA run's
    checkpoint policy is the merged model (base + adapters), so its adapted weights are quantized after merging."""
    cfg = _run_config(run_dir)
    return export_policy(_checkpoint(run_dir, step) / "policy", cfg.quant, out, cfg.model.dtype)


def export_adapter(run_dir: Path, out: Path, step: int | None = None) -> Path:
    """Export a LoRA run's adapters in peft's format (`out/adapter_config.json`, `out/adapter_model.safetensors`),
    for `peft.PeftModel.from_pretrained(base, out)`.

    The base they were trained on: the run's starting policy (its path is the config's `base_model_name_or_path`),
    or under `quant.mode: qat` that policy's INT4 values, which are written next to the adapters as a pack-quantized
    checkpoint (`out/int4_base`, loaded exactly by `rollouts.model.load_policy`) and named as the base instead.
    """
    cfg = _run_config(run_dir)
    if cfg.trainer.lora is None:
        raise ValueError(f"{run_dir} trained every parameter (trainer.lora is not set): export without --adapter")
    checkpoint = _checkpoint(run_dir, step)
    source = checkpoint / "adapter"
    if not (source / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{checkpoint} holds no adapter/ (written by a LoRA run's checkpoints)")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "adapter_model.safetensors", out / "adapter_model.safetensors")
    config = json.loads((source / "adapter_config.json").read_text())
    if cfg.quant.enabled and cfg.quant.mode == "qat":
        base = Path(config["base_model_name_or_path"] or "")
        if not base.is_dir():
            raise FileNotFoundError(
                f"the run's starting policy {base} (the adapters' base) is not on this machine: export the INT4 base "
                f"where it is, or export the merged model (without --adapter)"
            )
        int4_base = export_policy(base, cfg.quant, out / "int4_base", cfg.model.dtype)
        config["base_model_name_or_path"] = str(int4_base.resolve())  # peft resolves a relative path from the cwd
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def _run_config(run_dir: Path) -> JobConfig:
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.yaml: not a tiderl run directory")
    return validate_config(yaml.safe_load(config_path.read_text()), str(config_path))


def _checkpoint(run_dir: Path, step: int | None) -> Path:
    """The run's latest checkpoint (or `step`'s), with its policy."""
    checkpoint = checkpoint_dir(run_dir) / f"step_{step:06d}" if step is not None else latest_checkpoint(run_dir)
    if checkpoint is None or not (checkpoint / "policy").is_dir():
        which = f"for step {step} " if step is not None else ""
        raise FileNotFoundError(f"no checkpoint {which}with a policy in {checkpoint_dir(run_dir)}")
    return checkpoint


def export_policy(policy_dir: Path, quant: QuantConfig, out: Path, dtype: str = "float32") -> Path:
    """Write `policy_dir` (an HF directory of master weights) to `out` as a pack-quantized checkpoint."""
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
    (out / SPEC_FILE).write_text(
        json.dumps({**quant.model_dump(mode="json"), "quantized_tensors": len(quantized)}, indent=2)
    )
    return out


def quantization_config(spec: QuantSpec, ignore: list[str]) -> dict:
    """The `quantization_config` of config.json: W4A16, symmetric int, group strategy (as K2 Thinking)."""
    weights = QuantizationArgs(
        num_bits=spec.bits, type="int", symmetric=True, strategy="group", group_size=spec.group_size, dynamic=False
    )
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
            raise ValueError(
                f"export: cannot find the checkpoint tensors of {target} ({len(found)} found); unsupported expert "
                f"layout"
            )
        names |= found
    return names
