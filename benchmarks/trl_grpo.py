"""TRL's side of `benchmarks/vs_trl.py`: `GRPOTrainer` on the CPU on the same job (model, prompts in tiderl's
order, verifier and environment as TRL tools), timed step by step, then evaluated by tiderl's evaluator.

trl 1.16 is imported from `.oracles/` (`make oracles`), put on `sys.path` by `vs_trl.py` before this module loads.
"""

from __future__ import annotations

import asyncio
import gc
import math
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from envs.base import ToolCall
from envs.registry import make_env
from rewards.api import detect_style
from rewards.registry import get_reward
from rl.config import JobConfig
from rl.policy.warmstart import prepare_policy
from rollouts.model import load_policy, save_policy
from rollouts.renderer import Renderer

# tiderl's chat template writes `<think>` inside the content and `<tool_call>{json}</tool_call>` after it (Hermes);
# TRL's tool loop needs a response template to parse tool calls out of a turn, and TRL knows none for our template.
# This one keeps the whole visible turn (think included) as `content`, as tiderl's records do.
HERMES_RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "tool_calls": {
            "open": "<tool_call>",
            "close_pattern": r"</tool_call>",
            "repeats": True,
            "content": "json",
            "transform": {"type": "function", "function": "{content}"},
        },
        "content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"},
    },
}


class SchemaTool(dict):
    """A tool for TRL's `tools=`: a dict, so transformers renders the environment's own JSON schema as is (a plain
    function would be re-described from its docstring, changing the prompt), and callable, so TRL can run it."""

    def __init__(self, spec: dict[str, Any], env: Any) -> None:
        super().__init__(spec)
        self.__name__ = spec["function"]["name"]
        self.env = env

    def __call__(self, **arguments: Any) -> str:
        result = asyncio.run(self.env.step([ToolCall(self.__name__, arguments)]))
        return result.observations[0]["content"]


def trl_reward(cfg: JobConfig):
    """The job's verifier behind TRL's reward signature: it scores the final assistant message's text."""
    name = cfg.reward.functions[0].name
    fn = get_reward(name)
    if detect_style(name, fn) == "trl":
        return fn

    def reward(completions, ground_truth, data_source, **kwargs) -> list[float]:
        out = []
        for completion, truth, source in zip(completions, ground_truth, data_source, strict=True):
            text = (
                completion
                if isinstance(completion, str)
                else next((m["content"] for m in reversed(completion) if m["role"] == "assistant"), "")
            )
            raw = fn(source, text, truth, None)
            out.append(float(raw["score"] if isinstance(raw, dict) else (raw or 0.0)))
        return out

    reward.__name__ = name
    return reward


def run_trl(cfg: JobConfig, rows: list, out_dir: Path, threads: int) -> dict[str, Any]:
    import datasets
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(threads)
    transformers.set_seed(cfg.seed)
    model, tokenizer = load_policy(prepare_policy(cfg), cfg.model)
    if getattr(model, "is_quantized", False) and model.hf_quantizer is None:
        # GGUF: load_policy drops transformers' quantizer (the weights are dequantized), yet the model's
        # `is_quantized` flag stays set, and transformers' Trainer refuses to train a model so marked.
        model.is_quantized = False
    model.train()
    multi_turn = cfg.env.max_turns > 1
    tools = None
    if multi_turn:
        env = make_env(cfg.env)
        tools = [SchemaTool(spec, env) for spec in env.tool_specs()]
        tokenizer.response_template = HERMES_RESPONSE_TEMPLATE
    renderer, offered = Renderer(tokenizer), make_env(cfg.env).tool_specs()  # what tiderl's rollouts render
    for row in rows[:32]:  # TRL renders the prompt itself: it must be the tokens tiderl's rollouts start from
        ours = renderer.prompt_ids(row.messages, offered)
        theirs = tokenizer.apply_chat_template(
            row.messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        if ours != theirs:
            raise RuntimeError(f"prompt tokens differ between tiderl and TRL for row {row.index}")
    longest_prompt = max(len(renderer.prompt_ids(r.messages, offered)) for r in rows)
    group = cfg.trainer.prompts_per_step * cfg.rollout.samples_per_prompt
    micro = min(cfg.trainer.micro_batch_size, group)
    if group % micro:
        micro = math.gcd(group, micro)
    dataset = datasets.Dataset.from_list(
        [{"prompt": r.messages, "ground_truth": r.ground_truth, "data_source": r.data_source} for r in rows]
    )
    args = GRPOConfig(
        output_dir=str(out_dir / "trainer"),
        use_cpu=True,
        # the job's learner precision on both sides: `trainer.compute_dtype=bfloat16` is tiderl's learner under bf16
        # autocast, and TRL's (accelerate's) bf16 mixed precision is the same autocast around its forward passes
        bf16=cfg.trainer.compute_dtype == "bfloat16",
        fp16=False,
        gradient_checkpointing=False,
        seed=cfg.seed,
        data_seed=cfg.seed,
        shuffle_dataset=False,
        max_steps=cfg.trainer.steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=group // micro,
        num_generations=cfg.rollout.samples_per_prompt,
        num_iterations=1,
        max_completion_length=min(
            cfg.rollout.max_tokens_per_sample - longest_prompt, cfg.env.max_turns * cfg.rollout.max_new_tokens_per_turn
        ),
        generation_kwargs={"max_new_tokens": cfg.rollout.max_new_tokens_per_turn},
        max_tool_calling_iterations=cfg.env.max_turns - 1,
        temperature=cfg.rollout.temperature,
        top_p=1.0,
        top_k=0,
        learning_rate=cfg.trainer.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=cfg.trainer.weight_decay,
        max_grad_norm=cfg.trainer.grad_clip,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        beta=0.0,
        epsilon=cfg.algorithm.clip_ratio_low,
        epsilon_high=cfg.algorithm.clip_ratio_high,
        loss_type="dapo",
        scale_rewards="group" if cfg.algorithm.normalize_by_std else "none",
        router_aux_loss_coef=0.0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    clock, stages = _Clock(), _StageClock()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[trl_reward(cfg)],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        tools=tools,
        callbacks=[clock],
    )
    stages.wrap(trainer, "_generate", "_generate_and_score_completions")
    trainer.train()
    logs = [e for e in trainer.state.log_history if "reward" in e]
    policy = out_dir / "policy"
    tokenizer.response_template = None
    save_policy(trainer.model, tokenizer, policy)
    loop_s, samples = clock.end - clock.start, float(group * trainer.state.global_step)
    steps = trainer.state.global_step
    generate_s = stages.seconds["_generate"] / steps
    prepare_s = stages.seconds["_generate_and_score_completions"] / steps
    result = {
        "samples": samples,
        "loop_s": loop_s,
        "s_per_step": loop_s / steps,
        "samples_per_s": samples / loop_s,
        # where a step's time goes: generation (transformers' generate), the rest of preparing the batch (rewards,
        # advantages, and the old log-probs where TRL computes them), and the update (forward, backward, optimizer)
        "generate_s": generate_s,
        "score_s": prepare_s - generate_s,
        "update_s": loop_s / steps - prepare_s,
        "train_reward": [e["reward"] for e in logs],
        "tool_calls_per_sample": [e.get("tools/call_frequency") for e in logs],
        "policy_dir": str(policy),
        "max_completion_length": args.max_completion_length,
    }
    del trainer, model
    gc.collect()
    return result


class _StageClock:
    """Total seconds spent in some of a trainer's methods (TRL logs no stage times of its own)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, trainer: Any, *names: str) -> None:
        for name in names:
            self.seconds[name] = 0.0
            setattr(trainer, name, self._timed(name, getattr(trainer, name)))

    def _timed(self, name: str, method: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start

        return timed


class _Clock(TrainerCallback):
    """Records when TRL's training loop starts and ends."""

    start = end = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.end = time.perf_counter()
