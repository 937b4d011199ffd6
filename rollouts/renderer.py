"""One renderer owns messages <-> tokens, with the model's own chat template.

The prompt is rendered once with the template; after that the conversation grows only by appending token ids:
the model's sampled ids as they are, and tool observations rendered as the template's text *delta* (what the
template adds after the assistant's end-of-turn token for a tool message plus the next generation prompt). So
the learner trains on exactly the tokens the model produced, and nothing is re-tokenized.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from transformers import PreTrainedTokenizerBase


class Renderer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if tokenizer.chat_template is None:
            raise ValueError("the tokenizer has no chat template; set one (tokenizer.chat_template) before rollouts")
        self.tokenizer = tokenizer
        self.eos_token_id: int = tokenizer.eos_token_id
        self.pad_token_id: int = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        self._eos_text: str = tokenizer.eos_token
        # The rendering of a fixed earlier turn, through its end-of-turn token: observations are the text the
        # template adds after it. Computed once; `observation_ids` runs on every tool step.
        self._base = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
        before = tokenizer.apply_chat_template(self._base, tokenize=False)
        self._base_prefix = before[: before.rindex(self._eos_text) + len(self._eos_text)]
        self._rendered: OrderedDict[str, list[int]] = OrderedDict()  # recent renderings (`_memo`)

    def prompt_ids(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
        def render() -> list[int]:
            return self.encode(
                self.tokenizer.apply_chat_template(
                    messages, tools=tools or None, add_generation_prompt=True, tokenize=False
                )
            )

        return self._memo(["prompt", messages, tools or None], render)

    def observation_ids(self, observations: list[dict[str, Any]]) -> list[int]:
        """Tokens that follow the model's end-of-turn token: the observations and the next assistant prompt."""

        def render() -> list[int]:
            after = self.tokenizer.apply_chat_template(
                self._base + observations, add_generation_prompt=True, tokenize=False
            )
            if not after.startswith(self._base_prefix):
                raise ValueError("the chat template renders earlier turns differently once a tool message follows")
            return self.encode(after[len(self._base_prefix) :])

        return self._memo(["observation", observations], render)

    def _memo(self, key: Any, render: Callable[[], list[int]], size: int = 4096) -> list[int]:
        """`render()`, kept for the most recent `size` keys: a GRPO group's samples start from one prompt and
        often read the same tool result, and a Jinja rendering costs ~0.15 ms, a tenth of a rollout's time on the
        built-in policy. The key is the messages' JSON, so equal conversations render once."""
        text = json.dumps(key, sort_keys=True, default=str)
        ids = self._rendered.get(text)
        if ids is None:
            ids = self._rendered[text] = render()
            if len(self._rendered) > size:
                self._rendered.popitem(last=False)
        else:
            self._rendered.move_to_end(text)
        return list(ids)

    def assistant_ids(self, message: dict[str, Any]) -> list[int]:
        """Tokens of one assistant message as the template writes it, through the end-of-turn token.

        What the policy should generate for `message`: used to build supervised demonstrations that tokenize the
        way rollouts do.
        """
        base = [{"role": "user", "content": "q"}]
        before = self.tokenizer.apply_chat_template(base, add_generation_prompt=True, tokenize=False)
        after = self.tokenizer.apply_chat_template(base + [message], tokenize=False)
        if not after.startswith(before):
            raise ValueError("the chat template's generation prompt is not a prefix of the rendered assistant turn")
        turn = after[len(before) :]
        return self.encode(turn[: turn.index(self._eos_text) + len(self._eos_text)])

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        """Decoded model output with markup kept (`<think>`, `<tool_call>`), the end-of-turn token dropped."""
        if ids and ids[-1] == self.eos_token_id:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=False)
