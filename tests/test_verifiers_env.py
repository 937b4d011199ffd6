"""verifiers Environments as agent functions (envs/verifiers_env.py): a real `vf.ToolEnv` (examples/
verifiers_calculator.py: a `calc` tool, a dataset, a `vf.Rubric`) run by verifiers' own rollout loop against a rollout
worker's real endpoint, with the tiny policy warm-started to call tools. Skipped without the `verifiers` extra."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

vf = pytest.importorskip(
    "verifiers", reason="the verifiers extra is not installed: pip install -e '.[verifiers]' (docs/hubs.md)"
)

from envs.base import PromptRow  # noqa: E402
from envs.registry import ENVS  # noqa: E402
from envs.verifiers_env import VerifiersAgent, rollout_input, verifiers_rows  # noqa: E402
from rollouts.openai_api import visible_content  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "verifiers_calculator.py"
RECORDING = Path(__file__).parent / "data" / "verifiers_recording.py"


def prompt_rows(split: str, n: int) -> list[PromptRow]:
    env = ENVS.get(f"{EXAMPLE}:ENV")
    return [
        PromptRow(i, r["prompt"], r["data_source"], r["reward_model"]["ground_truth"], r["extra_info"])
        for i, r in enumerate(verifiers_rows(env, split, n=n))
    ]


def test_rows_carry_the_environments_dataset():
    env = ENVS.get(f"{EXAMPLE}:ENV")
    rows = verifiers_rows(env, "train", n=3)
    first = env.get_dataset(n=3)[0]
    assert len(rows) == 3 and rows[0]["data_source"] == "verifiers/ToolEnv"
    assert rows[0]["prompt"] == [
        {"role": "system", "content": "Answer with the help of the tools."},
        {"role": "user", "content": first["question"]},
    ]
    expression = re.fullmatch(r"Compute (.+)\.", first["question"]).group(1)
    assert rows[0]["reward_model"]["ground_truth"] == first["answer"] == str(eval(expression))
    assert [r["extra_info"]["verifiers"]["example_id"] for r in rows] == [0, 1, 2]
    # eval rows come from the eval dataset (another seed), and a row goes back to verifiers as verifiers built it
    assert verifiers_rows(env, "eval", n=1)[0]["prompt"] != rows[0]["prompt"]
    row = prompt_rows("train", 1)[0]
    assert rollout_input(row) == {"prompt": rows[0]["prompt"], "answer": first["answer"], "example_id": 0}


def test_group_scored_environments_are_refused():
    async def spread(completions, **kwargs) -> list[float]:  # a group reward function: sees the whole group
        return [0.0] * len(completions)

    env = vf.SingleTurnEnv(dataset=ENVS.get(f"{EXAMPLE}:ENV").get_dataset(n=2), rubric=vf.Rubric(funcs=[spread]))
    with pytest.raises(ValueError, match="scores whole groups"):
        VerifiersAgent(env)


@pytest.fixture(scope="module")
def worker(tool_policy_dir, make_cfg):
    from rollouts.worker import RolloutWorker

    cfg = make_cfg(
        f"env.name={RECORDING}:run", "reward.functions=[]", "env.max_turns=4", "rollout.max_new_tokens_per_turn=40"
    )
    w = RolloutWorker(str(tool_policy_dir), cfg.worker_spec(), 0)
    yield w
    w.agents.endpoint.stop()


def visible(text: str, worker) -> str:
    """`text` without tool-call markup, removed turn by turn, and without whitespace."""
    eot, fmt = worker.renderer.tokenizer.eos_token, worker.cfg.rollout.tool_call_format
    return "".join(eot.join(visible_content(turn, fmt) for turn in text.split(eot)).split())


def test_a_verifiers_tool_env_runs_through_the_endpoint(worker):
    """verifiers' loop drives the episode (its tool calls executed by verifiers, its rubric scoring): everything it
    saw is in the tokens the endpoint recorded, and the reward is its rubric's verdict on the sampled reply."""
    outputs = ENVS.get(f"{RECORDING}:OUTPUTS")
    trajectories = worker.generate_step(prompt_rows("train", 4), [0, 1, 2, 3], 2, 0)
    assert len(trajectories) == 8 and all(t.error is None for t in trajectories)
    decode = worker.renderer.decode
    tool_turns = 0
    for traj in trajectories:
        out = outputs[traj.sample_id]
        assert out["error"] is None
        # the reward is verifiers' rubric's, by function name (weight 1)
        assert traj.env_reward == out["reward"] and traj.sample.env_reward_parts == {"correct_answer": out["reward"]}
        # every message verifiers got back or sent (replies, its tool results) is in the recorded sequence, in order.
        # A reply's content is its text without well-formed tool-call markup (which a sampled reply may carry
        # mid-text), or its raw text when a call is malformed (markup and end-of-turn text included): both sides are
        # compared with the markup removed turn by turn (an unclosed call in one turn must not swallow the next) and
        # without whitespace (the endpoint strips a reply's ends)
        text = visible(decode(traj.token_ids.tolist()), worker)
        at = 0
        for message in out["completion"]:
            content = visible(message["content"] or "", worker)  # a dict, or verifiers' message model
            if content:
                found = text.find(content, at)
                assert found >= 0, (message, text)
                at = found + len(content)
        roles = [m["role"] for m in out["completion"]]
        tool_turns += roles.count("tool")
        assert traj.num_turns == roles.count("assistant")
        # the rubric's verdict is on the reply the engine sampled last
        answers = re.findall(r"answer is\s*(-?\d+)", decode(traj.token_ids[traj.segments[-1][0] :].tolist()))
        assert out["reward"] == float(bool(answers) and answers[-1] == out["answer"])
    assert tool_turns >= 1  # the warm-started policy called calc, and verifiers executed it


@pytest.mark.slow
def test_a_job_trains_on_a_verifiers_environment(make_cfg, tmp_path):
    """configs/verifiers_calculator.yaml's environment and task in a short in-process job."""
    from rl.loop.controller import train

    cfg = make_cfg(
        f"env.name={EXAMPLE}:run",
        f"data.task={EXAMPLE}:TASK",
        "reward.functions=[]",
        "cluster.backend=in_process",
        "eval.enabled=false",
        "trainer.steps=2",
    )
    train(cfg, tmp_path / "run")
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "step" in s and "reward_mean" in s]
    assert [s["step"] for s in steps] == [1, 2]
    assert all(s.get("failed_samples", 0) == 0 and s["train_tokens"] > 0 for s in steps)
