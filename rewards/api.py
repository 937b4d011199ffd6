"""Reward functions as users already write them, for verl or for TRL, behind one interface.

Two signatures are detected from the function itself and adapted, sync or async:

- verl, one sample per call: `compute_score(data_source, solution_str, ground_truth, extra_info=None)` returning
  a number, a dict with `score` (and optionally `acc`, and anything else, which is ignored), or None.
- TRL, one batch per call: `reward_func(prompts, completions, **kwargs)` returning one `float | None` per
  completion. Prompts and completions are chat messages (TRL's conversational format: `completions[i]` is the
  list of messages the policy's episode added, assistant turns and tool observations). The keyword arguments are
  the dataset columns of each sample in verl's layout (`data_source`, `reward_model`, `extra_info`), plus
  `ground_truth`, the keys of `extra_info`, `completion_ids`, `group_ids`, `trainer_state` (`.global_step`) and,
  for every function after the first, `correct` (the first function's verdicts).

`None` means "no score for this sample" (the function does not apply to it). An exception, a timeout
(`timeout_s`, per sample for verl style, per batch for TRL style) or an invalid return value (NaN, a string, a list
of the wrong length) fails the samples it concerns for that function; each failure is logged once with the
function and the sample id and never stops the job. A TRL-style batch that raises is retried one sample at a
time, so only the samples that really raise fail.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Literal

log = logging.getLogger(__name__)

Style = Literal["verl", "trl"]
_VERL_PARAMS = ("data_source", "solution_str", "ground_truth")


class RewardSignatureError(TypeError):
    """A reward function has neither verl's nor TRL's signature."""


@dataclass
class Failure:
    """A sample this function could not score, and why (shown in the log)."""

    reason: str


@dataclass
class RewardInput:
    """One sample as reward functions of either style see it."""

    sample_id: str
    group_id: int
    prompt: list[dict[str, Any]]
    completion: list[dict[str, Any]]
    response_text: str
    data_source: str
    ground_truth: Any
    extra_info: dict[str, Any]
    completion_ids: list[int]


@dataclass
class Scores:
    """One function's verdicts on a batch: per sample a float, None (no score) or a Failure; `acc` when given."""

    values: list[float | None | Failure]
    acc: list[bool | None] = field(default_factory=list)
    info: list[dict[str, Any] | None] = field(default_factory=list)
    """verl style: the other keys of a returned dict (verl's `reward_extra_info`, e.g. code_tests' `reason`), kept
    with the sample in the run's saved trajectories."""


def detect_style(name: str, fn: Callable[..., Any]) -> Style:
    """verl when the parameters name verl's arguments (or are all variadic), TRL when they take `completions`."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError) as e:
        raise RewardSignatureError(f"reward function {name!r}: cannot read its signature ({e})") from e
    names = list(params)
    if "completions" in names:
        return "trl"
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if (
        all(n in names for n in _VERL_PARAMS)
        or len(positional) >= 3
        or any(p.kind is p.VAR_POSITIONAL for p in params.values())
    ):
        return "verl"
    raise RewardSignatureError(
        f"reward function {name!r} takes ({', '.join(names)}): use verl's compute_score(data_source, solution_str, "
        f"ground_truth, extra_info=None) or TRL's reward_func(prompts, completions, **kwargs)"
    )


class RewardFunction:
    """A user or built-in reward function, adapted: `await score(inputs, step, correct)` -> Scores."""

    def __init__(
        self, name: str, fn: Callable[..., Any], timeout_s: float, kwargs: dict[str, Any] | None = None
    ) -> None:
        self.name = name
        self.fn = functools.partial(fn, **kwargs) if kwargs else fn
        self.style = detect_style(name, fn)
        self.is_async = inspect.iscoroutinefunction(fn)
        self.timeout_s = timeout_s

    async def score(self, inputs: list[RewardInput], step: int, correct: list[bool] | None) -> Scores:
        if self.style == "trl":
            return await self._trl(inputs, step, correct)
        if self.is_async:
            results = await asyncio.gather(*(self._verl_async_one(x) for x in inputs))
        else:
            results = await self._verl_sync(inputs)
        return Scores([v for v, _, _ in results], [a for _, a, _ in results], [i for _, _, i in results])

    async def _call(self, *args: Any, **kwargs: Any) -> Any:
        if self.is_async:
            return await asyncio.wait_for(self.fn(*args, **kwargs), self.timeout_s)
        return await asyncio.wait_for(_in_daemon_thread(functools.partial(self.fn, *args, **kwargs)), self.timeout_s)

    async def _verl_async_one(self, x: RewardInput) -> _Verdict:
        try:
            raw = await self._call(x.data_source, x.response_text, x.ground_truth, x.extra_info)
        except TimeoutError:
            return Failure(f"timed out after {self.timeout_s:g} s"), None, None
        except Exception as e:
            return Failure(f"raised {type(e).__name__}: {e}"), None, None
        return _verl_value(raw)

    async def _verl_sync(self, inputs: list[RewardInput]) -> list[_Verdict]:
        """A sync verl function over the batch in one daemon thread, sample after sample, each within `timeout_s`.

        One thread per batch rather than per sample: thread start-up and hand-over cost more than a typical
        verifier call. A sample that overruns is failed, its thread is told to stop (it is abandoned if stuck),
        and a fresh thread takes the remaining samples.
        """
        loop = asyncio.get_running_loop()
        results: list[_Verdict] = [(None, None, None)] * len(inputs)
        start = 0
        while start < len(inputs):
            queue: asyncio.Queue = asyncio.Queue()
            stop = threading.Event()

            def work(first: int = start, queue: asyncio.Queue = queue, stop: threading.Event = stop) -> None:
                for j in range(first, len(inputs)):
                    if stop.is_set():
                        return
                    x = inputs[j]
                    try:
                        outcome: tuple[bool, Any] = (
                            True,
                            self.fn(x.data_source, x.response_text, x.ground_truth, x.extra_info),
                        )
                    except Exception as e:  # delivered to the loop, which fails this sample only
                        outcome = (False, e)
                    try:
                        loop.call_soon_threadsafe(queue.put_nowait, (j, outcome))
                    except RuntimeError:  # scoring finished without us (we were abandoned)
                        return

            threading.Thread(target=work, daemon=True, name="tiderl-reward").start()
            while start < len(inputs):
                try:
                    j, (ok, value) = await asyncio.wait_for(queue.get(), self.timeout_s)
                except TimeoutError:
                    stop.set()
                    results[start] = (Failure(f"timed out after {self.timeout_s:g} s"), None, None)
                    start += 1
                    break
                failed = (Failure(f"raised {type(value).__name__}: {value}"), None, None)
                results[j] = _verl_value(value) if ok else failed
                start = j + 1
        return results

    async def _trl(self, inputs: list[RewardInput], step: int, correct: list[bool] | None) -> Scores:
        try:
            raw = await self._call(**self._trl_kwargs(inputs, step, correct))
        except TimeoutError:
            return Scores([Failure(f"timed out after {self.timeout_s:g} s (the whole batch)")] * len(inputs))
        except Exception as e:
            if len(inputs) == 1:
                return Scores([Failure(f"raised {type(e).__name__}: {e}")])
            # find the samples that make it raise: one call per sample
            parts = await asyncio.gather(
                *(
                    self._trl([x], step, None if correct is None else [c])
                    for x, c in zip(inputs, correct or [None] * len(inputs), strict=True)
                )
            )
            return Scores([p.values[0] for p in parts])
        if not isinstance(raw, (list, tuple)):
            return Scores(
                [Failure(f"returned {type(raw).__name__}, expected a list of {len(inputs)} floats")] * len(inputs)
            )
        if len(raw) != len(inputs):
            return Scores([Failure(f"returned {len(raw)} scores for {len(inputs)} completions")] * len(inputs))
        return Scores([_check_value(v) for v in raw])

    @staticmethod
    def _trl_kwargs(inputs: list[RewardInput], step: int, correct: list[bool] | None) -> dict[str, Any]:
        columns: dict[str, list[Any]] = {
            "data_source": [x.data_source for x in inputs],
            "reward_model": [{"ground_truth": x.ground_truth} for x in inputs],
            "extra_info": [x.extra_info for x in inputs],
            "ground_truth": [x.ground_truth for x in inputs],
        }
        for key in sorted({k for x in inputs for k in x.extra_info}):
            columns.setdefault(key, [x.extra_info.get(key) for x in inputs])
        kwargs: dict[str, Any] = {
            **columns,
            "prompts": [x.prompt for x in inputs],
            "completions": [x.completion for x in inputs],
            "completion_ids": [x.completion_ids for x in inputs],
            "group_ids": [x.group_id for x in inputs],
            "trainer_state": SimpleNamespace(global_step=step),
        }
        if correct is not None:
            kwargs["correct"] = correct
        return kwargs


def _in_daemon_thread(call: Callable[[], Any]) -> asyncio.Future:
    """Run a sync function in its own daemon thread; the future resolves with its result.

    Not a ThreadPoolExecutor: a reward function stuck past its timeout cannot be killed, and executor threads are
    joined at interpreter exit, so one endless function would keep the job from ever exiting. A daemon thread is
    abandoned instead.
    """
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def deliver(setter: Callable[[Any], None], value: Any) -> None:
        if not future.done():
            setter(value)

    def run() -> None:
        try:
            result = call()
        except BaseException as e:  # delivered to the awaiting coroutine, which isolates it
            outcome = (future.set_exception, e)
        else:
            outcome = (future.set_result, result)
        try:
            loop.call_soon_threadsafe(deliver, *outcome)
        except RuntimeError:  # the scoring loop finished (this call had timed out): nobody is waiting
            pass

    threading.Thread(target=run, daemon=True, name="tiderl-reward").start()
    return future


_Verdict = tuple[float | None | Failure, bool | None, dict[str, Any] | None]
"""A verl-style function's verdict on one sample: score, acc, the dict's other keys."""


def _verl_value(raw: Any) -> _Verdict:
    """A verl-style return value: a number, None, or a dict with `score` (and optionally `acc` and other keys, kept
    as the sample's info: numbers, strings and booleans as they are, anything else as its short repr)."""
    acc, info = None, None
    if isinstance(raw, dict):
        if "score" not in raw:
            return Failure(f"returned a dict without 'score': {_short(raw)}"), None, None
        acc = bool(raw["acc"]) if raw.get("acc") is not None else None
        info = {
            str(k): v if v is None or isinstance(v, (str, int, float, bool)) else _short(v)
            for k, v in raw.items()
            if k not in ("score", "acc")
        } or None
        raw = raw["score"]
    return _check_value(raw), acc, info


def _check_value(raw: Any) -> float | None | Failure:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        return Failure(f"returned {type(raw).__name__} {_short(raw)}; expected a number or None")
    if not math.isfinite(raw):
        return Failure(f"returned {raw}; scores must be finite")
    return float(raw)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
