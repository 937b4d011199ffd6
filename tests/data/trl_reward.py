"""Reward functions as a TRL user writes them for GRPOTrainer (conversational completions, dataset columns as
keyword arguments, one float or None per completion), used unchanged by tiderl."""

import asyncio
import re


def accuracy_reward(completions, ground_truth, **kwargs):
    contents = [completion[-1]["content"] for completion in completions]
    rewards = []
    for content, truth in zip(contents, ground_truth):
        numbers = re.findall(r"-?\d+", content.split("</think>")[-1])
        rewards.append(1.0 if numbers and numbers[-1] == str(truth) else 0.0)
    return rewards


async def tool_use_reward(prompts, completions, data_source, **kwargs):
    """Async, and None for rows of other tasks (multi-task datasets): 0.5 for calling a tool at all."""
    await asyncio.sleep(0)
    return [
        None if source != "tiderl/calculator" else 0.5 * any(m["role"] == "tool" for m in completion)
        for source, completion in zip(data_source, completions)
    ]
