"""Heavy mode (`tiderl eval RUN_DIR --heavy N`): N sampled trajectories per prompt, aggregated two ways, with
accuracy reported against the number of trajectories n = 1, 2, 4, ..., N, all from the same samples.

- **Majority vote.** Each sample's final answer is extracted and compared with the task verifier's own rules
  (`rewards.voting`: "4484" and "4484.0" are one answer for the calculator). For a size n < N, the N samples of a
  prompt are cut into N // n disjoint consecutive blocks (samples 0..n-1, n..2n-1, ...), each block votes, and
  majority@n is the mean over blocks and prompts: an estimate from every sample, not from the first n alone. A
  block's answer is the one most of its samples gave; samples with no answer (nothing extracted, or the sample
  failed) do not vote, and a block where none answered is wrong. **Ties** go to the tied answer whose first vote
  came earliest in sample order (deterministic: sample k of a prompt is the same sample on every run with the
  same seed). The block is right when the verifier judged the first sample that gave the winning answer correct.
- **pass@n**: the unbiased estimator 1 - C(N - c, n) / C(N, n) over the N samples, c of them correct (Chen et
  al. 2021), failed samples counted as wrong.
- **Reflective aggregation** (K2 Thinking's heavy mode: parallel trajectories, then the model reflects over all
  of them to give the final result): the policy gets a follow-up prompt holding the question and the final
  answers of the first n samples (`REFLECTION_TEMPLATE`), in the task's environment (its tools too), and its
  answer is scored by the task's reward. One reflection per prompt and size n; `reflective_unparsed` counts the
  reflections from which no answer could be extracted (they count as wrong).

Everything runs through the job's rollout backend (the rollout workers, INT4 engine and all), so the samples are
those `tiderl train` would draw from the policy at the rollout temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from rich.table import Table

from envs.base import PromptRow
from rewards.scoring import RewardScorer, ScoringResult
from rewards.voting import AnswerVerifier, answer_verifier
from rl.config import JobConfig
from rollouts.backend import RolloutBackend
from rollouts.records import Trajectory

REFLECTION_TEMPLATE = (
    "{question}\n\n{n} attempts at this gave these final answers:\n{answers}\nCheck them and give the final answer."
)
"""The follow-up prompt of reflective aggregation: it replaces the prompt's last user message (system prompt and
tools stay). `answers` is one line per attempt, `Attempt i: <its final visible answer>` (text after the last
`</think>`, whitespace collapsed, at most `ANSWER_CHARS` characters; `(no answer)` for a failed sample)."""
ANSWER_CHARS = 120
HEAVY_SEED = 7919
"""Added to the job's seed for the heavy samples (and + n for the reflections): another stream than the eval's."""


@dataclass(frozen=True)
class Candidate:
    """One sample of a prompt as a vote sees it."""

    answer: Any | None
    """Its final answer as the verifier extracts it; None: it gave none, or the sample failed."""
    correct: bool
    """The task verifier's verdict (False for a failed sample)."""
    text: str
    """Its final visible answer, as the reflection prompt shows it."""


def heavy_sizes(n: int) -> list[int]:
    """The sizes reported: 1, 2, 4, ... up to `n`, and `n` itself."""
    sizes = [1 << k for k in range(n.bit_length()) if 1 << k <= n]
    return sizes if sizes[-1] == n else [*sizes, n]


def vote(candidates: list[Candidate], same) -> tuple[int | None, bool]:
    """The index of the first candidate giving the winning answer (None: no candidate answered), and whether the
    top count was tied (ties go to the answer first given earliest, see the module docstring)."""
    clusters: list[list[int]] = []  # [index of the first candidate with the answer, votes]
    for i, c in enumerate(candidates):
        if c.answer is None:
            continue
        for cluster in clusters:
            if same(candidates[cluster[0]].answer, c.answer):
                cluster[1] += 1
                break
        else:
            clusters.append([i, 1])
    if not clusters:
        return None, False
    top = max(votes for _, votes in clusters)
    winners = [first for first, votes in clusters if votes == top]
    return winners[0], len(winners) > 1


def majority(groups: list[list[Candidate]], n: int, same) -> dict[str, float]:
    """majority@n over disjoint blocks of n samples (`accuracy`), the share of blocks whose vote was tied and of
    blocks where no sample answered."""
    right = tied = empty = 0.0
    for group in groups:
        blocks = [group[b * n : (b + 1) * n] for b in range(len(group) // n)]
        for block in blocks:
            winner, tie = vote(block, same)
            right += (winner is not None and block[winner].correct) / len(blocks)
            tied += tie / len(blocks)
            empty += (winner is None) / len(blocks)
    count = max(len(groups), 1)
    return {"accuracy": right / count, "tied": tied / count, "no_answer": empty / count}


def pass_at(correct: int, total: int, n: int) -> float:
    """Probability that n of `total` samples (`correct` of them right), drawn without replacement, hold one right."""
    return 1.0 - math.comb(total - correct, n) / math.comb(total, n)


def reflection_row(row: PromptRow, answers: list[str]) -> PromptRow:
    """The prompt of reflective aggregation over `answers` (`REFLECTION_TEMPLATE`)."""
    users = [i for i, m in enumerate(row.messages) if m.get("role") == "user"]
    if not users:
        raise ValueError(f"prompt {row.index} ({row.data_source}) has no user message to reflect on")
    last = users[-1]
    lines = "\n".join(f"Attempt {i + 1}: {a}" for i, a in enumerate(answers))
    content = REFLECTION_TEMPLATE.format(question=row.messages[last]["content"], n=len(answers), answers=lines)
    messages = [*row.messages[:last], {**row.messages[last], "content": content}, *row.messages[last + 1 :]]
    return replace(row, messages=messages, extra_info={**row.extra_info, "heavy_attempts": len(answers)})


def final_text(trajectory: Trajectory) -> str:
    """The final visible answer: text after the last `</think>`, whitespace collapsed, cut to `ANSWER_CHARS`."""
    visible = " ".join(trajectory.response_text.rsplit("</think>", 1)[-1].split())
    return visible[:ANSWER_CHARS] or "(empty)"


def candidate_groups(
    rows: list[PromptRow], result: ScoringResult, trajectories: list[Trajectory], verifier: AnswerVerifier
) -> list[list[Candidate]]:
    """Per row (in `rows`' order), its samples as candidates, in sample order."""
    verdicts = {id(s.trajectory): s.correct for s in result.scored}
    by_row: dict[int, list[Candidate]] = {row.index: [] for row in rows}
    for t in trajectories:  # a worker returns a row's samples in sample order
        scored = id(t) in verdicts
        by_row[t.row.index].append(
            Candidate(
                answer=verifier.extract(t.response_text) if scored else None,
                correct=verdicts.get(id(t), False),
                text=final_text(t) if scored else "(no answer)",
            )
        )
    return [by_row[row.index] for row in rows]


def heavy_eval(
    workers: RolloutBackend,
    scorer: RewardScorer,
    rows: list[PromptRow],
    cfg: JobConfig,
    n: int,
    reflect_greedy: bool = False,
) -> dict[str, Any]:
    """`n` samples per prompt at the rollout temperature, majority@k, pass@k and reflective@k for k in
    `heavy_sizes(n)` (the `heavy` section of eval.json)."""
    verifier = answer_verifier(cfg.reward.functions[0].name)
    trajectories = workers.generate(rows, n, greedy=False, seed=cfg.seed + HEAVY_SEED)
    result = scorer.score(trajectories)
    groups = candidate_groups(rows, result, trajectories, verifier)
    short = [row.index for row, g in zip(rows, groups, strict=True) if len(g) != n]
    if short:
        raise RuntimeError(f"heavy mode: prompts {short[:5]} came back without their {n} samples")
    correct = [sum(c.correct for c in g) for g in groups]
    by_size = []
    for k in heavy_sizes(n):
        reflections = [reflection_row(row, [c.text for c in g[:k]]) for row, g in zip(rows, groups, strict=True)]
        reflected = workers.generate(reflections, 1, greedy=reflect_greedy, seed=cfg.seed + HEAVY_SEED + k)
        scored = scorer.score(reflected)
        right = sum(s.correct for s in scored.scored)
        unparsed = sum(verifier.extract(t.response_text) is None for t in reflected)
        vote_k = majority(groups, k, verifier.same)
        by_size.append(
            {
                "n": k,
                "majority": vote_k["accuracy"],
                "pass": sum(pass_at(c, n, k) for c in correct) / len(rows),
                "reflective": right / len(rows),
                "majority_tied": vote_k["tied"],
                "majority_no_answer": vote_k["no_answer"],
                "reflective_unparsed": unparsed / len(rows),
                "reflective_failed": float(scored.failed),
            }
        )
    no_answer = sum(c.answer is None for g in groups for c in g)
    return {
        "n": n,
        "num_prompts": len(rows),
        "temperature": cfg.rollout.temperature,
        "reflection": "greedy" if reflect_greedy else "sampled",
        "sample_accuracy": sum(correct) / (n * len(rows)),
        "samples_without_answer": no_answer / (n * len(rows)),
        "failed_samples": float(result.failed),
        "by_n": by_size,
        "reflection_template": REFLECTION_TEMPLATE,
    }


def heavy_table(heavy: dict[str, Any]) -> Table:
    """The terminal table: accuracy against the number of trajectories."""
    table = Table(
        title=f"heavy mode: {heavy['num_prompts']} prompts x {heavy['n']} samples at T={heavy['temperature']:g} "
        f"(reflection {heavy['reflection']})"
    )
    for column in ("n", "majority", "pass@n", "reflective", "ties", "no vote", "refl. unparsed"):
        table.add_column(column, justify="right")
    for r in heavy["by_n"]:
        table.add_row(
            str(r["n"]),
            f"{r['majority']:.3f}",
            f"{r['pass']:.3f}",
            f"{r['reflective']:.3f}",
            f"{r['majority_tied']:.3f}",
            f"{r['majority_no_answer']:.3f}",
            f"{r['reflective_unparsed']:.3f}",
        )
    return table
