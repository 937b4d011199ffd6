"""Long horizons: a 200-door chain (`envs.long_horizon`) driven by a scripted policy through the agent loop, with
context management (`env.context`): the context is rewritten with placeholders per the policy, the episode splits
into training sequences that hold exactly what the engine saw and sampled, and the learner's batch gives every
sequence the episode's advantage. A short real job runs the environment end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES

from envs.config import ContextConfig, EnvConfig
from envs.long_horizon import LongHorizonEnv, make_chain
from rewards.answers import compute_score as contains_answer
from rewards.records import ScoredTrajectory
from rl.config import load_config
from rl.loop.controller import train
from rl.loop.data import to_prompt_row
from rl.tasks.long_horizon import make_rows, teacher
from rl.trainer.batch import TrainBatch
from rollouts.agent_loop import AgentLoop
from rollouts.config import RolloutConfig
from rollouts.engine import Generation, Request
from rollouts.model import load_policy
from rollouts.records import Trajectory, TrajectoryStatus
from rollouts.renderer import Renderer
from rollouts.scripted import ScriptedPolicy

PLACEHOLDER = "[hidden]"
BUDGET = 600


@pytest.fixture(scope="module")
def renderer(tiny_policy_dir, make_cfg) -> Renderer:
    return Renderer(load_policy(tiny_policy_dir, make_cfg().model)[1])


def run_chain(renderer: Renderer, context: ContextConfig, hops: int = 200) -> tuple[Trajectory, ScriptedPolicy]:
    policy = ScriptedPolicy(renderer, teacher)  # random logprobs: a misplaced one shows
    env = EnvConfig(name="long_horizon", max_turns=hops + 1, max_tool_calls=hops, context=context)
    rollout = RolloutConfig(max_new_tokens_per_turn=40, max_tokens_per_sample=100_000)
    loop = AgentLoop(policy, renderer, LongHorizonEnv, rollout, env)  # type: ignore[arg-type]
    row = to_prompt_row(0, make_rows(1, seed=0, split="train", hops=hops)[0])
    (traj,) = loop.run([row], 1, policy_version=3, greedy=False, generator=torch.Generator())
    return traj, policy


@pytest.fixture(scope="module")
def chain(renderer) -> tuple[Trajectory, ScriptedPolicy]:
    """A 200-door episode under a 600-token budget, keeping the last 2 steps."""
    return run_chain(renderer, ContextConfig(budget_tokens=BUDGET, keep_last=2, placeholder=PLACEHOLDER))


def check_faithful(traj: Trajectory, policy: ScriptedPolicy) -> None:
    """Every request the policy answered is a prefix of one sequence followed by exactly the ids it sampled, with
    their logprobs, on the loss mask; and the loss masks of all sequences cover exactly those ids."""
    sequences = traj.sequences()
    seq = 0
    for prompt, sampled, logprobs in policy.record:
        while sequences[seq].token_ids[: len(prompt)].tolist() != prompt:
            seq += 1  # requests go in order: the next sequence starts after a rewrite
        s, end = sequences[seq], len(prompt) + len(sampled)
        assert s.token_ids[len(prompt) : end].tolist() == sampled
        assert s.logprobs[len(prompt) : end].tolist() == pytest.approx(logprobs, abs=1e-6)
        assert s.loss_mask[len(prompt) : end].tolist() == [1.0] * len(sampled)
    assert seq == len(sequences) - 1
    assert sum(int(s.loss_mask.sum()) for s in sequences) == sum(len(r[1]) for r in policy.record)
    assert all(torch.equal(s.logprobs != 0, s.loss_mask.bool()) for s in sequences)


def test_200_calls_with_hidden_results_and_dropped_turns_split_token_faithfully(chain, renderer) -> None:
    (traj, policy), budget = chain, BUDGET
    keys, treasure = make_chain(traj.row.extra_info["chain_seed"], 200)
    assert traj.status is TrajectoryStatus.FINISHED and traj.num_tool_calls == 200 and traj.num_tool_errors == 0
    assert contains_answer("tiderl/long_horizon", traj.response_text, treasure)["score"] == 1.0
    assert traj.row.ground_truth == treasure and len(policy.record) == 201
    # the conversation the environment saw is whole; the sequences are what the policy saw
    assert sum(m["role"] == "tool" for m in traj.messages) == 200
    # a rewrite after most calls at this budget (prompt + 2 steps is ~415 of its 600 tokens), but not after every one
    assert traj.sample.context_rewrites == len(traj.earlier) and 100 <= len(traj.earlier) < 200
    check_faithful(traj, policy)
    # the context never exceeds the budget + one turn: every request starts within the budget
    longest_turn = max(len(r[1]) for r in policy.record)
    longest_obs = max(len(renderer.observation_ids([m])) for m in traj.messages if m["role"] == "tool")
    assert max(len(r[0]) for r in policy.record) <= budget
    assert max(len(s.token_ids) for s in traj.sequences()) <= budget + longest_turn + longest_obs
    # per the policy: in the last context the opening prompt, the placeholder for dropped turns, the older kept
    # results hidden and the last `keep` verbatim
    last = renderer.decode(traj.token_ids.tolist())
    assert last.count(PLACEHOLDER) >= 1 and "doors. Next key:" in last
    shown = re.findall(r"Door (\d+) opens", last)
    assert shown == ["199", "200"]  # the result before the answer, and the treasure
    assert traj.policy_version == 3 and all(v == 3 for s in traj.sequences() for *_, v in s.segments)


def test_hiding_results_only_keeps_every_turn_and_hides_all_but_the_last(renderer) -> None:
    ctx = ContextConfig(budget_tokens=1200, keep_last=3, placeholder=PLACEHOLDER, drop_turns=False)
    traj, policy = run_chain(renderer, ctx, hops=60)
    assert traj.status is TrajectoryStatus.FINISHED and traj.num_tool_calls == 60
    check_faithful(traj, policy)
    last = renderer.decode(traj.token_ids.tolist())
    assert last.count('<tool_call>{"name": "open"') == 60  # no turn dropped
    # every tool result hidden at some rewrite, except those after the last one (at least `keep_last`)
    hidden = last.count(PLACEHOLDER)
    assert 60 - hidden >= 3 and hidden >= 40 and len(re.findall(r"Door \d+ opens", last)) == 60 - hidden
    # between rewrites the context only grows by a turn and a result: the first request after each rewrite fits
    assert traj.sample.context_rewrites == len(traj.earlier) > 0


def test_split_sequences_train_with_the_episodes_advantage(chain, renderer) -> None:
    traj, _ = chain
    short, _ = run_chain(renderer, ContextConfig(), hops=5)  # no context management: one sequence
    scored = [ScoredTrajectory(traj, 1.0, {}, True), ScoredTrajectory(short, 0.0, {}, False)]
    batch = TrainBatch.from_scored(scored, torch.tensor([0.5, -0.5]), pad_token_id=0)
    n = len(traj.earlier) + 1
    assert batch.num_sequences == n + 1 and batch.episode.tolist() == [0] * n + [1]
    for row in range(batch.num_sequences):
        mask = batch.loss_mask[row]
        expected = 0.5 if row < n else -0.5
        assert torch.equal(batch.advantages[row], expected * mask)
    assert batch.last_rows(2).tolist() == [n - 1, n]
    assert float(batch.loss_mask.sum()) == traj.response_length + short.response_length
    assert batch.per_episode(torch.ones(n + 1), 2).tolist() == [float(n), 1.0]


@pytest.mark.slow  # a policy build (1024 positions) and a job step: ~2 min on a shared 2-core machine
def test_the_long_horizon_config_runs_as_a_real_job(tmp_path: Path, cache_dir: Path) -> None:
    """configs/long_horizon.yaml, shrunk to the test policy, through `train`: the environment, task, reward and
    context settings load and a step trains on the episodes (the untrained policy does not call the tool)."""
    cfg = load_config(
        Path(__file__).parents[1] / "configs" / "long_horizon.yaml",
        [
            f"warm_start.cache_dir={cache_dir}",
            *TINY_OVERRIDES,
            "cluster.backend=in_process",
            "trainer.steps=1",
            "eval.enabled=false",
            "data.train_size=8",
        ],
    )
    assert (cfg.env.name, cfg.env.context.budget_tokens, cfg.env.max_tool_calls) == ("long_horizon", 768, 220)
    train(cfg, tmp_path)
    (metrics,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert metrics["num_samples"] == 8 and metrics["failed_samples"] == 0.0
    samples = [json.loads(line) for line in (tmp_path / "trajectories" / "step_000001.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and all("There are 200 doors" in json.dumps(s) for s in samples)


def test_the_engine_continues_a_rewritten_context_in_its_slot_from_the_common_prefix(
    renderer, tiny_policy_dir, make_cfg, monkeypatch
) -> None:
    """The engine's cache across a rewrite: the episode's next request (the rewritten context) continues in the slot
    that holds the previous sequence, keeps the positions up to the first one that changed and prefills only the
    rest; it samples what a fresh prefill of the rewritten context samples."""
    from rollouts.decoder import Decoder
    from rollouts.engine import Engine
    from rollouts.sampling import SamplingParams

    traj, _ = run_chain(renderer, ContextConfig(budget_tokens=360, keep_last=1, placeholder=PLACEHOLDER), hops=12)
    first, second = traj.sequences()[:2]
    before = first.token_ids.tolist()
    rewritten = second.token_ids[: int(second.loss_mask.argmax())].tolist()  # the context the next turn saw
    common = next(i for i, (a, b) in enumerate(zip(before, rewritten, strict=False)) if a != b)
    assert 0 < common < len(rewritten) <= 360 < len(before)

    fed: list[tuple[int, int]] = []  # (start, length) of each cache extension
    extend = Decoder.extend

    def recording_extend(self, ids, starts, lengths, rows):
        fed.extend(zip(starts.tolist(), lengths.tolist(), strict=True))
        return extend(self, ids, starts, lengths, rows)

    monkeypatch.setattr(Decoder, "extend", recording_extend)
    model, _ = load_policy(tiny_policy_dir, make_cfg().model)
    outs = {}
    for reuse in (True, False):
        engine = Engine(model, renderer.pad_token_id, renderer.eos_token_id, prefix_reuse=reuse)
        batcher = engine.batcher(SamplingParams(1.0, False, 1.0, 0), 1, 512)
        results: list[Generation] = []
        for prompt, seed in ((before, 1), (rewritten, 2)):
            batcher.submit(Request(prompt, 6, seed, [], session="episode"), results.append)
            while batcher.busy:
                batcher.step()
        outs[reuse] = results[1]
    assert fed == [(common, len(rewritten) - common)]  # with reuse: one extension from the common prefix
    assert outs[True].token_ids == outs[False].token_ids
    assert outs[True].logprobs == pytest.approx(outs[False].logprobs, abs=1e-4)


def test_the_warm_start_fits_the_teachers_episodes_as_rollouts_hold_them(renderer, cache_dir: Path) -> None:
    """A task with a teacher warms the built-in policy up on the sequences the teacher's episodes hold in the agent
    loop under the job's `env.context`: rewritten contexts (placeholders, dropped steps), each within the budget,
    the loss masks covering exactly the teacher's 200 right calls and its answer (its deliberate slips are seen,
    not trained on); the cache key follows the env."""
    from rl.policy.warmstart import _opening_and_closing_weighted, policy_key, teacher_sequences
    from rl.tasks.registry import get_task

    overrides = [f"warm_start.cache_dir={cache_dir}", *TINY_OVERRIDES]
    config = Path(__file__).parents[1] / "configs" / "long_horizon.yaml"
    cfg = load_config(config, [*overrides, "rollout.max_new_tokens_per_turn=40"])
    task = get_task("long_horizon")
    sequences, *short = teacher_sequences(cfg, task, renderer, 1, "warmstart")
    assert len(short) == 5 and all(
        re.search(
            r"Treasure: (\d{4})<\|im_end\|>\n<\|im_start\|>assistant\nThe treasure is \1\.",
            renderer.decode(e[-1][0]),
        )
        for e in short
    )  # a short chain: one sequence, the answer at its end
    placeholder = renderer.encode(cfg.env.context.placeholder)
    assert len(sequences) > 10
    assert all(len(ids) <= cfg.env.context.budget_tokens + 150 for ids, _ in sequences)  # + one tool step
    rewritten = [ids for ids, _ in sequences[1:]]
    assert all(any(ids[i : i + len(placeholder)] == placeholder for i in range(len(ids))) for ids in rewritten)
    sampled = "".join(renderer.decode([t for t, m in zip(ids, mask, strict=True) if m]) for ids, mask in sequences)
    row = make_rows(1, cfg.seed, "warmstart")[0]
    keys, treasure = make_chain(row["extra_info"]["chain_seed"], 200)
    assert re.findall(r'"key": "(\d{4})"', sampled) == keys and sampled.endswith(f"The treasure is {treasure}.")
    slips = {m for ids, _ in sequences for m in re.findall(r"Error: key '(\d+)'", renderer.decode(ids))}
    assert slips and not slips & set(keys)  # the teacher's slips (5%) are in the contexts, never on the loss mask
    assert teacher_sequences(cfg, task, renderer, 1, "warmstart-check")[0][0][0] != sequences[0][0]  # another chain
    fitted, weights = _opening_and_closing_weighted([sequences, sequences[:1], sequences[:1]])
    assert len(fitted) == len(sequences) + 2
    # 4 ends (2 of the long episode, the short ones' single sequences) drawn half as often as its other sequences
    end = (len(sequences) - 2) / 8
    assert weights == [end, *[1.0] * (len(sequences) - 2), end, end, end]
    rows = get_task("long_horizon").teacher_rows(2, cfg.seed, "warmstart")
    hops = [row["extra_info"]["hops"] for row in rows]
    assert hops[:2] == [200, 200] and len(hops) == 12 and all(1 <= h <= 16 for h in hops[2:]) and len(set(hops)) > 2
    tighter = load_config(config, [*overrides, "env.context.budget_tokens=600"])
    assert policy_key(tighter) != policy_key(cfg)
    calculator = load_config(None, ["model={}", *overrides])
    assert policy_key(calculator) == policy_key(calculator.model_copy(update={"env": tighter.env}))
