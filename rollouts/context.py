"""Context management on long horizons: past a token budget, older tool results are hidden, and the episode goes on
in a new training sequence.

Kimi K2 Thinking runs hundreds of sequential tool calls by hiding earlier tool outputs once the context passes a
limit. The agent loop does the same after a tool step whose context is longer than `env.context.budget_tokens`:

1. the tool results of every step but the last `keep_last` become `placeholder` (the template's own rendering of
   the same tool messages with that content);
2. if that is not enough and `drop_turns` is on, every step but the last `keep_last` (an assistant turn and its
   results) is dropped, and the opening prompt is rendered again with `placeholder` as a user message after it
   (the prompt was rendered by the template in the first place: nothing the policy sampled is re-tokenized).
   All of them at once, not just enough to fit: the context then has room to grow for many steps before the next
   rewrite, where dropping one step at a time would rewrite (split the sequence, and prefill everything after the
   prompt again) on every later step.

The new context is spliced from token ids: the prompt, each kept assistant turn exactly as sampled, each kept or
hidden observation as rendered. The sequence so far is closed as it was (its tokens, rollout logprobs and loss
mask: the tokens the engine saw and sampled) and the episode continues in a new sequence that starts with the
rewritten context, all of it mask 0: a policy token trains once, in the sequence it was sampled in. The engine
continues the episode in its cache slot from the longest common prefix (up to the first hidden result), so only
what changed is prefilled again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from envs.config import ContextConfig
from rollouts.renderer import Renderer


@dataclass
class ToolStep:
    """One tool step in the current sequence: an assistant turn `[start, obs_start)` and the observations that
    answered it `[obs_start, end)`."""

    start: int
    obs_start: int
    end: int
    observations: list[dict[str, Any]]
    """The tool messages of the step, as rendered (hidden ones are rendered again with the placeholder)."""
    hidden: bool = False


@dataclass
class ContextState:
    """What an episode keeps to rewrite its context: the opening messages and tools (to render the prompt again),
    where the prompt ends and where each tool step sits in the current sequence."""

    opening: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    prompt_end: int = 0
    steps: list[ToolStep] = field(default_factory=list)
    dropped: int = 0
    """Tool steps dropped from the context so far (over every rewrite)."""
    hidden: int = 0
    """Tool steps whose results were hidden so far (over every rewrite)."""


def rewrite(ids: list[int], state: ContextState, cfg: ContextConfig, renderer: Renderer) -> list[int] | None:
    """The rewritten context of an episode whose current sequence is `ids`, or None when it is within the budget.

    Updates `state` (step positions in the new context, counts of hidden and dropped steps).
    """
    if not cfg.budget_tokens or len(ids) <= cfg.budget_tokens:
        return None
    steps = state.steps
    covered = state.prompt_end + sum(s.end - s.start for s in steps)
    if covered != len(ids) or any(b.start != a.end for a, b in zip(steps, steps[1:], strict=False)):
        raise ValueError(f"context of {len(ids)} tokens is not its prompt followed by its tool steps; cannot rewrite")
    n_old = max(0, len(steps) - cfg.keep_last)  # steps[:n_old] may be hidden or dropped
    turns = [ids[s.start : s.obs_start] for s in steps]
    observations = [ids[s.obs_start : s.end] for s in steps]
    newly_hidden = [k for k in range(n_old) if not steps[k].hidden]
    for k in newly_hidden:
        placeholder = [{**m, "content": cfg.placeholder} for m in steps[k].observations]
        observations[k] = renderer.observation_ids(placeholder)
    prompt = ids[: state.prompt_end]
    total = len(prompt) + sum(len(t) + len(o) for t, o in zip(turns, observations, strict=True))
    drop = 0
    if total > cfg.budget_tokens and cfg.drop_turns and n_old:
        if state.dropped == 0:  # the first drop: the opening prompt gains the placeholder as a user message
            prompt = renderer.prompt_ids([*state.opening, {"role": "user", "content": cfg.placeholder}], state.tools)
        drop = n_old
    if not newly_hidden and not drop:
        return None  # nothing left to hide or drop: the context stays as it is
    out = list(prompt)
    kept = []
    for k in range(drop, len(steps)):
        start = len(out)
        out += turns[k]
        obs_start = len(out)
        out += observations[k]
        kept.append(ToolStep(start, obs_start, len(out), steps[k].observations, steps[k].hidden or k < n_old))
    state.prompt_end = len(prompt)
    state.steps = kept
    state.hidden += len(newly_hidden)
    state.dropped += drop
    return out
