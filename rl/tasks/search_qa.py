"""The `search_qa` task: questions about the shipped collection of fictional islands (`envs/data/islands.jsonl`),
answerable only by searching it with the `search` tool (`envs.search`); scored by the `contains_answer` reward."""

from __future__ import annotations

import random
from typing import Any

from envs.search import DEFAULT_CORPUS, load_corpus
from rl.tasks.registry import Task, register_task

DATA_SOURCE = "tiderl/search_qa"
SYSTEM_PROMPT = "Answer the question. Search the documents first: the answer is in them."


_QUESTIONS = {
    "capital": "What is the capital of {island}?",
    "founded": "In which year was {island} founded?",
    "export": "What is the main export of {island}?",
}


def make_rows(n: int, seed: int, split: str) -> list[dict[str, Any]]:
    """`n` questions about the shipped collection, in verl's layout; train and eval ask about disjoint islands."""
    facts = [d["facts"] for d in load_corpus(str(DEFAULT_CORPUS)).docs]
    cut = len(facts) * 3 // 4
    pool = facts[:cut] if split == "train" else facts[cut:]
    rng = random.Random(f"{split}-{seed}")
    rows = []
    for i in range(n):
        f, field = rng.choice(pool), rng.choice(sorted(_QUESTIONS))
        rows.append(
            {
                "prompt": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": _QUESTIONS[field].format(**f)},
                ],
                "data_source": DATA_SOURCE,
                "reward_model": {"style": "rule", "ground_truth": f[field]},
                "extra_info": {"split": split, "index": i, "island": f["island"], "field": field},
            }
        )
    return rows


TASK = register_task(Task(name="search_qa", make_rows=make_rows, env="search", reward="contains_answer"))
