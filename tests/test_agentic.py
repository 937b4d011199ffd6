"""Long-rollout controls on a real tiny policy that calls tools: partial rollouts (pause and resume), per-task
token budgets with the truncation penalty, loop detection, and many concurrent environments on one worker."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from envs.base import PromptRow
from envs.calculator import CALC_TOOL, CalculatorEnv
from envs.config import EnvConfig
from envs.tools import tool
from rewards.config import RewardConfig
from rewards.scoring import RewardScorer
from rl.loop.data import builtin_rows, to_prompt_row
from rollouts.agent_loop import AgentLoop
from rollouts.config import RolloutConfig
from rollouts.engine import Engine
from rollouts.model import load_policy
from rollouts.pool import RolloutPool
from rollouts.records import TrajectoryStatus
from rollouts.renderer import Renderer
from rollouts.sampling import _LoopDetector
from rollouts.worker import RolloutWorkerActor


def calculator_rows(n: int) -> list[PromptRow]:
    return [to_prompt_row(i, r) for i, r in enumerate(builtin_rows("calculator", n, 0, "eval"))]


class RecordingCalculator(CalculatorEnv):
    """The calculator, keeping every call it served: state that must survive a pause."""

    instances: list[RecordingCalculator] = []

    def __init__(self) -> None:
        self.history: list[str] = []
        self.resets = 0
        self.closed = 0
        RecordingCalculator.instances.append(self)

    async def reset(self, row):
        self.resets += 1
        return await super().reset(row)

    @tool(spec=CALC_TOOL)
    def calc(self, expression: str) -> str:
        """Evaluate an arithmetic expression.

        Args:
            expression: Numbers with + - * / // % and parentheses.
        """
        self.history.append(expression)
        return super().calc(expression)

    async def close(self) -> None:
        self.closed += 1


@pytest.fixture(scope="module")
def tool_policy(tool_policy_dir, make_cfg):
    model, tokenizer = load_policy(tool_policy_dir, make_cfg().model)
    return model, Renderer(tokenizer)


def make_loop(tool_policy, env=RecordingCalculator, repeat_window: int = 0, **rollout) -> AgentLoop:
    model, renderer = tool_policy
    cfg = RolloutConfig(**{"max_new_tokens_per_turn": 40, **rollout})
    engine = Engine(
        model,
        renderer.pad_token_id,
        renderer.eos_token_id,
        repeat_window,
        cfg.repeat_max_period,
        prefix_reuse=cfg.prefix_reuse,
    )
    return AgentLoop(engine, renderer, env, cfg, EnvConfig(max_turns=3))


def test_partial_rollouts_resume_token_for_token_with_the_environment_state(tool_policy) -> None:
    rows = calculator_rows(4)
    RecordingCalculator.instances.clear()
    whole_loop = make_loop(tool_policy)
    whole = whole_loop.new_episodes(rows, 1)
    whole_loop.run_episodes(whole, version=0, greedy=True, generator=torch.Generator())
    whole_envs = list(RecordingCalculator.instances)

    RecordingCalculator.instances.clear()
    loop = make_loop(tool_policy)
    parts = loop.new_episodes(rows, 1)
    iterations, paused_after_a_call = 0, 0
    while not all(ep.done for ep in parts):
        iterations += 1
        loop.run_episodes(parts, version=iterations, greedy=True, generator=torch.Generator(), iteration_budget=7)
        paused_after_a_call += sum(ep.status is TrajectoryStatus.PARTIAL and bool(ep.env.history) for ep in parts)
        assert all(
            ep.env.closed == (1 if ep.done else 0) for ep in parts
        )  # paused episodes keep their environment open
    assert iterations >= 5 and paused_after_a_call > 0

    for a, b, env_a in zip(whole, parts, whole_envs, strict=True):
        ta, tb = whole_loop.trajectory(a), loop.trajectory(b)
        assert tb.token_ids.tolist() == ta.token_ids.tolist()
        assert torch.equal(tb.loss_mask, ta.loss_mask)
        assert torch.allclose(tb.logprobs, ta.logprobs, atol=1e-4)
        assert (tb.status, tb.num_turns, tb.num_tool_calls, tb.response_text) == (
            ta.status,
            ta.num_turns,
            ta.num_tool_calls,
            ta.response_text,
        )
        assert ta.num_tool_calls >= 1 and b.env.history == env_a.history and b.env.resets == 1
        # versions per segment: consecutive spans covering exactly the policy tokens, one version per iteration
        covered = torch.zeros_like(tb.loss_mask)
        for start, end, _ in tb.segments:
            covered[start:end] = 1
        assert torch.equal(covered * tb.loss_mask, tb.loss_mask) and len(tb.segments) > 1
        assert [v for _, _, v in tb.segments] == sorted(
            {v for _, _, v in tb.segments}
        ) and tb.policy_version == tb.segments[0][2]
        assert [v for *_, v in ta.segments] == [0]
    assert RecordingCalculator().tool_specs() == [CALC_TOOL]  # the subclass offers the same tool


def test_a_next_turn_prefills_only_its_new_tokens_and_samples_the_same(tool_policy, monkeypatch) -> None:
    """Prefix reuse: an episode's turn 2 continues in its cache slot, so what runs through the model is the tool's
    result and the one token of turn 1 never fed back; the samples are those of a full prefill of the history."""
    from rollouts.decoder import Decoder

    fed = {"prefill": 0, "extend": 0}
    prefill, extend = Decoder.prefill, Decoder.extend

    def counting_prefill(self, ids, lengths, slots):
        fed["prefill"] += int(lengths.sum())
        return prefill(self, ids, lengths, slots)

    def counting_extend(self, ids, starts, lengths, rows):
        fed["extend"] += int(lengths.sum())
        return extend(self, ids, starts, lengths, rows)

    monkeypatch.setattr(Decoder, "prefill", counting_prefill)
    monkeypatch.setattr(Decoder, "extend", counting_extend)
    rows, runs = calculator_rows(6), {}
    for reuse in (True, False):
        fed.update(prefill=0, extend=0)
        loop = make_loop(tool_policy, prefix_reuse=reuse)
        episodes = loop.new_episodes(rows, 4)
        loop.run_episodes(episodes, version=0, greedy=False, generator=torch.Generator().manual_seed(3))
        runs[reuse] = ([loop.trajectory(ep) for ep in episodes], dict(fed))
    (reused, fed_reuse), (full, fed_full) = runs[True], runs[False]
    for a, b in zip(reused, full, strict=True):
        assert a.token_ids.tolist() == b.token_ids.tolist() and a.num_turns == b.num_turns
        assert torch.allclose(a.logprobs, b.logprobs, atol=1e-4)
    later_turns = [t for t in reused if t.num_turns > 1]
    assert len(later_turns) >= 6  # the policy calls the tool, reads its result and answers
    # per later turn: the observation tokens and the turn's last sampled token; nothing of the history again
    observation = sum(int((t.loss_mask[t.prompt_length :] == 0).sum()) for t in reused)
    assert fed_reuse["extend"] == observation + sum(t.num_turns - 1 for t in reused)
    first_turns = sum(t.prompt_length for t in reused[::4])  # one prefill per group
    m = [t.loss_mask.tolist() for t in reused]
    histories = sum(
        i
        for t, mask in zip(reused, m, strict=True)
        for i in range(t.prompt_length + 1, len(mask))
        if mask[i] and not mask[i - 1]
    )
    assert (
        fed_reuse["prefill"] == first_turns
        and fed_full["extend"] == 0
        and fed_full["prefill"] == first_turns + histories
    )


def test_token_budget_per_task_truncates_and_is_penalized(tool_policy) -> None:
    rows = calculator_rows(2)
    rows[1].extra_info["token_budget"] = 5
    loop = make_loop(tool_policy, token_budgets={"tiderl/calculator": 12})
    t_task, t_row = loop.run(rows, 1, 0, True, torch.Generator())
    assert (t_task.status, t_task.truncation, t_task.response_length) == (
        TrajectoryStatus.TRUNCATED,
        "token_budget",
        12,
    )
    assert (t_row.status, t_row.truncation, t_row.response_length) == (TrajectoryStatus.TRUNCATED, "token_budget", 5)
    free = make_loop(tool_policy).run(rows[:1], 1, 0, True, torch.Generator())[0]
    assert (
        free.status is TrajectoryStatus.FINISHED
        and free.token_ids[: len(t_task.token_ids)].tolist() == t_task.token_ids.tolist()
    )
    scorer = RewardScorer(RewardConfig(truncation_penalty=-0.5))
    scored = scorer.score([t_task, free]).scored
    assert scored[0].reward == -0.5 and scored[0].reward_breakdown == {"calculator": 0.0, "truncation_penalty": -0.5}
    assert "truncation_penalty" not in scored[1].reward_breakdown


def test_loop_detector_fires_once_a_unit_repeats_over_the_window() -> None:
    # window 6, periods up to 3: a unit of p tokens loops once window + p tokens follow it
    seqs = [[1, 2, 3, 4] * 3, [5, 6] * 6, [7, 8, 9] * 4, [1] * 12]
    detector = _LoopDetector(window=6, max_period=3, slots=5, device=torch.device("cpu"))
    rows = torch.tensor([4, 1, 2, 0])  # any slots, in any order
    detector.reset(rows, [[], [5, 6, 5, 6, 5, 6], [], []])
    first = [None] * 4
    for t in range(12):
        for i, flag in enumerate(detector.push(rows, torch.tensor([s[t] for s in seqs])).tolist()):
            if flag and first[i] is None:
                first[i] = t + 1
    # period 4 is beyond the search; row 1's turn prefix counts (6 + 2 tokens); 6 + 3; 6 + 1
    assert first == [None, 2, 9, 7]


def test_loop_detector_equals_the_definition_on_random_sequences() -> None:
    """Its run lengths against the definition checked over the whole history (each of the last `window` tokens
    equals the token p before it, for some p <= max_period), on random short-alphabet sequences with prefixes."""
    window, max_period, slots = 5, 4, 6
    g = torch.Generator().manual_seed(0)
    detector = _LoopDetector(window, max_period, slots, torch.device("cpu"))
    history: list[list[int]] = [[] for _ in range(slots)]

    def loops(seq: list[int]) -> bool:
        return any(
            len(seq) >= window + p and all(seq[-j] == seq[-j - p] for j in range(1, window + 1))
            for p in range(1, max_period + 1)
        )

    fired = 0
    for step in range(400):
        if step % 37 == 0:  # new turns, with prefixes of any length (periodic ones too)
            rows = torch.tensor([0, 3, 5])
            prefixes = [
                torch.randint(0, 2, (int(n),), generator=g).tolist() for n in torch.randint(0, 12, (3,), generator=g)
            ]
            prefixes[0] = [1, 2] * 4
            detector.reset(rows, prefixes)
            for r, prefix in zip(rows.tolist(), prefixes, strict=True):
                history[r] = list(prefix)
        tok = torch.randint(0, 2 + step % 3, (slots,), generator=g)
        flags = detector.push(slice(0, slots), tok).tolist()
        for r in range(slots):
            history[r].append(int(tok[r]))
            assert flags[r] == loops(history[r]), (step, r, history[r][-12:])
            fired += flags[r]
    assert fired > 20  # the check saw loops, not only their absence


def test_looping_generation_is_stopped_and_marked(tiny_policy_dir, make_cfg) -> None:
    # greedy decoding of the untrained policy falls into a cycle of a few to a dozen tokens within a long turn
    model, tokenizer = load_policy(tiny_policy_dir, make_cfg().model)
    untrained = (model, Renderer(tokenizer))
    rows = calculator_rows(4)
    budget = {"max_new_tokens_per_turn": 160, "max_tokens_per_sample": 512}
    free = make_loop(untrained, **budget).run(rows, 1, 0, True, torch.Generator())
    looped = make_loop(untrained, repeat_window=16, repeat_max_period=16, **budget).run(
        rows, 1, 0, True, torch.Generator()
    )
    stopped = [
        (f, looped_traj) for f, looped_traj in zip(free, looped, strict=True) if looped_traj.truncation == "repeat"
    ]
    assert len(stopped) >= 3, [(f.truncation, f.token_ids[-24:].tolist()) for f in free]
    for f, looped_traj in stopped:
        assert (
            looped_traj.token_ids.tolist() == f.token_ids[: len(looped_traj.token_ids)].tolist()
            and looped_traj.response_length < f.response_length - 40
        )
        tail = looped_traj.token_ids[looped_traj.loss_mask.bool()].tolist()
        assert any(
            all(tail[-j] == tail[-j - p] for j in range(1, 17)) for p in range(1, 17)
        )  # a unit of <= 16 over the last 16


SLOW_ENV = '''
import asyncio, random
from envs.calculator import CALC_TOOL, CalculatorEnv
from envs.tools import tool

class SlowCalculator(CalculatorEnv):
    """The calculator behind a network-like latency: 0-{ms} ms per reset and per call."""
    async def reset(self, row):
        await asyncio.sleep(random.uniform(0, {ms} / 1000))
        return await super().reset(row)

    async def step(self, calls):
        await asyncio.sleep(random.uniform(0, {ms} / 1000))
        return await super().step(calls)
'''


def test_64_concurrent_environments_with_random_latencies_on_one_worker(
    tool_policy_dir, make_cfg, ray_local, tmp_path: Path
) -> None:
    env_file = tmp_path / "slow_env.py"
    env_file.write_text(SLOW_ENV.format(ms=100))
    cfg = make_cfg(
        f"model.path={tool_policy_dir}",
        f"env.name={env_file}:SlowCalculator",
        "rollout.max_new_tokens_per_turn=40",
        "rollout.samples_per_prompt=4",
    )
    pool = RolloutPool(
        lambda i: RolloutWorkerActor.options(num_cpus=1).remote(str(tool_policy_dir), cfg.worker_spec(), i), 1
    )
    rows = calculator_rows(16)
    trajectories = pool.generate_step(rows, first_group_id=100, samples_per_prompt=4, iteration_budget=0)
    assert len(trajectories) == 64 and len({t.sample_id for t in trajectories}) == 64
    assert sorted({t.group_id for t in trajectories}) == list(range(100, 116))
    assert all(
        t.status in (TrajectoryStatus.FINISHED, TrajectoryStatus.TRUNCATED) and t.error is None for t in trajectories
    )
    assert sum(t.num_tool_calls > 0 for t in trajectories) >= 32 and pool.num_paused() == 0
    pool.kill()


def test_worker_returns_only_whole_groups_and_resumes_the_rest(tool_policy_dir, make_cfg, ray_local) -> None:
    cfg = make_cfg(
        f"model.path={tool_policy_dir}", "rollout.max_new_tokens_per_turn=40", "rollout.samples_per_prompt=2"
    )
    pool = RolloutPool(
        lambda i: RolloutWorkerActor.options(num_cpus=1).remote(str(tool_policy_dir), cfg.worker_spec(), i), 1
    )
    rows = calculator_rows(3)
    first = pool.generate_step(rows, 0, 2, iteration_budget=4)
    assert (
        first == [] and pool.num_paused() == 6 and pool.in_flight == [{0: rows[0], 1: rows[1], 2: rows[2]}]
    )  # no sample ends within 4 tokens
    later, steps = [], 0
    while pool.num_paused():
        steps += 1
        later += pool.generate_step([], 0, 2, iteration_budget=4)
    assert (
        steps >= 3
        and len(later) == 6
        and sorted(t.sample_id for t in later) == ["0-0", "0-1", "1-0", "1-1", "2-0", "2-1"]
    )
    assert all([v for *_, v in t.segments] == [0] for t in later)  # no weight sync in between: one version
    assert pool.in_flight == [{}]
    pool.kill()
