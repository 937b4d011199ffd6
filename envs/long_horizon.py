"""A long-horizon environment: a chain of locked doors, one tool call per door, hundreds of calls per episode.

The row names a chain (`extra_info.chain_seed`, `extra_info.hops`: 200 by default). The model holds the first key;
`open(key)` with the key of the current door opens it and the result (a room description and the next key, in
that order) is the only place the next key appears. Behind the last door is the treasure, which the model must
report: the `contains_answer` reward scores the final answer against it, so the reward depends on making every
call, in order. A wrong key is an `Error: ...` observation and the door stays shut (the key is still in the last
result that opened one).

Why this shape: each call depends on the previous result (no call can be skipped or reordered), the arguments are
short enough for the built-in policy to copy, and the room descriptions make tool results the bulk of the context,
as web pages are in K2 Thinking's long search runs, so hiding old results (`env.context`) is what keeps the
context bounded. The chain is a function of its seed, so the task's generator knows the treasure without running
the environment.
"""

from __future__ import annotations

import random

from envs.base import PromptRow
from envs.registry import register_env
from envs.tools import ToolEnv, ToolError, tool

DEFAULT_HOPS = 200
_WORDS = (
    "dusty quiet narrow vaulted damp bright cold round painted empty long marble wooden hall room stair corridor "
    "chamber gallery cellar with a an old lamp table chest rug window bench mirror map clock on the wall floor"
).split()


def make_chain(seed: int, hops: int) -> tuple[list[str], str]:
    """The `hops` door keys in order (distinct 4-digit strings) and the treasure (a 4-digit number too)."""
    rng = random.Random(f"long-horizon-{seed}")
    keys = [str(k) for k in rng.sample(range(1000, 10000), hops)]
    return keys, str(rng.randint(1000, 9999))


@register_env("long_horizon")
class LongHorizonEnv(ToolEnv):
    """One tool, `open(key)`; `hops` doors in a chain, the treasure behind the last one."""

    def __init__(self, hops: int = DEFAULT_HOPS, room_words: int = 12) -> None:
        if hops < 1 or room_words < 0:
            raise ValueError(f"env.kwargs: hops must be >= 1 and room_words >= 0, got {hops}, {room_words}")
        self.hops, self.room_words = hops, room_words
        self.keys: list[str] = []
        self.treasure = ""
        self.opened = 0
        self.wrong_keys = 0
        self.rng = random.Random(0)

    def start(self, row: PromptRow) -> list[dict]:
        hops = int(row.extra_info.get("hops", self.hops))
        self.keys, self.treasure = make_chain(int(row.extra_info.get("chain_seed", row.index)), hops)
        self.opened, self.wrong_keys = 0, 0
        self.rng = random.Random(f"rooms-{row.extra_info.get('chain_seed', row.index)}")
        return list(row.messages)

    @tool
    def open(self, key: str) -> str:
        """Open the current door with a key.

        Args:
            key: The key of the current door (4 digits).
        """
        if self.opened >= len(self.keys):
            raise ToolError("every door is open; answer with the treasure")
        if key.strip() != self.keys[self.opened]:
            self.wrong_keys += 1
            raise ToolError(f"key {key!r} does not fit door {self.opened + 1}")
        self.opened += 1
        room = " ".join(self.rng.choice(_WORDS) for _ in range(self.room_words))
        if self.opened == len(self.keys):
            # the number last, as the keys are: the copy a policy learns for keys is the one the answer needs (the
            # built-in policy fitted on "The treasure is 520513." opened all 200 doors and then miscopied it)
            return f"Door {self.opened} opens: {room}. Treasure: {self.treasure}"
        return f"Door {self.opened} opens: {room}. Next key: {self.keys[self.opened]}"
