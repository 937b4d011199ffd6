"""LoRA (`trainer.lora`, peft): adapters on a frozen base (INT4 under QAT), only the adapters pushed to the rollout
workers, which rebuild the learner's weights exactly; checkpoints, exact resume and both exports cover it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from typer.testing import CliRunner

from rl.config import ConfigError, dump_config
from rl.launch.cli import app
from rl.loop.controller import train
from rl.policy.export import export_adapter, export_run
from rl.trainer.learner import Learner
from rollouts.collective import flatten, unflatten
from rollouts.config import LoraConfig
from rollouts.int4 import Int4Linear
from rollouts.lora import adapted_parameters, is_adapter_payload
from rollouts.model import load_exported, load_policy
from rollouts.quant import QuantSpec, fake_quantize, targeted_parameters
from rollouts.worker import RolloutWorker
from tests.test_rl_step import LENGTH_REWARD

INT4_LORA = [  # linear weights INT4 (but the two whose 16 inputs the export's loader cannot group); adapters on
    # attention and the routed experts, so the shared experts stay INT4 modules on the workers
    "quant.enabled=true",
    "quant.modules=all_linear",
    "quant.ignore=[kv_b_proj, o_proj]",
    "trainer.lora.rank=4",
    "trainer.lora.targets=[self_attn, '(^|\\.)experts\\.']",
]


def _peft_merged(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The oracle: peft's own merge of every adapter into its base weight, under the model's own names."""
    merged = copy.deepcopy(model)
    for module in merged.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    return {k.replace(".base_layer", ""): v for k, v in merged.state_dict().items() if ".lora_" not in k}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("quant", [[], INT4_LORA], ids=["full_precision_base", "int4_base"])
def test_adapter_push_rebuilds_the_learners_weights_on_the_worker_bit_for_bit(tiny_policy_dir, make_cfg, quant) -> None:
    cfg = make_cfg(f"model.path={tiny_policy_dir}", "trainer.lora.rank=4", *quant)
    learner = Learner(str(tiny_policy_dir), cfg.learner_spec())
    worker = RolloutWorker(str(tiny_policy_dir), cfg.worker_spec(), 0)
    torch.manual_seed(0)
    with torch.no_grad():  # adapters as training leaves them: B no longer zero
        for name, p in learner.model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.05)
    payload = learner.get_weights()
    assert is_adapter_payload(payload)
    worker.load_weights(unflatten(*flatten(payload)), 1)  # as the collective sync (cluster.weight_sync) carries it

    oracle, on_worker = _peft_merged(learner.model), worker.model.state_dict()
    adapted = learner.lora.names
    assert len(adapted) == (12 if quant else 18)  # 4 attention + 2 fused experts (+ 3 shared experts) per layer
    assert all(torch.equal(on_worker[n], oracle[n]) for n in adapted)
    assert learner.lora.merged_state_dict().keys() == oracle.keys()
    assert all(torch.equal(v, oracle[k]) for k, v in learner.lora.merged_state_dict().items())
    sync = learner.weight_sync_bytes()
    assert sync["lora_adapter_bytes"] == sum(t.numel() * t.element_size() for t in payload.values())
    assert sync["lora_adapter_bytes"] < sync["full_push_bytes"] / 3
    if quant:  # the base is INT4: the learner's frozen weights are the INT4 values, the unadapted ones run INT4
        spec = QuantSpec.from_config(cfg.quant)
        master, _ = load_policy(tiny_policy_dir, cfg.model)
        shared = "model.layers.0.mlp.shared_experts.up_proj"
        assert isinstance(worker.model.get_submodule(shared), Int4Linear)
        assert torch.equal(oracle[f"{shared}.weight"], fake_quantize(master.get_parameter(f"{shared}.weight"), spec))
        expert = "model.layers.1.mlp.experts.down_proj"
        base = learner.model.get_submodule("model.layers.1.mlp.experts").get_param()
        assert torch.equal(base, fake_quantize(master.get_parameter(expert), spec))
        assert not torch.equal(on_worker[expert], base)  # the adapter moved it off the grid

    with torch.no_grad():  # and the two forwards agree to float noise: peft's unmerged one and the worker's merged one
        ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(1))
        gap = (learner.model(input_ids=ids).logits - worker.model(input_ids=ids).logits).abs().max()
    assert gap < 1e-5


@pytest.fixture(scope="module")
def lora_runs(tiny_policy_dir, make_cfg, tmp_path_factory) -> dict[str, Path]:
    """Short in-process LoRA jobs on the tiny policy (a length reward, so every group has a gradient): QAT on an
    INT4 base straight for 3 steps, the same for 2 steps then resumed to 3, and PTQ (full-precision learner base,
    INT4 rollouts) for 2."""
    root = tmp_path_factory.mktemp("lora")
    common = [
        f"model.path={tiny_policy_dir}",
        f"reward.functions=[{{name: '{LENGTH_REWARD}'}}]",
        "cluster.backend=in_process",
        "eval.enabled=false",
        "rollout.max_staleness=0",
        "trainer.lr=5e-3",
        "trainer.checkpoint_every=1",
        "trainer.keep_checkpoints=5",
        *INT4_LORA,
    ]
    runs = {name: root / name for name in ("straight", "resumed", "ptq")}
    train(make_cfg(*common, "trainer.steps=3"), runs["straight"])
    train(make_cfg(*common, "trainer.steps=2"), runs["resumed"])
    train(make_cfg(*common, "trainer.steps=3"), runs["resumed"], resume=True)
    train(make_cfg(*common, "trainer.steps=2", "quant.mode=ptq"), runs["ptq"])
    return runs


def test_a_lora_step_on_an_int4_base_has_mismatch_at_the_float_noise_floor(lora_runs) -> None:
    qat, ptq = _metrics(lora_runs["straight"]), _metrics(lora_runs["ptq"])
    assert all(r["grad_norm"] > 0 for r in qat)  # the adapters trained: rollouts after step 1 ran B != 0
    assert all(r["mismatch_abs_logp"] < 1e-5 for r in qat)
    assert all(r["mismatch_abs_logp"] > 1e-3 for r in ptq)  # the same job on a full-precision learner base: ~1.5e-3
    sync = json.loads((lora_runs["straight"] / "weight_sync.json").read_text())
    # rank 4 on 12 weights, fp32; a full push: every linear weight INT4-packed, the rest fp32
    assert sync["lora_adapter_bytes"] == 27680 and sync["full_push_bytes"] == 169344


def test_a_lora_job_on_ray_pushes_adapters_to_its_rollout_workers(
    ray_local, tiny_policy_dir, make_cfg, tmp_path
) -> None:
    """The same as the in-process jobs above, with the learner and the rollout workers as Ray actors."""
    cfg = make_cfg(
        f"model.path={tiny_policy_dir}",
        f"reward.functions=[{{name: '{LENGTH_REWARD}'}}]",
        "eval.enabled=false",
        "rollout.max_staleness=0",  # each step's samples from the adapters just pushed
        *INT4_LORA,
    )
    train(cfg, tmp_path)
    rows = _metrics(tmp_path)
    assert len(rows) == 2 and all(r["grad_norm"] > 0 and r["mismatch_abs_logp"] < 1e-5 for r in rows)
    assert json.loads((tmp_path / "weight_sync.json").read_text())["lora_adapter_bytes"] == 27680


def test_resume_of_a_lora_job_is_exact(lora_runs) -> None:
    straight, resumed = _metrics(lora_runs["straight"]), _metrics(lora_runs["resumed"])
    assert [r["step"] for r in resumed] == [1, 2, 3]
    keys = ("loss", "grad_norm", "mismatch_abs_logp", "reward_mean", "num_samples", "entropy")
    assert [{k: r[k] for k in keys} for r in straight] == [{k: r[k] for k in keys} for r in resumed]
    for part in ("adapter/adapter_model.safetensors", "policy/model.safetensors"):
        a = load_file(lora_runs["straight"] / "checkpoints" / "step_000003" / part)
        b = load_file(lora_runs["resumed"] / "checkpoints" / "step_000003" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_export_writes_the_merged_int4_model_and_the_peft_adapter(lora_runs, make_cfg, tmp_path) -> None:
    run, checkpoint = lora_runs["straight"], lora_runs["straight"] / "checkpoints" / "step_000003"
    merged, _ = load_policy(checkpoint / "policy", make_cfg().model)
    exported, _ = load_exported(export_run(run, tmp_path / "merged"))
    spec = QuantSpec.from_config(make_cfg(*INT4_LORA).quant)
    targets = set(targeted_parameters(merged, spec))
    for name, tensor in merged.state_dict().items():  # the merged weights, quantized again onto the INT4 grid
        expect = fake_quantize(tensor, spec) if name in targets else tensor
        assert torch.equal(exported.state_dict()[name], expect), name

    done = CliRunner().invoke(app, ["export", str(run), str(tmp_path / "adapter"), "--adapter"])
    assert done.exit_code == 0 and "peft format" in done.output, done.output
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "adapter" / "int4_base").resolve()) and config["r"] == 4
    base, _ = load_policy(config["base_model_name_or_path"], make_cfg().model)  # the INT4 base, decompressed exactly
    policy = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload()
    assert all(torch.equal(t, merged.state_dict()[k]) for k, t in policy.state_dict().items())  # the trained policy

    plain = tmp_path / "full_parameter_run"  # a run without LoRA has no adapter to export
    plain.mkdir()
    (plain / "config.yaml").write_text(dump_config(make_cfg()))
    with pytest.raises(ValueError, match="trainer.lora is not set"):
        export_adapter(plain, tmp_path / "x")


def test_lora_config_errors_name_the_field(make_cfg, tiny_policy_dir) -> None:
    for override, message in (
        ("trainer.lora.rank=0", "trainer.lora.rank"),
        ("trainer.lora.dropout=1.5", "trainer.lora.dropout"),
        ("trainer.lora.targets=[]", "trainer.lora: .*targets is empty"),
        ("trainer.lora.targets=['(']", "trainer.lora: .*targets: '\\(' is not a valid regex"),
        ("trainer.lora.rnak=4", "trainer.lora.rnak.*rank"),
    ):
        with pytest.raises(ConfigError, match=message):
            make_cfg(override)
    assert make_cfg().trainer.lora is None  # full-parameter training by default
    model, _ = load_policy(tiny_policy_dir, make_cfg().model)
    with pytest.raises(ValueError, match=r"trainer.lora.targets \['nothing'\] match no linear weight .*q_proj"):
        adapted_parameters(model, LoraConfig(targets=["nothing"]))
    with pytest.raises(ValueError, match="trainer.lora.dropout=0.1: peft applies no dropout to fused MoE expert"):
        adapted_parameters(model, LoraConfig(dropout=0.1))
    assert len(adapted_parameters(model, LoraConfig(dropout=0.1, targets=["self_attn"]))) == 8
    with pytest.raises(ValueError, match="trainer.lora.dropout=0.1: peft adapts .*shared_experts.*as a parameter"):
        Learner(
            str(tiny_policy_dir), make_cfg("trainer.lora.dropout=0.1", "trainer.lora.targets=[shared]").learner_spec()
        )
