"""Reward models as Ray actors: a discriminative scorer and a generative judge, batched, with their own resources.

- `classifier`: any `AutoModelForSequenceClassification` directory. The conversation (prompt + completion) is
  rendered with the model's chat template; the score is the logit of a one-label head, or the probability of
  label 1 for a two-label head.
- `judge` (K2's self-critique style): a causal LM prompted with a rubric. Pointwise, it rates each response and
  ends with `Score: N` (0 to 10), scaled to [0, 1]; pairwise, it compares each sample with the first sample of its
  group and answers `[[A]]` (this sample is better: 1), `[[B]]` (0) or `[[C]]` (tie: 0.5). A verdict that does not
  parse is None: no score, counted as `reward_none/<name>`.

Rollout workers send finished episodes to these actors while the rest of the step is still generating
(`reward.models_async`), so scoring overlaps generation instead of waiting at the end of the step.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ray
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rewards.config import RewardModelConfig
from rollouts.actors import ACTOR_LOST
from rollouts.records import Trajectory, completion_messages

if TYPE_CHECKING:
    from rollouts.agent_loop import Episode

log = logging.getLogger("tiderl")

DEFAULT_RUBRIC = (
    "You are a strict grader. Judge the response to the user's request for correctness first, then for clarity "
    "and concision. Think briefly, then give your verdict."
)
_SCORE = re.compile(r"Score:\s*(\d+(?:\.\d+)?)")
_PAIR = re.compile(r"\[\[([ABC])\]\]")


def parse_pointwise(text: str) -> float | None:
    """The last `Score: N` (0..10) as N / 10; None when there is none or it is out of range."""
    found = _SCORE.findall(text)
    if not found:
        return None
    value = float(found[-1])
    return value / 10 if 0 <= value <= 10 else None


def parse_pairwise(text: str) -> float | None:
    """The last `[[A]]` / `[[B]]` / `[[C]]` as 1 / 0 / 0.5; None when there is none."""
    found = _PAIR.findall(text)
    return {"A": 1.0, "B": 0.0, "C": 0.5}[found[-1]] if found else None


def _text(messages: list[dict[str, Any]]) -> str:
    return "\n".join(str(m.get("content", "")) for m in messages)


class RewardModel:
    """Scores items `{"prompt": messages, "completion": messages, "group_id": int, "sample_id": str}`."""

    def __init__(self, cfg: RewardModelConfig) -> None:
        torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if cfg.kind == "classifier":
            self.model = AutoModelForSequenceClassification.from_pretrained(cfg.path).eval()
            # the head pools the last token that is not `config.pad_token_id`: it must be the id we pad with
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        else:
            from rollouts.engine import Engine

            self.model = AutoModelForCausalLM.from_pretrained(cfg.path).eval()
            self.engine = Engine(self.model, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)

    def score(self, items: list[dict[str, Any]]) -> list[float | None]:
        out: list[float | None] = []
        for start in range(0, len(items), self.cfg.batch_size):
            chunk = items[start : start + self.cfg.batch_size]
            out.extend(self._classify(chunk) if self.cfg.kind == "classifier" else self._judge(chunk, items))
        return out

    @torch.no_grad()
    def _classify(self, items: list[dict[str, Any]]) -> list[float | None]:
        ids = [self._encode(item["prompt"] + item["completion"], generation_prompt=False) for item in items]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, x in enumerate(ids):  # right padding: sequence-classification heads pool the last real token
            input_ids[i, : len(x)] = torch.tensor(x)
            attention[i, : len(x)] = 1
        logits = self.model(input_ids=input_ids, attention_mask=attention).logits.float()
        scores = logits[:, 0] if logits.shape[-1] == 1 else torch.softmax(logits, -1)[:, 1]
        return [float(s) for s in scores]

    def _judge(self, items: list[dict[str, Any]], batch: list[dict[str, Any]]) -> list[float | None]:
        if self.cfg.mode == "pointwise":
            prompts = [
                self._judge_prompt(
                    item["prompt"], f"Response:\n{_text(item['completion'])}", "End with 'Score: N', N from 0 to 10."
                )
                for item in items
            ]
            parse = parse_pointwise
        else:
            firsts: dict[int, dict[str, Any]] = {}
            for item in batch:
                firsts.setdefault(item["group_id"], item)
            prompts = [
                self._judge_prompt(
                    item["prompt"],
                    f"Response A:\n{_text(item['completion'])}\n\nResponse "
                    f"B:\n{_text(firsts[item['group_id']]['completion'])}",
                    "End with [[A]] if A is better, [[B]] if B is better, [[C]] for a tie.",
                )
                for item in items
            ]
            parse = parse_pairwise
        generations = self.engine.generate(
            prompts, [self.cfg.max_new_tokens] * len(prompts), temperature=1.0, greedy=True
        )
        return [parse(self.tokenizer.decode(g.token_ids, skip_special_tokens=True)) for g in generations]

    def _judge_prompt(self, prompt: list[dict[str, Any]], responses: str, instruction: str) -> list[int]:
        question = _text([m for m in prompt if m.get("role") == "user"])
        messages = [
            {"role": "system", "content": self.cfg.rubric or DEFAULT_RUBRIC},
            {"role": "user", "content": f"Request:\n{question}\n\n{responses}\n\n{instruction}"},
        ]
        return self._encode(messages, generation_prompt=True)

    def _encode(self, messages: list[dict[str, Any]], generation_prompt: bool) -> list[int]:
        if self.tokenizer.chat_template is not None:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
        else:
            text = _text(messages)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return ids[-self.cfg.max_length :]  # keep the end: the answer is what is judged


RewardModelActor = ray.remote(RewardModel)


class RewardModelPool:
    """The reward model actors, one per configured model, each in its placement bundle (`options(i)`), and
    their restarts: a model actor that dies is started again and the groups it had not scored are sent again."""

    def __init__(
        self,
        configs: list[RewardModelConfig],
        options: Callable[[int], dict[str, Any]] | None = None,
        max_restarts: int = 3,
    ) -> None:
        self.configs = list(configs)
        self.options = options or (
            lambda i: {"num_cpus": self.configs[i].num_cpus, "num_gpus": self.configs[i].num_gpus}
        )
        self.max_restarts = max_restarts
        self.actors = {
            c.name: RewardModelActor.options(**self.options(i)).remote(c) for i, c in enumerate(self.configs)
        }
        self.restarts = 0

    def restart(self, name: str, cause: BaseException) -> Any:
        """Replace the (dead) actor of model `name`; returns the new handle."""
        if self.restarts >= self.max_restarts:
            raise RuntimeError(
                f"reward model {name!r} died again after {self.restarts} restarts (cluster.max_worker_restarts): "
                f"{cause}"
            ) from cause
        i = next(k for k, c in enumerate(self.configs) if c.name == name)
        log.warning(
            "reward model %r died (%s); restarting it and scoring its samples again", name, type(cause).__name__
        )
        try:
            ray.kill(self.actors[name], no_restart=True)
        except Exception:  # already gone
            pass
        self.actors[name] = RewardModelActor.options(**self.options(i)).remote(self.configs[i])
        self.restarts += 1
        return self.actors[name]

    def kill(self) -> None:
        for actor in self.actors.values():
            ray.kill(actor)


def reward_model_item(finished: Episode | Trajectory) -> dict[str, Any]:
    """What a reward model scores of a finished sample (an agent-loop `Episode` or a `Trajectory`; both hold its
    `Sample`)."""
    sample = finished.sample
    prompt, completion = completion_messages(sample.messages, sample.row.messages)
    return {"prompt": prompt, "completion": completion, "group_id": sample.group_id, "sample_id": sample.sample_id}


def fetch_model_scores(trajectories: list, models: RewardModelPool | None, score_in_workers: bool) -> None:
    """Fill each trajectory's `model_scores` (and `model_score_failures`) from the reward model actors.

    With `score_in_workers`, the workers already sent every finished group (`model_score_refs`), so this only
    collects results that are mostly ready; otherwise the whole batch is sent now (the barrier). A model that
    fails on a batch marks those samples with the reason (`model_score_failures`), which the scorer counts as
    failures; a model actor that died is restarted and the samples it held are sent again.
    """
    if score_in_workers:  # already fetched (steps a checkpoint kept) have scores and no refs left
        trajectories = [t for t in trajectories if t.model_score_refs or t.model_scores is None]
    if models is None or not models.actors or not trajectories:
        return
    import ray.exceptions

    if not score_in_workers:
        items = [reward_model_item(t) for t in trajectories]
        refs = {name: actor.score.remote(items) for name, actor in models.actors.items()}
        for i, t in enumerate(trajectories):
            t.model_score_refs = {name: (ref, i) for name, ref in refs.items()}
    holders: dict[tuple[str, Any], list] = {}  # (model, ref) -> the trajectories whose scores it carries
    for t in trajectories:
        for name, (ref, _) in t.model_score_refs.items():
            holders.setdefault((name, ref), []).append(t)
    results: dict[Any, list[float | None]] = {}  # ref -> the scores of its batch
    failed: dict[Any, str] = {}  # ref -> why its batch has no scores
    for (name, ref), held in holders.items():
        while True:
            try:
                results[ref] = ray.get(ref)
                break
            except ACTOR_LOST as e:
                actor = models.restart(name, e)
                ordered = sorted(held, key=lambda t: t.model_score_refs[name][1])
                ref_again = actor.score.remote([reward_model_item(t) for t in ordered])
                for position, t in enumerate(ordered):
                    t.model_score_refs[name] = (ref_again, position)
                ref = ref_again
            except ray.exceptions.RayError as e:
                failed[ref] = f"reward model failed: {type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
                break
    for t in trajectories:
        scores: dict[str, float | None] = {}
        failures: dict[str, str] = {}
        for name in models.actors:
            if name not in t.model_score_refs:
                failures[name] = "was not sent to the reward model"
                continue
            ref, position = t.model_score_refs[name]
            if ref in failed:
                failures[name] = failed[ref]
            else:
                scores[name] = results[ref][position]
        t.model_scores, t.model_score_failures = scores, failures
        t.model_score_refs = {}
