"""The rollout engine: its slot decoder against the HF forward, continuous batching, shared group prefill, and
on-device sampling."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config

from rollouts.decoder import Decoder
from rollouts.engine import Engine, Request, SamplingParams
from rollouts.int4 import Int4Linear, convert_to_int4
from rollouts.model import load_policy
from rollouts.projections import _Int4Projection
from rollouts.quant import QuantSpec, targeted_parameters
from rollouts.sampling import _sample, uniform
from rollouts.worker import int4_kernel_settings

VOCAB = 97


def small(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 128,
    }
    if kind == "llama":
        config = LlamaConfig(**common, num_key_value_heads=2)
    elif kind == "qwen3":
        config = Qwen3Config(**common, num_key_value_heads=2, head_dim=16)
    elif kind == "qwen2":  # biases on q, k and v (the decoder stacks them with the weights)
        config = Qwen2Config(**common, num_key_value_heads=2)
    else:
        config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def ragged_prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(1, VOCAB, (int(torch.randint(5, 20, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]


def hf_last_logits(model, seqs: list[list[int]]) -> torch.Tensor:
    return torch.stack([model(torch.tensor([s])).logits[0, -1].float() for s in seqs])


@pytest.fixture(scope="module")
def k2(tiny_policy_dir, make_cfg):
    return load_policy(tiny_policy_dir, make_cfg().model)


@pytest.mark.parametrize(
    "kind", ["deepseek_v3", "deepseek_v3-int4", "llama", "llama-int4", "qwen2", "qwen2-int4", "qwen3"]
)
@torch.inference_mode()
def test_decoder_logits_match_the_hf_forward(kind, k2, make_cfg) -> None:
    if kind.startswith("deepseek_v3"):
        model = copy.deepcopy(k2[0])
        if kind.endswith("int4"):
            cfg = make_cfg("quant.enabled=true")
            spec = QuantSpec.from_config(cfg.quant)
            convert_to_int4(
                model, spec, targeted_parameters(model, spec), *int4_kernel_settings(cfg.quant, cfg.model.dtype)
            )
        vocab = model.config.vocab_size
        prompts = [[t % vocab for t in p] for p in ragged_prompts(5)]
    else:
        model, prompts = small(kind.removesuffix("-int4")), ragged_prompts(5)
        if kind.endswith("int4"):  # every linear layer: prefill's rows run stacked dequantized weights (q/k/v and
            # gate/up as one matmul each), decode's 7 or 2 rows each module's packed kernel (dense_min_rows is 8)
            cfg = make_cfg("quant.enabled=true", "quant.modules=all_linear")
            spec = QuantSpec.from_config(cfg.quant)
            convert_to_int4(model, spec, targeted_parameters(model, spec), *int4_kernel_settings(cfg.quant, "float32"))
    decoder = Decoder(model, slots=7, max_len=64)
    decoder.refresh()
    # prompts 0 and 1 go to two slots each (a shared prefill); slot 4 stays idle and rides along in decode
    slots = [[0, 5], [1, 6], [2], [3], [4]][: len(prompts)]
    ids = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    logits = decoder.prefill(ids, torch.tensor([len(p) for p in prompts]), slots)
    assert torch.allclose(logits, hf_last_logits(model, prompts), atol=1e-4)
    if kind in ("llama-int4", "qwen2-int4"):  # the prefill ran the stacked weights: q/k/v's and gate/up's cached
        stacked = [m for m in model.modules() if isinstance(m, Int4Linear) and hasattr(m, "_stacked_dense")]
        assert len(stacked) == 4 * 2  # per layer: q (owning q/k/v), o, gate (owning gate/up), down
    by_slot = {s: list(prompts[i]) for i, group in enumerate(slots) for s in group}
    order = sorted(by_slot)
    logits = torch.stack([logits[next(i for i, g in enumerate(slots) if s in g)] for s in order])
    g = torch.Generator().manual_seed(1)
    for _ in range(6):  # sampled continuations: the two slots of one prompt diverge
        tokens = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)[:, 0]
        positions = torch.tensor([len(by_slot[s]) for s in order])
        for s, t in zip(order, tokens.tolist(), strict=True):
            by_slot[s].append(t)
        logits = decoder.decode(tokens, positions, int(positions.max()) + 1)
        assert torch.allclose(logits, hf_last_logits(model, [by_slot[s] for s in order]), atol=1e-4)
    # a next turn (`extend`): slots 0, 5, 1 continue after everything they hold with 1, 4 and 3 new tokens (a
    # tool's result), slot 3 after its first 4 positions only (the rest overwritten); slot 2 is not touched
    vocab = model.config.vocab_size
    rows, keep, new = [0, 5, 1, 3], [None, None, None, 4], [[7], [3, 9, 11, 2], [5, 5, 1], [8, 13]]
    starts = [len(by_slot[s]) if k is None else k for s, k in zip(rows, keep, strict=True)]
    ids = torch.zeros(len(rows), 4, dtype=torch.long)
    for i, toks in enumerate(new):
        ids[i, : len(toks)] = torch.tensor([t % vocab for t in toks])
        by_slot[rows[i]] = by_slot[rows[i]][: starts[i]] + ids[i, : len(toks)].tolist()
    logits = decoder.extend(ids, torch.tensor(starts), torch.tensor([len(t) for t in new]), torch.tensor(rows))
    assert torch.allclose(logits, hf_last_logits(model, [by_slot[s] for s in rows]), atol=1e-4)
    positions = torch.tensor([len(by_slot[s]) for s in order])
    tokens = torch.tensor([3 % vocab] * len(order))
    for s in order:
        by_slot[s].append(3 % vocab)
    logits = decoder.decode(
        tokens, positions, int(positions.max()) + 1
    )  # and decoding goes on from the extended caches
    assert torch.allclose(logits, hf_last_logits(model, [by_slot[s] for s in order]), atol=1e-4)
    some = [5, 1]  # a decode of some slots only (the others idle): their caches gathered
    positions = torch.tensor([len(by_slot[s]) for s in some])
    for s in some:
        by_slot[s].append(11 % vocab)
    logits = decoder.decode(
        torch.tensor([11 % vocab] * 2), positions, int(positions.max()) + 1, rows=torch.tensor(some)
    )
    assert torch.allclose(logits, hf_last_logits(model, [by_slot[s] for s in some]), atol=1e-4)


def test_a_model_the_decoder_does_not_cover_runs_its_own_forward_to_the_same_tokens() -> None:
    model = small("gpt2")
    engine = Engine(model, pad_token_id=0, stop_token_id=-1)
    assert not engine.continuous
    prompts = ragged_prompts(4)
    outs = engine.generate(prompts, [8] * 4, temperature=1.0, greedy=True)
    for p, out in zip(prompts, outs, strict=True):
        ref = model.generate(
            torch.tensor([p]), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None
        )
        assert out.token_ids == ref[0, len(p) :].tolist()
    with pytest.raises(ValueError, match="rollout engine runs deepseek_v3"):
        Decoder(model, 2, 32)


def test_continuous_batching_gives_each_request_the_tokens_it_gets_alone(k2) -> None:
    model, _ = k2
    prompts = [[t % model.config.vocab_size for t in p] for p in ragged_prompts(9, seed=4)]
    budgets = [3, 17, 9, 25, 1, 12, 30, 5, 20]  # uneven: sequences leave at different steps and waiting ones join
    wide = Engine(model, pad_token_id=0, stop_token_id=-1)
    narrow = Engine(model, pad_token_id=0, stop_token_id=-1, max_num_seqs=3)
    together = wide.generate(prompts, budgets, 1.0, greedy=False, generator=torch.Generator().manual_seed(7))
    queued = narrow.generate(prompts, budgets, 1.0, greedy=False, generator=torch.Generator().manual_seed(7))
    assert narrow.decoder(1, 1).slots == 3  # at most 3 at once: the others waited for a free slot
    assert [len(o.token_ids) for o in together] == budgets
    for a, b in zip(together, queued, strict=True):
        assert a.token_ids == b.token_ids and a.stop_reason == b.stop_reason == "length"
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)
    # a request's tokens depend on its seed only: alone, it samples what it sampled among the others
    seed = int(torch.randint(0, 2**62, (9,), generator=torch.Generator().manual_seed(7))[3])
    batcher = wide.batcher(SamplingParams(1.0), slots=1, max_len=64)
    alone: list = []
    batcher.submit(Request(prompts[3], budgets[3], seed), alone.append)
    while batcher.busy:
        batcher.step()
    assert alone[0].token_ids == together[3].token_ids


def test_a_group_prompt_is_prefilled_once_for_all_its_samples(k2, monkeypatch) -> None:
    model, _ = k2
    rows: list[int] = []
    original = Decoder.prefill
    monkeypatch.setattr(
        Decoder,
        "prefill",
        lambda self, ids, lengths, slots: rows.append(ids.shape[0]) or original(self, ids, lengths, slots),
    )
    a, b = [[t % model.config.vocab_size for t in p] for p in ragged_prompts(2, seed=9)]
    outs = Engine(model, 0, -1).generate(
        [a] * 8 + [b] * 4, [6] * 12, 1.0, greedy=False, generator=torch.Generator().manual_seed(0)
    )
    assert rows == [2]  # 12 sequences, 2 distinct prompts: one prefill row each
    assert len({tuple(o.token_ids) for o in outs[:8]}) > 1  # the group's samples still differ


def test_sampling_draws_from_the_tempered_distribution_and_honours_top_k_and_top_p() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 40000
    seeds = torch.arange(n) * 7919 + 11
    u = uniform(seeds, torch.zeros(n, dtype=torch.long))
    assert 0 < float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.005
    assert not torch.equal(uniform(seeds[:5], torch.ones(5, dtype=torch.long)), u[:5])  # the counter moves the draw
    for temperature in (1.0, 0.5):
        tok, logp = _sample(logits.expand(n, -1), SamplingParams(temperature), seeds, torch.zeros(n, dtype=torch.long))
        freq = torch.bincount(tok, minlength=6).float() / n
        expected = torch.softmax(logits / temperature, -1)
        assert torch.allclose(freq, expected, atol=0.01)
        assert torch.allclose(logp, expected.log()[tok], atol=1e-6)  # the full tempered distribution's logprob
    tok, _ = _sample(logits.expand(n, -1), SamplingParams(1.0, top_k=2), seeds, torch.zeros(n, dtype=torch.long))
    p2 = torch.softmax(logits[:2], -1)
    assert set(tok.tolist()) == {0, 1} and abs(float((tok == 0).float().mean()) - float(p2[0])) < 0.01
    probs = torch.softmax(logits, -1)  # top_p 0.75: tokens 0 and 1 hold 0.56 + 0.21, the smallest set reaching 0.75
    tok, _ = _sample(logits.expand(n, -1), SamplingParams(1.0, top_p=0.75), seeds, torch.zeros(n, dtype=torch.long))
    assert float(probs[:1].sum()) < 0.75 <= float(probs[:2].sum()) and set(tok.tolist()) == {0, 1}
    greedy, _ = _sample(
        logits.expand(3, -1), SamplingParams(1.0, greedy=True), seeds[:3], torch.zeros(3, dtype=torch.long)
    )
    assert greedy.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(1.0, top_p=0.0)


def test_bad_requests_are_refused_naming_the_problem(k2) -> None:
    batcher = Engine(k2[0], 0, -1).batcher(SamplingParams(), slots=2, max_len=16)
    with pytest.raises(ValueError, match="empty prompt"):
        batcher.submit(Request([], 4), print)
    with pytest.raises(ValueError, match="14 prompt \\+ 4 new tokens exceeds the batch's 16-token"):
        batcher.submit(Request([1] * 14, 4), print)
    done: list = []
    batcher.submit(Request([1, 2], 0), done.append)  # no budget left: done at once, nothing queued
    assert done[0].token_ids == [] and done[0].stop_reason == "length" and not batcher.busy


@pytest.mark.parametrize("kind", ["llama", "llama-int4"])
@torch.inference_mode()
def test_mixed_precision_decoder_multiplies_in_bf16_as_the_learners_autocast(kind, make_cfg) -> None:
    """`rollout.matmul_dtype=bfloat16` on a float32 model: the projections and the head multiply bf16 copies of
    the weights (an INT4 weight's: its float32 dequantized values rounded to bf16, what autocast makes of the
    learner's fake-quant), the rest stays float32. Its logits sit within bf16 rounding of the HF forward under bf16
    autocast, and measurably off the float32 forward."""
    model, prompts = small("llama"), ragged_prompts(4)
    if kind.endswith("int4"):
        cfg = make_cfg("quant.enabled=true", "quant.modules=all_linear")
        spec = QuantSpec.from_config(cfg.quant)
        convert_to_int4(model, spec, targeted_parameters(model, spec), *int4_kernel_settings(cfg.quant, "float32"))
    decoder = Decoder(model, slots=4, max_len=64, matmul_dtype=torch.bfloat16)
    decoder.refresh()
    ids = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    logits = decoder.prefill(ids, torch.tensor([len(p) for p in prompts]), [[i] for i in range(len(prompts))])
    assert logits.dtype == torch.float32
    exact = hf_last_logits(model, prompts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = hf_last_logits(model, prompts)
    scale = exact.abs().max()
    off_fp32, off_autocast = (logits - exact).abs().max() / scale, (logits - mixed).abs().max() / scale
    assert 1e-4 < off_fp32 < 3e-2 and off_autocast < 3e-2
    if kind.endswith("int4"):  # q/k/v stacked: the bf16 rounding of the INT4 values, as autocast casts them
        attn = model.model.layers[0].self_attn
        stacked = attn.q_proj._stacked_dense[1]
        dense = torch.cat([m.matmul.weight.dequantize(torch.float32) for m in (attn.q_proj, attn.k_proj, attn.v_proj)])
        assert stacked.weight.dtype == torch.bfloat16 and torch.equal(stacked.weight.t(), dense.bfloat16())
    tokens = logits.argmax(-1)
    step = decoder.decode(tokens, torch.tensor([len(p) for p in prompts]), max(map(len, prompts)) + 1)
    grown = [p + [int(t)] for p, t in zip(prompts, tokens, strict=True)]
    assert (step - hf_last_logits(model, grown)).abs().max() / scale < 3e-2
    if kind.endswith("int4"):  # under dense_min_rows too (one decode row): the bf16 product, not the INT4 kernel's
        qkv = _Int4Projection((attn.q_proj, attn.k_proj, attn.v_proj), torch.bfloat16)
        assert qkv.dense_min_rows > 1 and attn.q_proj.matmul.kernel_weight is not None
        x = torch.randn(1, model.config.hidden_size)
        exact = torch.cat([m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)], dim=-1)
        assert torch.equal(qkv(x), stacked(x)) and (qkv(x) - exact).abs().max() > 1e-4 * exact.abs().max()


def test_the_engine_computes_as_the_learner_unless_told_otherwise(make_cfg) -> None:
    """`rollout.matmul_dtype: auto` resolves to `trainer.compute_dtype` in the workers' spec."""
    assert make_cfg().worker_spec().rollout.matmul_dtype == "float32"
    assert make_cfg("trainer.compute_dtype=bfloat16").worker_spec().rollout.matmul_dtype == "bfloat16"
    spec = make_cfg("trainer.compute_dtype=bfloat16", "rollout.matmul_dtype=float32").worker_spec()
    assert spec.rollout.matmul_dtype == "float32"


@torch.inference_mode()
def test_a_model_on_its_own_forward_runs_mixed_precision_under_autocast() -> None:
    """`matmul_dtype=bfloat16` for a model the slot decoder does not cover: its HF forward runs under bf16
    autocast, as the learner's does, and greedy tokens are those of `generate` under the same autocast."""
    model = small("gpt2")
    engine = Engine(model, pad_token_id=0, stop_token_id=-1, matmul_dtype=torch.bfloat16)
    prompts = ragged_prompts(3)
    outs = engine.generate(prompts, [8] * 3, temperature=1.0, greedy=True)
    engine_fp32 = Engine(model, pad_token_id=0, stop_token_id=-1)
    assert engine_fp32.matmul_dtype is None
    fp32_logprobs = [o.logprobs for o in engine_fp32.generate(prompts, [8] * 3, temperature=1.0, greedy=True)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for p, out in zip(prompts, outs, strict=True):
            ref = model.generate(
                torch.tensor([p]),
                max_new_tokens=8,
                min_new_tokens=8,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
            assert out.token_ids == ref[0, len(p) :].tolist()
    assert any(o.logprobs != f for o, f in zip(outs, fp32_logprobs, strict=True))  # it did run in bf16
