"""LoRA on the learner (`trainer.lora`): peft adapters on a frozen base, what a push carries, and their checkpoint.

`LoraPolicy.attach` freezes every weight of the model and injects peft's LoRA layers in place
(`peft.inject_adapter_in_model`: the model keeps its class, so the learner's forward and its savings work
unchanged): `lora.Linear` for linear weights (`target_modules`) and `lora.ParamWrapper` for fused MoE expert tensors
(`target_parameters`, peft >= 0.17). Under `quant.mode: qat` every quantization target is first replaced by its INT4
values (`rollouts.quant.quantize` then `dequantize`, the one definition), so the learner trains adapters on the INT4
base the rollout workers run, and no fake-quant is needed: rollouts and learner differ by float summation order
only. Under `ptq` the learner's base stays full precision and the workers' is INT4 (the baseline).

A push carries the adapters alone (`rollouts.lora.adapter_payload`); the workers add them to their own frozen base.
A checkpoint holds `adapter/` in peft's format (`PeftModel.from_pretrained` loads it) and `policy/` the merged
model (base + delta per adapted weight, with the workers' arithmetic), which `tiderl export` packs as usual.
"""

from __future__ import annotations

from pathlib import Path

import peft
import torch
from peft.tuners.lora import LoraLayer, ParamWrapper
from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
from safetensors.torch import load_file, save_file
from torch import nn

from rollouts.config import LoraConfig, QuantConfig
from rollouts.lora import FUSED, LoraFactors, adapted_parameters, adapter_payload, frozen_base
from rollouts.quant import QuantSpec, WeightPayload, pack_state_dict, payload_nbytes, targeted_parameters

ADAPTER = "default"
"""peft's adapter name (the only one)."""


class LoraPolicy:
    """The adapted weights of a learner's model and their peft layers."""

    def __init__(self, model: nn.Module, names: list[str], full_push_bytes: int, base_path: str) -> None:
        self.model, self.names, self.full_push_bytes, self.base_path = model, names, full_push_bytes, base_path
        self.layers: dict[str, LoraLayer] = {}
        for module_name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                owner = _unwrapped(module_name)
                param = module.parameter_name if isinstance(module, ParamWrapper) else "weight"
                self.layers[f"{owner}.{param}"] = module
        if set(self.layers) != set(names):
            raise RuntimeError(f"peft adapted {sorted(set(self.layers) ^ set(names))[:4]} unlike trainer.lora.targets")

    @staticmethod
    def attach(model: nn.Module, cfg: LoraConfig, quant_cfg: QuantConfig, base_path: str) -> LoraPolicy:
        """Freeze `model` (its quantization targets set to their INT4 values under `quant.mode: qat`) and inject the
        adapters (B = 0, so the policy starts as the base)."""
        quant = QuantSpec.from_config(quant_cfg) if quant_cfg.enabled else None
        int4_base = quant_cfg.mode == "qat"
        names = adapted_parameters(model, cfg)
        state = {k: v.detach() for k, v in model.state_dict().items()}
        full = payload_nbytes(pack_state_dict(state, quant, targeted_parameters(model, quant)) if quant else state)
        if int4_base and quant is not None:
            with torch.no_grad():
                for name in targeted_parameters(model, quant):
                    param = model.get_parameter(name)
                    param.copy_(frozen_base(param, name, quant))
        model.requires_grad_(False)
        modules, as_parameters = _peft_targets(model, names)
        if cfg.dropout and as_parameters:
            raise ValueError(
                f"trainer.lora.dropout={cfg.dropout}: peft adapts {as_parameters[0]} (and {len(as_parameters) - 1} "
                f"more) as a parameter, where it applies no dropout; set trainer.lora.dropout=0 or leave these out "
                f"of trainer.lora.targets"
            )
        config = peft.LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=modules or None,
            target_parameters=as_parameters or None,
            base_model_name_or_path=base_path,
        )
        peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        return LoraPolicy(model, names, full["int4_bytes"] + full["dense_bytes"], base_path)

    def factors(self) -> dict[str, LoraFactors]:
        """Each adapted weight's adapter (CPU copies: the object store carries CPU tensors)."""
        out = {}
        for name, layer in self.layers.items():
            a = layer.lora_A[ADAPTER].weight.detach().cpu().clone()
            b = layer.lora_B[ADAPTER].weight.detach().cpu().clone()
            if isinstance(layer, ParamWrapper) and layer.num_experts > 1:
                out[name] = LoraFactors(
                    a, b, layer.scaling[ADAPTER], layer.num_experts, layer._did_swap_in_out_features
                )
            else:
                out[name] = LoraFactors(a, b, layer.scaling[ADAPTER])
        return out

    def payload(self) -> WeightPayload:
        return adapter_payload(self.factors())

    def sync_bytes(self) -> dict[str, int]:
        """What weight_sync.json records: the bytes of one adapter push, and of a full push of the same model."""
        adapter = payload_nbytes(self.payload())["dense_bytes"]
        return {"lora_adapter_bytes": adapter, "full_push_bytes": self.full_push_bytes}

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's own names and values with each adapter added to its base (the rollout workers' weights)."""
        state = {
            _unwrapped(k): v.detach().cpu()
            for k, v in self.model.state_dict().items()
            if ".lora_" not in k  # peft's lora_A / lora_B / lora_dropout entries
        }
        for name, f in self.factors().items():
            state[name] = state[name] + f.delta(state[name])
        return state

    def save_adapter(self, out: Path) -> None:
        """The adapters in peft's format (adapter_config.json, adapter_model.safetensors): what
        `PeftModel.from_pretrained` loads onto the base."""
        out.mkdir(parents=True, exist_ok=True)
        self.model.peft_config[ADAPTER].save_pretrained(str(out))
        adapters = peft.get_peft_model_state_dict(self.model, adapter_name=ADAPTER)
        tensors = {k: v.detach().cpu().contiguous() for k, v in adapters.items()}
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})

    def load(self, checkpoint: Path) -> None:
        """The adapters a checkpoint holds (`checkpoint/adapter`; the base is the one this learner was built on)."""
        result = peft.set_peft_model_state_dict(
            self.model, load_file(str(checkpoint / "adapter" / "adapter_model.safetensors")), adapter_name=ADAPTER
        )
        if result.unexpected_keys:
            raise ValueError(f"{checkpoint}/adapter holds adapters this model lacks: {result.unexpected_keys[:4]}")


def _peft_targets(model: nn.Module, names: list[str]) -> tuple[list[str], list[str]]:
    """(`target_modules`, `target_parameters`) for peft: linear weights as their modules (peft's lora.Linear), fused
    expert tensors as parameters (lora.ParamWrapper).

    With transformers 5, peft rewrites module targets of MoE models whose experts transformers fused: a target
    ending in an old expert name (`...shared_experts.gate_proj`) becomes the fused routed-expert parameter
    (`gate_up_proj`) of every layer, so a dense MLP inside such a model would adapt the routed experts instead.
    Those linear weights go as parameters too (peft applies the same (B @ A) * scaling to a 2-D parameter); which
    ones they are, peft's own conversion says.
    """
    fused = [n for n in names if n.rpartition(".")[2] in FUSED and model.get_parameter(n).ndim == 3]
    modules = [n.removesuffix(".weight") for n in names if n not in fused]
    probe = peft.LoraConfig(target_modules=list(modules)) if modules else None
    if probe is not None:
        convert_peft_config_for_transformers(probe, model, None)
    kept = set(probe.target_modules or ()) if probe is not None else set()
    rewritten = [m + ".weight" for m in modules if m not in kept]
    return [m for m in modules if m in kept], fused + rewritten


def _unwrapped(name: str) -> str:
    """A name without the `.base_layer` segments peft's wrappers insert."""
    return name.replace(".base_layer", "")
