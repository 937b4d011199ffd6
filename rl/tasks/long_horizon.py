"""The `long_horizon` task: follow a chain of `hops` locked doors (`envs.long_horizon`), one `open` call each,
and report the treasure behind the last; scored by `contains_answer`. 200 doors by default: an episode of at least
200 sequential tool calls, run with context management (`env.context`, configs/long_horizon.yaml)."""

from __future__ import annotations

import random
import re
from typing import Any

from envs.long_horizon import DEFAULT_HOPS, make_chain
from rl.tasks.registry import Task, register_task

DATA_SOURCE = "tiderl/long_horizon"
SYSTEM_PROMPT = "Open the doors in order with the open tool. Each door shows the next key. Report the treasure."
TOKENS_PER_HOP = 64
"""Generated-token budget per door (`extra_info.token_budget` = hops x this): a call is ~25 tokens."""


def make_rows(n: int, seed: int, split: str, hops: int = DEFAULT_HOPS) -> list[dict[str, Any]]:
    """`n` chains of `hops` doors in verl's layout; train and eval draw disjoint chain seeds."""
    rng = random.Random(f"{split}-{seed}")
    offset = 0 if split == "train" else 1 << 30
    rows = []
    for i in range(n):
        chain_seed = offset + rng.randrange(1 << 30)
        keys, treasure = make_chain(chain_seed, hops)
        rows.append(
            {
                "prompt": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    # the first key in the words every result gives the next one: the copy the policy learns on
                    # 199 results is the one the first door needs (a built-in policy fitted on "The first key is
                    # 1516." miscopied it as "7166" in every greedy episode, then never opened door 1)
                    {"role": "user", "content": f"There are {hops} doors. Next key: {keys[0]}"},
                ],
                "data_source": DATA_SOURCE,
                "reward_model": {"style": "rule", "ground_truth": treasure},
                "extra_info": {
                    "split": split,
                    "index": i,
                    "chain_seed": chain_seed,
                    "hops": hops,
                    "token_budget": hops * TOKENS_PER_HOP,
                },
            }
        )
    return rows


SHORT_CHAINS_PER_CHAIN = 5
SHORT_HOPS = (1, 16)


def teacher_rows(n: int, seed: int, split: str) -> list[dict[str, Any]]:
    """The warm start's chains: `n` of 200 doors and, for each, `SHORT_CHAINS_PER_CHAIN` of 1 to 16 doors.

    Why the short ones: a 200-door episode is ~110 training sequences (context management), and only its first
    holds the call copied from the prompt and only its last the answer copied from the last result. Fitted on
    96 such episodes the built-in policy opened all 200 doors of held-out chains without an error and then
    reported a wrong treasure in every one (it had seen 96 treasures, and learnt them rather than the copy). A
    short chain fits in one sequence that holds both, with a key and a treasure of its own.
    """
    rng = random.Random(f"{split}-{seed}-short")
    short = [
        make_rows(1, rng.randrange(1 << 30), f"{split}-short", hops=rng.randint(*SHORT_HOPS))[0]
        for _ in range(n * SHORT_CHAINS_PER_CHAIN)
    ]
    return make_rows(n, seed, split) + short


def teacher(context: str) -> str:
    """The chain's solution as a rule, given the end of the context: open the door of the last key shown (the
    prompt's, then each result's), and report the treasure once it shows."""
    treasure = re.findall(r"Treasure: (\d+)", context)
    if treasure:
        return f"The treasure is {treasure[-1]}."
    keys = re.findall(r"Next key: (\d{4})", context)
    if not keys:
        raise ValueError("long_horizon teacher: no key in the context's end (is env.context.keep_last 0?)")
    return f'<tool_call>{{"name": "open", "arguments": {{"key": "{keys[-1]}"}}}}</tool_call>'


TASK = register_task(
    Task(
        name="long_horizon",
        make_rows=make_rows,
        env="long_horizon",
        reward="contains_answer",
        teacher=teacher,
        teacher_rows=teacher_rows,
    )
)
