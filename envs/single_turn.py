"""`single_turn`: no tools, the prompt as it is and one answer, for reasoning tasks scored by a verifier alone
(the `word_problems` task; most of verl's and TRL's datasets).

An episode ends at the model's first answer: with no tools offered, a turn that still writes a tool call gets an
error observation, and `env.max_turns: 1` ends the sample there.
"""

from __future__ import annotations

from envs.registry import register_env
from envs.tools import ToolEnv


@register_env("single_turn")
class SingleTurnEnv(ToolEnv):
    """A `ToolEnv` without `@tool` methods: it offers no tools."""
