"""What a run keeps of its samples: `trajectories/step_N.jsonl`, one JSON object per sample of the step.

Every sample of the step is written (as verl's `rollout_data_dir` and TRL's completion logs keep them): what it saw
and said, how each reward judged it, how it ended, the policy versions that generated it, its advantage, and the
samples left out of training with why (`failed`). A few of them (`logging.samples_per_step`, chosen by
`keep_samples`) also carry their tokens: each token's text, the rollout's and the learner's logprob of it, its
advantage, whether it is the policy's (the loss mask), and what the token mask or the rollout correction cut (the
learner records those, `rl.trainer.trace`). `tiderl view` reads these files, and the trackers get the kept samples
as a table (`table_rows`).

A file is written whole and renamed into place, so a viewer reading a run that is still going never sees half a step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from rewards.records import ScoredTrajectory
from rl.trainer.trace import TokenTrace
from rollouts.records import Trajectory


def keep_samples(scored: list[ScoredTrajectory], n: int) -> list[int]:
    """Indices of `n` samples to keep with their tokens: first, prompt by prompt (in batch order), the best and the
    worst sample of each prompt whose samples got different rewards (the groups that teach something, and the ones
    the learner always scores), so that a kept pair shows one prompt answered well and badly; then one sample of each
    other prompt; then the rest in batch order."""
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(scored):
        groups.setdefault(s.trajectory.group_id, []).append(i)
    pairs, singles = [], []
    for members in groups.values():
        best, worst = max(members, key=lambda i: scored[i].reward), min(members, key=lambda i: scored[i].reward)
        if scored[best].reward == scored[worst].reward:
            singles.append(best)
        else:
            pairs += [best, worst]
    kept = list(dict.fromkeys(pairs + singles + list(range(len(scored)))))
    return kept[:n]


def sample_record(s: ScoredTrajectory, advantage: float | None) -> dict[str, Any]:
    """The JSON record of a scored sample (without tokens)."""
    return {
        **_trajectory_fields(s.trajectory),
        "reward": s.reward,
        "reward_breakdown": s.reward_breakdown,
        "reward_info": s.reward_info,
        "correct": s.correct,
        "advantage": advantage,
        "failed": False,
    }


def failed_record(trajectory: Trajectory, reason: str) -> dict[str, Any]:
    """The JSON record of a sample left out of training (its rollout failed, or its reward could not be computed)."""
    return {
        **_trajectory_fields(trajectory),
        "reward": None,
        "reward_breakdown": {},
        "correct": False,
        "advantage": None,
        "failed": True,
        "failure": reason,
    }


def token_record(s: ScoredTrajectory, advantages: torch.Tensor, trace: TokenTrace | None) -> dict[str, Any]:
    """A kept sample's tokens: per token, its text, whether the policy generated it, the rollout's logprob, the
    learner's minus the rollout's (`dlogp`: the train-inference gap; None off the loss mask or when the learner did
    not score it), the advantage, and what the K2.5 token mask (`token_mask`) and the rollout correction
    (`is_weight`) did; a list is absent when its part of the update is off. `advantages` is the sample's row of
    the batch ([seq], padded)."""
    t = s.trajectory
    n = len(t.token_ids)
    policy = [int(m) for m in t.loss_mask.tolist()]
    rollout = t.logprobs.tolist()
    out: dict[str, Any] = {
        "text": trace.tokens if trace is not None else [str(i) for i in t.token_ids.tolist()],
        "policy": policy,
        "rollout_logprob": [round(x, 6) if p else None for x, p in zip(rollout, policy, strict=True)],
        "advantage": [round(float(a), 5) for a in advantages[:n].tolist()],
    }
    if trace is None:
        return out
    if trace.learner_logprobs is not None:
        out["dlogp"] = [
            _sig(learner - old) if p else None
            for learner, old, p in zip(trace.learner_logprobs, rollout, policy, strict=True)
        ]
    if trace.clipped is not None:
        out["clipped"] = [int(c and p) for c, p in zip(trace.clipped, policy, strict=True)]
    if trace.train_mask is not None:
        out["token_mask"] = [int(m) for m in trace.train_mask]
    if trace.is_weight is not None:
        out["is_weight"] = [_sig(w) if p else None for w, p in zip(trace.is_weight, policy, strict=True)]
    return out


def step_records(
    scored: list[ScoredTrajectory],
    advantages: torch.Tensor | None,
    kept: list[int],
    traces: list[TokenTrace],
    left_out: list[tuple[Trajectory, str]],
) -> list[dict[str, Any]]:
    """Every record of a step: the scored samples in batch order (the kept ones with `tokens`), then the failed.
    `advantages` is the batch's [batch, seq] (None when the step did not train); `traces` the learner's, whose
    `index` is a position in `kept`."""
    by_index = {trace.index: trace for trace in traces}
    token_of = {row: by_index.get(k) for k, row in enumerate(kept)}
    records = []
    for i, s in enumerate(scored):
        advantage = None
        if advantages is not None:
            mask = s.trajectory.loss_mask
            n = len(mask)
            advantage = float((advantages[i, :n] * mask).sum() / mask.sum().clamp(min=1))
        record = sample_record(s, advantage)
        if i in token_of and advantages is not None:
            record["tokens"] = token_record(s, advantages[i], token_of[i])
        records.append(record)
    return records + [failed_record(t, reason) for t, reason in left_out]


def table_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The kept samples as flat rows for the trackers' sample tables (one row per sample, no token lists)."""
    rows = []
    for r in records:
        if "tokens" not in r:
            continue
        dlogp = [abs(d) for d in r["tokens"].get("dlogp", []) if d is not None]
        rows.append(
            {
                "sample_id": r["sample_id"],
                "group_id": r["group_id"],
                "reward": r["reward"],
                "correct": r["correct"],
                "advantage": r["advantage"],
                "status": r["status"],
                "response_length": r["response_length"],
                "num_tool_calls": r["num_tool_calls"],
                "mismatch_abs_logp": sum(dlogp) / len(dlogp) if dlogp else None,
                "ground_truth": str(r["ground_truth"]),
                "conversation": _conversation(r["messages"]),
            }
        )
    return rows


def write_records(path: Path, records: list[dict[str, Any]]) -> None:
    """Write a step's records as JSON lines, whole: a reader sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for record in records:
            f.write(json.dumps(record, default=str) + "\n")
    os.replace(tmp, path)


def _trajectory_fields(t: Trajectory) -> dict[str, Any]:
    return {
        "sample_id": t.sample_id,
        "group_id": t.group_id,
        "data_source": t.row.data_source,
        "ground_truth": t.row.ground_truth,
        "messages": t.messages,
        "status": t.status.value,
        "truncation": t.truncation,
        "error": t.error,
        "response_length": t.response_length,
        "num_turns": t.num_turns,
        "num_tool_calls": t.num_tool_calls,
        "num_tool_errors": t.num_tool_errors,
        "policy_versions": sorted({v for *_, v in t.segments}),
        "segments": [list(segment) for segment in t.segments],
    }


def _conversation(messages: list[dict[str, Any]]) -> str:
    return "\n".join(f"[{m.get('role', '?')}] {m.get('content', '')}" for m in messages)


def _sig(x: float) -> float:
    """Three significant digits (a gap of 1e-8 keeps its size, unlike a fixed number of decimals)."""
    return float(f"{x:.3g}")
