"""Agents written with the `openai` package as environments (`env.name=agent.py:run`): the real `openai` client
against a rollout worker's real endpoint (uvicorn on a loopback port), the tiny built-in policy.

One in-process worker serves every case (tests/data/agent_modes.py dispatches on the row's mode): the trajectory
holds exactly the tokens and logprobs the endpoint returned, and the learner recomputes those logprobs; a rewritten
history splits the episode into sequences; malformed requests get OpenAI's error body while the worker keeps
serving; an agent that raises fails its own sample only, counted; 64 agent episodes with slow tools overlap; and a
short job trains on an agent's episodes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from envs.base import PromptRow
from envs.registry import ENVS

AGENT_FILE = Path(__file__).parent / "data" / "agent_modes.py"
AGENT = f"{AGENT_FILE}:run"
SYSTEM = {"role": "system", "content": "You are terse."}


def rows(mode: str, n: int, start: int = 0, **extra) -> list[PromptRow]:
    messages = [SYSTEM, {"role": "user", "content": "Compute 2+2."}]
    return [PromptRow(start + i, messages, "test", "4", {"mode": mode, **extra}) for i in range(n)]


@pytest.fixture(scope="module")
def agent_cfg(make_cfg):
    return make_cfg(f"env.name={AGENT}", "reward.functions=[]", "env.max_turns=8")


@pytest.fixture(scope="module")
def worker(tiny_policy_dir, agent_cfg):
    from rollouts.worker import RolloutWorker

    w = RolloutWorker(str(tiny_policy_dir), agent_cfg.worker_spec(), 0)
    yield w
    w.agents.endpoint.stop()


@pytest.fixture(scope="module")
def records():
    return ENVS.get(AGENT).__globals__["RECORDS"]


def sampled_positions(traj_mask: torch.Tensor) -> list[int]:
    return torch.nonzero(traj_mask).flatten().tolist()


def test_trajectory_holds_the_sampled_tokens_and_the_learners_logprobs(worker, records, agent_cfg, tiny_policy_dir):
    from rl.trainer.learner import Learner

    trajectories = worker.generate_step(rows("tool_loop", 2, start=100), [0, 1], 2, 0)
    # the untrained policy's replies are mostly cut at the agent's max_tokens=8: truncated, not failed
    assert len(trajectories) == 4 and all(t.status.value in ("finished", "truncated") for t in trajectories)
    for traj in trajectories[::2]:  # sample 0 of each row (RECORDS keeps the last sample of a row)
        assert traj.earlier == [] and traj.env_reward == 0.5
    traj = next(t for t in trajectories if t.sample_id == "100-1")
    turns = records["100-1"]
    assert len(turns) == 3 and traj.num_turns == 3
    ids = traj.token_ids.tolist()
    # each request's prompt is the sequence so far: the sampled tokens stay as sampled, nothing re-tokenized
    for turn in turns:
        assert ids[: len(turn["prompt"])] == turn["prompt"]
        assert ids[len(turn["prompt"]) : len(turn["prompt"]) + len(turn["tokens"])] == turn["tokens"]
    assert ids == turns[-1]["prompt"] + turns[-1]["tokens"]
    # the loss mask is 1 exactly on the sampled tokens, and their rollout logprobs are the ones the client got
    expected = [p for turn in turns for p in range(len(turn["prompt"]), len(turn["prompt"]) + len(turn["tokens"]))]
    assert sampled_positions(traj.loss_mask) == expected
    got = traj.logprobs[expected]
    sent = torch.tensor([lp for turn in turns for lp in turn["logprobs"]], dtype=torch.float32)
    assert torch.equal(got, sent)
    assert [s[:2] for s in traj.segments] == [(len(t["prompt"]), len(t["prompt"]) + len(t["tokens"])) for t in turns]
    assert {t["fingerprint"] for t in turns} == {"tiderl-policy-v0"}
    # the learner's forward scores the same tokens within float noise
    learner = Learner(str(tiny_policy_dir), agent_cfg.learner_spec())
    logp, _ = learner.sequence_logprobs(
        traj.token_ids[None], torch.ones_like(traj.token_ids)[None], fake_quant=learner.fake_quant_active()
    )
    gap = (logp[0, expected] - got).abs().max().item()
    assert gap < 1e-4, gap


def test_rewritten_history_splits_the_episode(worker, records):
    (traj,) = worker.generate_step(rows("rewrite", 1, start=200), [0], 1, 0)
    turns = records["200-0"]
    assert traj.error is None and traj.sample.context_rewrites == 1
    earlier, last = traj.sequences()
    # requests 1-2 share one sequence, 3-4 (after the summary) another; each holds its own tokens and logprobs
    assert earlier.token_ids.tolist() == turns[1]["prompt"] + turns[1]["tokens"]
    assert (
        turns[1]["prompt"][: len(turns[0]["prompt"]) + len(turns[0]["tokens"])]
        == turns[0]["prompt"] + turns[0]["tokens"]
    )
    assert last.token_ids.tolist() == turns[3]["prompt"] + turns[3]["tokens"]
    assert turns[2]["prompt"] == turns[3]["prompt"][: len(turns[2]["prompt"])]
    for seq, pair in ((earlier, turns[:2]), (last, turns[2:])):
        sent = [lp for t in pair for lp in t["logprobs"]]
        assert seq.logprobs[seq.loss_mask.bool()].tolist() == pytest.approx(sent, abs=0)
    assert traj.response_length == sum(len(t["tokens"]) for t in turns)
    # a dict reward: its components are kept and summed
    assert traj.env_reward == 1.25 and traj.sample.env_reward_parts == {"answer": 1.0, "format": 0.25}


def test_malformed_requests_get_error_bodies_and_the_worker_keeps_serving(worker, records):
    (traj,) = worker.generate_step(rows("malformed", 1, start=300), [0], 1, 0)
    seen = records["300-0"]
    for name, status, param in (
        ("not_json", 400, None),
        ("no_messages", 400, "messages"),
        ("bad_role", 400, "messages[0].role"),
        ("image_part", 400, "messages[0].content"),
        ("bad_max_tokens", 400, "max_tokens"),
        ("unknown_key", 401, None),
        ("no_route", 404, None),
        ("sdk_n2", 400, "n"),
    ):
        code, body = seen[name]
        assert code == status, name
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"], name
        assert body["error"]["param"] == param, name
    assert seen["unknown_key"][1]["error"]["code"] == "invalid_api_key"
    assert seen["models"] == ["tiderl-tiny"]
    # the good request after them was served and is the whole (one-request) trajectory
    assert traj.error is None and traj.token_ids.tolist() == seen["after"]["prompt"] + seen["after"]["tokens"]


def test_an_agent_that_raises_fails_only_its_sample(worker, agent_cfg):
    from rewards.scoring import RewardScorer

    before = worker.agents.failures
    batch = rows("tool_loop", 1, start=400) + rows("raises", 1, start=401) + rows("bad_return", 1, start=402)
    trajectories = worker.generate_step(batch, [0, 1, 2], 1, 0)
    failed = {t.sample_id: t.status.value == "error" for t in trajectories}
    assert failed == {"400-0": False, "401-0": True, "402-0": True}
    errors = {t.sample_id: t.error for t in trajectories if t.error}
    assert "raised RuntimeError: agent bug on row 401" in errors["401-0"]
    assert "returned str 'yes'" in errors["402-0"]
    assert worker.agents.failures - before == 2
    result = RewardScorer(agent_cfg.reward).score(trajectories)
    assert result.failed == 2 and result.metrics["rollout_errors"] == 2
    assert [s.trajectory.sample_id for s in result.scored] == ["400-0"] and result.scored[0].reward == 0.5


def test_agent_episodes_overlap(worker):
    """64 episodes on one worker, each calling a slow tool between two requests: all 64 are in their tool at once
    (the tool waits until they are, which episodes run one after another never reach), so a step pays a tool's wait
    about once. The wall clock is printed; docs/agents.md has it against the compute floor on an idle machine."""
    in_tool = ENVS.get(AGENT).__globals__["IN_TOOL"]
    in_tool["most"] = 0
    start = time.perf_counter()
    batch = rows("slow_tools", 64, start=500, sleep=0.25, gather=64)
    trajectories = worker.generate_step(batch, list(range(64)), 1, 0)
    print(f"64 episodes with a 0.25 s tool: {time.perf_counter() - start:.1f} s")
    assert [t.num_turns for t in trajectories] == [2] * 64 and all(t.error is None for t in trajectories)
    assert in_tool["most"] == 64, in_tool


def test_preflight_checks_agent_functions(make_cfg, tmp_path):
    from rl.launch.preflight import check_references

    assert check_references(make_cfg(f"env.name={AGENT}", "reward.functions=[]")) == []
    sync = check_references(make_cfg(f"env.name={AGENT_FILE}:sync_run"))
    assert any("not an async function" in str(p) for p in sync)
    arity = check_references(make_cfg(f"env.name={AGENT_FILE}:one_argument"))
    assert any("is not an async function" not in str(p) and "run(client, row)" in str(p) for p in arity)
    paused = check_references(make_cfg(f"env.name={AGENT}", "rollout.partial_rollout_budget=8"))
    assert [p.key for p in paused] == ["rollout.partial_rollout_budget"]
    replayed = check_references(make_cfg(f"env.name={AGENT}", "reward.functions=[]", "algorithm.routing_replay=replay"))
    assert [p.key for p in replayed] == ["algorithm.routing_replay"]
    assert check_references(make_cfg(f"env.name={AGENT}", "reward.functions=[]", "algorithm.routing_replay=off")) == []


def test_a_job_trains_on_an_agents_episodes(make_cfg, tmp_path):
    """An agent function as the environment of a short in-process job: every sample is an agent episode, scored by
    what the agent returned, and the policy is updated on them."""
    from rl.loop.controller import train

    cfg = make_cfg(
        f"env.name={AGENT_FILE}:varied",
        "reward.functions=[]",
        "cluster.backend=in_process",
        "eval.enabled=false",
        "trainer.steps=2",
        "algorithm.routing_replay=record",  # as the default job: the endpoint's episodes carry no routing to measure
    )
    train(cfg, tmp_path / "run")
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "step" in s and "reward_mean" in s]
    assert [s["step"] for s in steps] == [1, 2]
    assert all(s.get("failed_samples", 0) == 0 for s in steps)
    assert all(s["num_samples"] == 8 for s in steps)  # 4 prompts x 2 samples, every one an agent episode
    assert all(s["train_tokens"] > 0 and s["policy_version"] == s["step"] for s in steps)
    assert any(s["reward/env"] > 0 for s in steps)


def test_serving_phase_chats_with_any_key(worker):
    """`tiderl serve`'s phase: any client key is a conversation, and its next turn continues its tokens."""
    import openai

    from rollouts.sampling import SamplingParams

    endpoint = worker.agents.endpoint

    async def open_phase():
        return endpoint.open_phase(SamplingParams(greedy=True), 0, 1, episodes=None)

    phase = endpoint.call(open_phase)
    try:
        client = openai.OpenAI(base_url=endpoint.base_url, api_key="alice", max_retries=0)
        messages = [{"role": "user", "content": "Compute 2+3."}]
        extra = {"return_token_ids": True}
        first = client.chat.completions.create(model="m", messages=messages, max_tokens=4, extra_body=extra)
        messages += [first.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "again"}]
        second = client.chat.completions.create(model="m", messages=messages, max_tokens=4, extra_body=extra)
        sequence = first.prompt_token_ids + first.choices[0].token_ids
        assert second.prompt_token_ids[: len(sequence)] == sequence
        stream = client.chat.completions.create(model="m", messages=messages[:1], max_tokens=4, stream=True)
        chunks = list(stream)
        assert chunks[-1].choices[0].finish_reason in ("stop", "length", "tool_calls")
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert text == first.choices[0].message.content  # greedy: the same reply, streamed
        completion = client.completions.create(model="m", prompt="2+3=", max_tokens=3)
        assert completion.usage.completion_tokens == 3 or completion.choices[0].finish_reason == "stop"
    finally:
        endpoint.call(lambda: _close(endpoint, phase))


async def _close(endpoint, phase):
    endpoint.close_phase(phase)


@pytest.mark.slow
def test_a_ray_job_trains_on_an_agents_episodes(make_cfg, tmp_path, ray_local):
    """The same on the Ray rollout pool: each worker actor serves its endpoint and runs the agents in its process."""
    from rl.loop.controller import train

    cfg = make_cfg(f"env.name={AGENT_FILE}:varied", "reward.functions=[]", "eval.enabled=false", "trainer.steps=2")
    train(cfg, tmp_path / "run")
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "step" in s and "reward_mean" in s]
    assert [s["step"] for s in steps] == [1, 2] and all(s.get("failed_samples", 0) == 0 for s in steps)
    assert all(s["train_tokens"] > 0 for s in steps)
