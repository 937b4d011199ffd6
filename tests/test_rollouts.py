"""Renderer, tool-call parsing, the KV-cached engine and the tool loop's loss mask, on the tiny built-in policy."""

from __future__ import annotations

import asyncio

import pytest
import torch

from envs.base import PromptRow, ToolCall
from envs.calculator import CALC_TOOL, CalculatorEnv, evaluate
from envs.config import EnvConfig
from rewards.calculator import compute_score
from rl.loop.data import to_prompt_row
from rl.tasks.calculator import make_rows as make_calculator_rows
from rollouts.agent_loop import AgentLoop
from rollouts.config import RolloutConfig
from rollouts.engine import Engine, Generation
from rollouts.model import load_policy
from rollouts.records import TrajectoryStatus
from rollouts.renderer import Renderer
from rollouts.tool_parsers import parse_hermes as parse_tool_calls


def calculator_rows(n: int) -> list[PromptRow]:
    return [to_prompt_row(i, row) for i, row in enumerate(make_calculator_rows(n, seed=0, split="eval"))]


@pytest.fixture(scope="module")
def policy(tiny_policy_dir, make_cfg):
    return load_policy(tiny_policy_dir, make_cfg().model)


def test_calculator_tool_and_verifier() -> None:
    assert evaluate("37*4+19") == 167 and evaluate("(2+3)*-4") == -20 and evaluate("7/2") == 3.5
    for bad in ["__import__('os')", "2**2", "1/0", "x+1"]:
        with pytest.raises(ValueError):
            evaluate(bad)
    assert compute_score("tiderl/calculator", "<think>calc says 167.</think>The answer is 167.", "167") == {
        "score": 1.0,
        "acc": True,
    }
    # numbers inside the thinking do not count, only the visible answer
    assert compute_score("tiderl/calculator", "<think>167</think>The answer is 166.", "167")["acc"] is False
    assert compute_score("tiderl/calculator", "no number", "167")["score"] == 0.0
    result = asyncio.run(
        CalculatorEnv().step(
            [ToolCall("calc", {"expression": "6*7"}), ToolCall("calc", {"expr": "1"}), ToolCall("sh", {})]
        )
    )
    assert [o["content"] for o in result.observations][0] == "42"
    assert result.info["tool_errors"] == 2 and result.observations[2]["content"].startswith("Error: unknown tool 'sh'")


def test_parse_tool_calls_wellformed_and_malformed() -> None:
    text = (
        '<think>x</think><tool_call>{"name": "calc", "arguments": {"expression": "1+2"}}</tool_call>'
        '<tool_call>{"name": "calc", "arguments": "{\\"expression\\": \\"3\\"}"}</tool_call>'
    )
    calls, errors = parse_tool_calls(text)
    assert calls == [ToolCall("calc", {"expression": "1+2"}), ToolCall("calc", {"expression": "3"})] and errors == []
    calls, errors = parse_tool_calls(
        '<tool_call>{"name": calc}</tool_call><tool_call>[1]</tool_call><tool_call>{"name": "a"'
    )
    assert calls == [] and len(errors) == 3
    assert "not valid JSON" in errors[0] and "needs a string 'name'" in errors[1] and "unterminated" in errors[2]


def test_piecewise_tokens_decode_to_the_chat_template_rendering(policy) -> None:
    _, tokenizer = policy
    renderer = Renderer(tokenizer)
    prompt = [{"role": "user", "content": "Compute 2*3+4."}]
    call = {"type": "function", "function": {"name": "calc", "arguments": {"expression": "2*3+4"}}}
    turns = [
        {"role": "assistant", "content": "<think>I need calc.</think>", "tool_calls": [call]},
        {"role": "tool", "content": "10"},
        {"role": "assistant", "content": "The answer is 10."},
    ]
    ids = (
        renderer.prompt_ids(prompt, [CALC_TOOL])
        + renderer.assistant_ids(turns[0])
        + renderer.observation_ids([turns[1]])
        + renderer.assistant_ids(turns[2])
    )
    full = tokenizer.apply_chat_template(prompt + turns, tools=[CALC_TOOL], tokenize=False)
    assert tokenizer.decode(ids) + "\n" == full


def test_renderings_are_remembered_per_conversation(policy) -> None:
    """A group's samples share one rendering of their prompt (and of an equal tool result): the same tokens as a
    fresh renderer's, a caller's edits to the returned list do not leak into the next call, other messages render
    anew."""
    _, tokenizer = policy
    renderer, fresh = Renderer(tokenizer), Renderer(tokenizer)
    prompt = [{"role": "user", "content": "Compute 2*3+4."}]
    first = renderer.prompt_ids(prompt, [CALC_TOOL])
    first.append(-1)
    assert renderer.prompt_ids(prompt, [CALC_TOOL]) == fresh.prompt_ids(prompt, [CALC_TOOL]) == first[:-1]
    assert (
        renderer.prompt_ids(prompt, None) == fresh.prompt_ids(prompt, None) != first[:-1]
    )  # no tools offered: another prompt
    other = [{"role": "user", "content": "Compute 2*3+5."}]
    assert renderer.prompt_ids(other, [CALC_TOOL]) == fresh.prompt_ids(other, [CALC_TOOL]) != first[:-1]
    tool = [{"role": "tool", "content": "10"}]
    assert (
        renderer.observation_ids(tool)
        == renderer.observation_ids(tool)
        == fresh.observation_ids(tool)
        != renderer.observation_ids([{"role": "tool", "content": "11"}])
    )
    assert len(renderer._rendered) == 5


def test_engine_greedy_matches_hf_generate_and_logprobs_match_a_full_forward(policy) -> None:
    model, tokenizer = policy
    renderer = Renderer(tokenizer)
    prompts = [renderer.prompt_ids(r.messages, [CALC_TOOL]) for r in calculator_rows(6)]
    prompts[1] = prompts[1][3:]  # uneven lengths exercise left padding
    engine = Engine(model, renderer.pad_token_id, renderer.eos_token_id)
    outs = engine.generate(prompts, [10] * len(prompts), temperature=1.0, greedy=True)
    for prompt, out in zip(prompts, outs, strict=True):
        ref = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=renderer.eos_token_id,
            pad_token_id=renderer.pad_token_id,
        )
        assert out.token_ids == ref[0, len(prompt) :].tolist()[: len(out.token_ids)]
        full = torch.tensor([prompt + out.token_ids])
        logp = torch.log_softmax(model(input_ids=full).logits[0, :-1].float(), -1).gather(-1, full[0, 1:, None])[:, 0]
        assert torch.allclose(logp[len(prompt) - 1 :], torch.tensor(out.logprobs), atol=1e-4)


class ScriptedEngine:
    """Plays fixed turns: a tool call, then an answer (a scripted policy for the loop's bookkeeping). Each batch
    step answers every waiting request with the next scripted turn."""

    def __init__(self, renderer: Renderer, turns: list[str]) -> None:
        self.turn_ids = [renderer.encode(t) + [renderer.eos_token_id] for t in turns]
        self.calls = 0
        self.waiting: list = []

    def batcher(self, sampling, slots, max_len):
        return self

    @property
    def busy(self) -> bool:
        return bool(self.waiting)

    def submit(self, request, on_done) -> None:
        self.waiting.append(on_done)

    def step(self) -> None:
        ids = self.turn_ids[self.calls]
        self.calls += 1
        waiting, self.waiting = self.waiting, []
        for on_done in waiting:
            on_done(Generation(ids, [-0.5] * len(ids)))


def test_tool_loop_loss_mask_covers_exactly_the_policy_tokens(policy) -> None:
    _, tokenizer = policy
    renderer = Renderer(tokenizer)
    turns = [
        '<think>I need calc.</think><tool_call>{"name": "calc", "arguments": {"expression": "6*7+1"}}</tool_call>',
        "<think>calc says 43.</think>The answer is 43.",
    ]
    engine = ScriptedEngine(renderer, turns)
    loop = AgentLoop(engine, renderer, CalculatorEnv, RolloutConfig(), EnvConfig())
    row = PromptRow(0, [{"role": "user", "content": "Compute 6*7+1."}], "tiderl/calculator", "43")
    (traj,) = loop.run([row], 1, policy_version=5, greedy=True, generator=torch.Generator())
    prompt = renderer.prompt_ids(row.messages, [CALC_TOOL])
    turn1, turn2 = engine.turn_ids
    obs = renderer.observation_ids([{"role": "tool", "name": "calc", "content": "43"}])
    assert traj.token_ids.tolist() == prompt + turn1 + obs + turn2
    assert traj.loss_mask.tolist() == [0.0] * len(prompt) + [1.0] * len(turn1) + [0.0] * len(obs) + [1.0] * len(turn2)
    assert torch.equal(traj.logprobs != 0, traj.loss_mask.bool())
    assert (traj.status, traj.num_tool_calls, traj.num_turns, traj.policy_version) == (
        TrajectoryStatus.FINISHED,
        1,
        2,
        5,
    )
    assert traj.response_text == turns[1] and traj.prompt_length == len(prompt)
    assert traj.messages[-2] == {"role": "tool", "name": "calc", "content": "43"}


def test_malformed_call_becomes_an_error_observation_and_budgets_truncate(policy) -> None:
    _, tokenizer = policy
    renderer = Renderer(tokenizer)
    engine = ScriptedEngine(renderer, ["<tool_call>{oops}</tool_call>"] * 4)
    loop = AgentLoop(engine, renderer, CalculatorEnv, RolloutConfig(), EnvConfig(max_turns=3))
    row = PromptRow(0, [{"role": "user", "content": "Compute 1+1."}], "tiderl/calculator", "2")
    (traj,) = loop.run([row], 1, 0, True, torch.Generator())
    assert traj.status is TrajectoryStatus.TRUNCATED and traj.num_turns == 3
    assert (
        traj.num_tool_errors == 2
        and "not valid JSON" in traj.messages[2]["content"]
        and traj.messages[2]["role"] == "tool"
    )


@pytest.mark.parametrize("weights", ["fp32", "int4"])
def test_engine_batch_of_16_gives_hf_generates_greedy_tokens(tiny_policy_dir, make_cfg, weights: str) -> None:
    """What benchmarks/engine_vs_hf.py times, checked: the same left-padded batch of 16, decoded greedily for a
    fixed length by our engine and by HF `generate`, gives the same token sequences, in full precision and with
    the routed experts running tiderl's INT4 modules."""
    import copy

    from rollouts.int4 import convert_to_int4
    from rollouts.quant import QuantSpec, targeted_parameters
    from rollouts.worker import int4_kernel_settings

    cfg = make_cfg("quant.enabled=true")
    model, tokenizer = load_policy(tiny_policy_dir, cfg.model)
    model = copy.deepcopy(model)
    if weights == "int4":
        spec = QuantSpec.from_config(cfg.quant)
        convert_to_int4(
            model, spec, targeted_parameters(model, spec), *int4_kernel_settings(cfg.quant, cfg.model.dtype)
        )
    renderer = Renderer(tokenizer)
    prompts = [
        renderer.prompt_ids(r.messages, None)[i % 3 :] for i, r in enumerate(calculator_rows(16))
    ]  # uneven: left padding
    outs = Engine(model, renderer.pad_token_id, stop_token_id=-1).generate(
        prompts, [12] * 16, temperature=1.0, greedy=True
    )
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[renderer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    ref = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=12,
        min_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=renderer.pad_token_id,
    )
    assert [o.token_ids for o in outs] == ref[:, width:].tolist()
