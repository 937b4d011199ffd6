"""INT4 recovery (`rl.policy.recovery`): the distilled INT4 policy is closer to full precision, cached, and only
offered where it applies."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from rl.config import ConfigError
from rl.loop.data import load_split
from rl.policy.recovery import _kl_sum, _teacher_samples, recover_int4, recovered_config, recovery_key
from rl.trainer.forward import head_on_hidden_states
from rollouts.model import load_policy
from rollouts.quant import QuantSpec, fake_quantize, targeted_parameters

RECOVERY = (
    "quant.enabled=true",
    "quant.mode=qat",
    "quant.modules=all_linear",
    "int4_recovery.steps=12",
    "int4_recovery.prompts=16",
    "int4_recovery.batch_size=8",
    "int4_recovery.lr=3e-5",
)


def _int4_kl(cfg, policy_dir, samples) -> float:
    """Mean per-token KL(full-precision source || INT4 round trip of `policy_dir`) on the teacher's samples."""
    teacher, tokenizer = load_policy(cfg.model.path, cfg.model)
    student, _ = load_policy(policy_dir, recovered_config(cfg, policy_dir).model)
    spec = QuantSpec.from_config(cfg.quant)
    params = dict(student.named_parameters())
    swapped = {n: fake_quantize(params[n], spec) for n in targeted_parameters(student, spec)}
    with torch.no_grad():
        kl = _kl_sum(teacher, student, swapped, samples, tokenizer.pad_token_id, head_on_hidden=True)
    return kl.item() / sum(t.response_length for t in samples)


def test_recovery_brings_the_int4_policy_closer_to_full_precision(make_cfg, tool_policy_dir, tmp_path):
    cfg = make_cfg(f"model.path={tool_policy_dir}", *RECOVERY)
    rows = load_split(cfg, "train", tmp_path / "data")
    messages: list[str] = []
    recovered = recover_int4(cfg, tool_policy_dir, rows, log=messages.append)
    report = json.loads((recovered / "recovery.json").read_text())
    assert len(report["kl_by_step"]) == 12 and report["teacher_samples"] == 16
    held_out = _teacher_samples(cfg.model_copy(update={"seed": cfg.seed + 1}), tool_policy_dir, rows[16:32])
    before, after = _int4_kl(cfg, tool_policy_dir, held_out), _int4_kl(cfg, recovered, held_out)
    assert after < 0.8 * before, (before, after)  # on prompts it never saw

    assert recover_int4(cfg, tool_policy_dir, rows, log=messages.append) == recovered
    assert messages[-1].startswith("using cached INT4-recovered policy")
    other = make_cfg(f"model.path={tool_policy_dir}", *RECOVERY, "int4_recovery.lr=1e-3")
    assert recover_int4(other, tool_policy_dir, rows, log=messages.append) != recovered


def test_kl_on_the_sampled_tokens_states_is_the_whole_sequences_kl(make_cfg, tool_policy_dir, tmp_path):
    """The output embedding on the sampled tokens' hidden states only (the fast path) gives the KL and gradients of
    whole-sequence logits masked to those tokens."""
    cfg = make_cfg(f"model.path={tool_policy_dir}", *RECOVERY)
    samples = _teacher_samples(cfg, tool_policy_dir, load_split(cfg, "train", tmp_path / "data")[:6])
    first = int(samples[0].loss_mask.argmax())
    samples[0].loss_mask[first + 2 : first + 5] = 0  # a span the loss leaves out mid-sample, as a tool result
    cut = samples[1]  # and a shorter sample, so that the batch pads
    cut.token_ids, cut.loss_mask = cut.token_ids[: first + 6], cut.loss_mask[: first + 6]
    assert samples[0].loss_mask[first + 5 :].any() and len({len(t.token_ids) for t in samples}) > 1
    teacher, tokenizer = load_policy(tool_policy_dir, cfg.model)
    student = copy.deepcopy(teacher)
    assert head_on_hidden_states(teacher)
    spec = QuantSpec.from_config(cfg.quant)
    params = dict(student.named_parameters())
    out = {}
    for head_on_hidden in (True, False):
        swapped = {
            n: fake_quantize(params[n].detach(), spec).requires_grad_() for n in targeted_parameters(student, spec)
        }
        kl = _kl_sum(teacher, student, swapped, samples, tokenizer.pad_token_id, head_on_hidden)
        kl.backward()
        out[head_on_hidden] = kl.item(), {n: leaf.grad for n, leaf in swapped.items()}
    (fast, fast_grads), (whole, whole_grads) = out[True], out[False]
    assert fast > 1e-3 and fast == pytest.approx(whole, rel=1e-5)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-4 * float(grad.abs().max()))


def test_recovery_needs_quantization(make_cfg):
    with pytest.raises(ConfigError, match=r"int4_recovery.steps=12 distils the INT4 policy.*set int4_recovery.steps=0"):
        make_cfg(*RECOVERY, "quant.enabled=false")
    # PTQ starts from the same recovered policy as QAT (the recovery key leaves the mode out)
    assert make_cfg(*RECOVERY, "quant.mode=ptq").int4_recovery.steps == 12


def test_bf16_compute_recovers_into_its_own_cache_entry(make_cfg, tool_policy_dir, tmp_path):
    """`trainer.compute_dtype=bfloat16` distils under autocast too, so its recovered policy is another cache entry;
    float32 (the default) keeps the key it had before the setting existed."""
    cfg = make_cfg(f"model.path={tool_policy_dir}", *RECOVERY)
    rows = load_split(cfg, "train", tmp_path / "data")[:16]
    keys = {
        dtype: recovery_key(make_cfg(f"model.path={tool_policy_dir}", *RECOVERY, f"trainer.compute_dtype={dtype}"),
                            tool_policy_dir, rows)
        for dtype in ("float32", "bfloat16")
    }  # fmt: skip
    assert keys["float32"] == recovery_key(cfg, tool_policy_dir, rows) != keys["bfloat16"]
