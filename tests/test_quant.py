"""INT4-aware training: one quantization spec, bit-exact across fake-quant, packing, the INT4 engine and export."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationConfig

from rewards.scoring import RewardScorer
from rl.config import ConfigError
from rl.policy.export import export_policy
from rl.trainer.advantages import grpo
from rl.trainer.batch import TrainBatch
from rl.trainer.learner import Learner
from rollouts.config import QuantConfig
from rollouts.int4 import Int4Experts, Int4Linear, convert_to_int4
from rollouts.model import load_exported, load_policy
from rollouts.quant import (
    PackedInt4,
    QuantSpec,
    fake_quantize,
    pack_state_dict,
    payload_nbytes,
    targeted_parameters,
)
from rollouts.worker import RolloutWorker
from tests.test_rl_step import LENGTH_REWARD, calculator_rows

SPECS = [QuantSpec(group_size=g, scale_rule=rule) for g in (32, 64, 128, 256) for rule in ("amax/7", "amax/7.5")]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"g{s.group_size}-{s.scale_rule}")
@pytest.mark.parametrize("shape", [(5, 96), (3, 7, 200), (1, 33)], ids=str)
def test_fake_quant_equals_dequant_of_packed_bit_for_bit(spec: QuantSpec, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.rand(shape[-1])  # uneven channel magnitudes
    w[..., :3] = 0.0  # a partly zero group
    packed = PackedInt4.from_weight(w, spec)
    fq = fake_quantize(w, spec)
    assert torch.equal(fq, packed.dequantize())
    q = packed.unpack()
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    # the grid: a group's largest |w| lands on 7 (amax/7); on 7 or -8 (amax/7.5: +-7.5 before bf16 scale rounding)
    groups = -(-shape[-1] // spec.group_size)
    assert packed.scale.shape == (*shape[:-1], groups) and packed.scale.dtype == torch.bfloat16
    assert int(q.abs().max()) in ((7,) if spec.scale_rule == "amax/7" else (7, 8))
    # error bound: half a step per weight; amax/7.5 clips a group's largest positive weight by up to one step
    step = packed.scale.float().repeat_interleave(spec.group_size, -1)[..., : shape[-1]]
    limit = step / 2 if spec.scale_rule == "amax/7" else step
    assert bool(((fq - w).abs() <= limit * (1 + 1e-2)).all())


def test_all_zero_weight_and_fp16_scales_stay_finite() -> None:
    w = torch.zeros(4, 64)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(fake_quantize(w, QuantSpec(scale_dtype=dtype)), w)


def test_straight_through_gradient_is_the_identity() -> None:
    torch.manual_seed(0)
    w = torch.randn(3, 16, 64, requires_grad=True)
    upstream = torch.randn(3, 16, 64)
    fake_quantize(w, QuantSpec(scale_rule="amax/7.5")).backward(upstream)  # the extreme weight clips here
    assert torch.equal(w.grad, upstream)


def test_compressed_tensors_decompressor_reproduces_fake_quant() -> None:
    """The serving-side library (fp32 scales) reads our packed tensors back to exactly the learner's weights."""
    from rl.policy.export import quantization_config

    spec = QuantSpec(group_size=64)
    w = torch.randn(48, 192)
    packed = PackedInt4.from_weight(w, spec)
    scheme = QuantizationConfig.model_validate(quantization_config(spec, [])).config_groups["group_0"]
    parts = {
        "weight_packed": packed.packed,
        "weight_scale": packed.scale.float(),
        "weight_shape": torch.tensor(packed.shape),
    }
    assert torch.equal(PackedQuantizationCompressor.decompress(parts, scheme)["weight"], fake_quantize(w, spec))


def test_quant_config_errors_name_the_field(make_cfg) -> None:
    with pytest.raises(ConfigError, match="quant.group_size"):
        make_cfg("quant.group_size=48")
    with pytest.raises(ConfigError, match="quant.scale_rule"):
        make_cfg("quant.scale_rule=amax/8")
    with pytest.raises(ConfigError, match="did you mean 'quant.group_size'"):
        make_cfg("quant.groupsize=32")


def test_targets_routed_experts_by_default_and_all_linear_on_request(tiny_policy_dir, make_cfg) -> None:
    model, _ = load_policy(tiny_policy_dir, make_cfg().model)
    experts = targeted_parameters(model, QuantSpec.from_config(QuantConfig(enabled=True)))
    assert experts == [f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")]
    linear = targeted_parameters(model, QuantSpec.from_config(QuantConfig(enabled=True, modules="all_linear")))
    assert (
        "model.layers.0.self_attn.q_proj.weight" in linear
        and "model.layers.1.mlp.shared_experts.down_proj.weight" in linear
    )
    assert set(experts) <= set(linear)
    assert not any("lm_head" in n or "embed" in n or "norm" in n or n.endswith("mlp.gate.weight") for n in linear)
    custom = QuantSpec.from_config(QuantConfig(enabled=True, modules="all_linear", ignore=[r"self_attn\."]))
    assert not any("self_attn" in n for n in targeted_parameters(model, custom))
    with pytest.raises(ValueError, match="quant.modules=all_linear"):
        targeted_parameters(model, QuantSpec(targets=(r"no_such_module",)))


@pytest.mark.parametrize("targets", ["routed_experts", "all_linear"])
@pytest.mark.parametrize(
    "activation,dense_min_rows", [(torch.float32, None), (torch.float32, 1), (torch.bfloat16, None)]
)
def test_int4_engine_runs_the_fake_quant_model(tiny_policy_dir, make_cfg, targets, activation, dense_min_rows) -> None:
    model, _ = load_policy(tiny_policy_dir, make_cfg().model)
    spec = QuantSpec.from_config(QuantConfig(enabled=True, modules=targets))
    names = targeted_parameters(model, spec)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name in names:
                param.copy_(fake_quantize(param, spec))
    int4 = copy.deepcopy(model)
    convert_to_int4(int4, spec, names, activation, dense_min_rows)

    int4_modules = [m for m in int4.modules() if isinstance(m, (Int4Linear, Int4Experts))]
    assert len(int4_modules) == (2 if targets == "routed_experts" else len(names) - 2)
    assert set(int4.state_dict()) == set(model.state_dict()) - set(names)  # the rest untouched, same names
    for name, tensor in int4.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    kernels = [
        mm.kernel_weight is not None for m in int4_modules for mms in getattr(m, "int4", {}).values() for mm in mms
    ]
    assert kernels and all(kernels)  # the tiny model's expert shapes all run torch's INT4 kernel

    ids = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.log_softmax(reference(ids).logits, -1)
        got = torch.log_softmax(int4(ids).logits, -1)
        dense = torch.log_softmax(model(ids).logits, -1)
    gap, quant_gap = float((got - expected).abs().mean()), float((dense - expected).abs().mean())
    assert quant_gap > 1e-4  # quantization moves this model's logprobs...
    if activation == torch.float32:
        assert gap < 1e-3 * quant_gap  # ...the INT4 engine does not: same weights, only the summation order differs
    else:
        assert gap < 0.5 * quant_gap  # bf16 activations: precision noise, below the quantization effect


def test_weight_sync_payload_is_under_0_3x_of_bf16(tiny_policy_dir, make_cfg) -> None:
    model, _ = load_policy(tiny_policy_dir, make_cfg().model)
    spec = QuantSpec()
    names = targeted_parameters(model, spec)
    payload = pack_state_dict(model.state_dict(), spec, names)
    sizes = payload_nbytes(payload)
    numel = sum(model.get_parameter(n).numel() for n in names)
    assert sizes["int4_weights_bf16_bytes"] == 2 * numel
    assert sizes["int4_bytes"] == numel // 2 + 2 * numel // 32  # 4 bits per weight + a bf16 scale per 32
    assert sizes["int4_bytes"] / sizes["int4_weights_bf16_bytes"] <= 0.3
    for name, value in payload.items():  # ignored weights travel unchanged
        if name not in names:
            assert torch.equal(value, model.state_dict()[name])


def _batch(worker: RolloutWorker, cfg) -> TrainBatch:
    trajectories = worker.generate(calculator_rows(4), cfg.rollout.samples_per_prompt)
    scored = RewardScorer(cfg.reward).score(trajectories).scored
    rewards = torch.tensor([s.reward for s in scored])
    advantages = grpo(rewards, torch.tensor([s.trajectory.group_id for s in scored]))
    return TrainBatch.from_scored(scored, advantages, worker.renderer.pad_token_id)


def test_qat_learner_matches_int4_rollouts_and_ptq_does_not(tiny_policy_dir, make_cfg) -> None:
    base = (f"reward.functions=[{{name: '{LENGTH_REWARD}'}}]", "rollout.samples_per_prompt=4", "quant.enabled=true")
    cfg = make_cfg(*base)
    worker = RolloutWorker(str(tiny_policy_dir), cfg.worker_spec(), 0)
    batch = _batch(worker, cfg)

    qat = Learner(str(tiny_policy_dir), cfg.learner_spec())
    worker.load_weights(qat.get_weights(), 0)
    metrics_qat = qat.train_step(batch)
    ptq = Learner(str(tiny_policy_dir), make_cfg(*base, "quant.mode=ptq").learner_spec())
    metrics_ptq = ptq.train_step(batch)

    assert metrics_qat["fake_quant"] == 1.0 and metrics_ptq["fake_quant"] == 0.0
    assert metrics_qat["mismatch_abs_logp"] < 1e-5
    assert metrics_ptq["mismatch_abs_logp"] > 100 * metrics_qat["mismatch_abs_logp"]
    # attribution: the learner's own with/without fake-quant gap accounts for PTQ's whole mismatch
    assert metrics_ptq["mismatch_quant_abs_logp"] == pytest.approx(metrics_ptq["mismatch_abs_logp"], rel=1e-3)
    assert metrics_qat["mismatch_quant_abs_logp"] == pytest.approx(metrics_ptq["mismatch_quant_abs_logp"], rel=1e-3)
    assert metrics_qat["policy_lag_mean"] == 0.0 and "mismatch_stale_abs_logp" not in metrics_qat

    # the next batch is generated by version-1 INT4 weights; a learner one version ahead sees it as stale
    worker.load_weights(qat.get_weights(), qat.version)
    stale_batch = _batch(worker, cfg)
    qat.version += 1  # as if another update had landed in between (an asynchronous pipeline)
    lagged = qat.train_step(stale_batch)
    assert lagged["policy_lag_mean"] == 1.0 and lagged["mismatch_stale_abs_logp"] == pytest.approx(
        lagged["mismatch_abs_logp"]
    )


def test_qat_gradient_is_the_gradient_at_the_fake_quant_weights(tiny_policy_dir, make_cfg) -> None:
    """STE in the learner: d loss / d master weight == d loss / d weight evaluated at fake_quant(master)."""
    cfg = make_cfg("quant.enabled=true", "quant.measure_attribution=false")
    learner = Learner(str(tiny_policy_dir), cfg.learner_spec())
    ids = torch.randint(0, learner.model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    attn = torch.ones_like(ids)
    logp, _ = learner.sequence_logprobs(ids, attn, fake_quant=True)
    logp.sum().backward()
    reference = copy.deepcopy(learner.model)
    reference.zero_grad()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name in learner.quant_targets:
                param.copy_(fake_quantize(param, learner.quant))
    logits = reference(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).sum().backward()
    for name, param in learner.model.named_parameters():
        ref = reference.get_parameter(name).grad
        assert torch.allclose(param.grad, ref, atol=1e-6, rtol=1e-5), name


def test_fake_quant_can_start_late(tiny_policy_dir, make_cfg) -> None:
    learner = Learner(
        str(tiny_policy_dir), make_cfg("quant.enabled=true", "quant.fake_quant_start_step=3").learner_spec()
    )
    active = []
    for version in range(4):
        learner.version = version
        active.append(learner.fake_quant_active())
    assert active == [False, False, True, True]  # RL steps 1, 2 train dense; from step 3 through fake-quant


def test_export_roundtrip_reproduces_fake_quant_bit_for_bit(tiny_policy_dir, make_cfg, tmp_path) -> None:
    quant = QuantConfig(enabled=True, group_size=32)
    out = export_policy(tiny_policy_dir, quant, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["input_activations"] is None
    w = group["weights"]
    assert (w["num_bits"], w["type"], w["symmetric"], w["strategy"], w["group_size"], w["dynamic"]) == (
        4,
        "int",
        True,
        "group",
        32,
        False,
    )
    assert "lm_head" in qc["ignore"] and "model.layers.0.self_attn.q_proj" in qc["ignore"]
    assert (
        "model.layers.1.mlp.shared_experts.down_proj" in qc["ignore"]
        and "model.layers.1.mlp.experts.0.up_proj" not in qc["ignore"]
    )

    from safetensors.torch import load_file

    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.1.mlp.experts.3.gate_proj.weight_packed"].dtype == torch.int32
    assert tensors["model.layers.1.mlp.experts.3.gate_proj.weight_scale"].dtype == torch.bfloat16
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" not in tensors

    master, _ = load_policy(tiny_policy_dir, make_cfg().model)
    loaded, tokenizer = load_exported(out)
    assert loaded.state_dict().keys() == master.state_dict().keys()
    spec = QuantSpec.from_config(quant)
    targets = set(targeted_parameters(master, spec))
    for name, tensor in master.state_dict().items():
        expected = fake_quantize(tensor, spec) if name in targets else tensor
        assert torch.equal(loaded.state_dict()[name], expected), name
    # and `model.path` can point at the export: load_policy decompresses it
    again, _ = load_policy(out, make_cfg().model)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in loaded.state_dict().items())
    assert tokenizer.chat_template is not None


def test_qat_job_end_to_end_then_export_cli(ray_local, make_cfg, tmp_path) -> None:
    """A whole QAT job (INT4 rollouts, packed sync), then `tiderl export` on its run directory, as a user would."""
    import subprocess
    import sys

    from rl.loop.controller import train

    run_dir = tmp_path / "run"
    train(make_cfg("quant.enabled=true", "quant.attribution_every=1", "eval.enabled=false"), run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["fake_quant"] for r in rows] == [1.0, 1.0]
    assert all(r["mismatch_abs_logp"] < 1e-5 < r["mismatch_quant_abs_logp"] for r in rows)
    sync = json.loads((run_dir / "weight_sync.json").read_text())
    assert sync["int4_vs_bf16"] == pytest.approx(0.28125) and sync["int4_bytes"] > 0

    out = tmp_path / "export"
    done = subprocess.run(
        [sys.executable, "-m", "rl.launch.cli", "export", str(run_dir), str(out), "--step", "2"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    master, _ = load_policy(run_dir / "checkpoints" / "step_000002" / "policy", make_cfg().model)
    loaded, _ = load_exported(out)
    spec = QuantSpec()
    targets = set(targeted_parameters(master, spec))
    for name, tensor in master.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], fake_quantize(tensor, spec) if name in targets else tensor), name

    missing = subprocess.run(
        [sys.executable, "-m", "rl.launch.cli", "export", str(tmp_path / "nope"), str(out)],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "no config.yaml" in missing.stderr
    wrong_step = subprocess.run(
        [sys.executable, "-m", "rl.launch.cli", "export", str(run_dir), str(out), "--step", "7"],
        capture_output=True,
        text=True,
    )
    assert wrong_step.returncode == 2 and "no checkpoint for step 7" in wrong_step.stderr
