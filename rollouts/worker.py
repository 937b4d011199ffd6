"""RolloutWorker: a Ray actor that owns a copy of the policy, an engine and the agent loop.

It receives weights with their version (`load_weights`) and generates `samples_per_prompt` trajectories per
prompt row, each stamped with the version that generated it. With `quant.enabled`, the quantization targets run
as INT4 (`rollouts.int4`) from the start, and weight syncs carry them packed.
"""

from __future__ import annotations

import ray
import torch
import transformers

from envs.registry import make_env
from rl.config import JobConfig
from rl.policy import load_policy
from rl.quant import PackedInt4, QuantSpec, WeightPayload, targeted_parameters
from rl.records import PromptRow, Trajectory
from rollouts.agent_loop import AgentLoop
from rollouts.engine import Engine
from rollouts.int4 import convert_to_int4, load_packed
from rollouts.renderer import Renderer


class RolloutWorker:
    def __init__(self, policy_dir: str, cfg: JobConfig, worker_index: int) -> None:
        torch.set_num_threads(cfg.rollout.threads_per_worker)
        transformers.utils.logging.disable_progress_bar()  # one bar per actor per load would drown the job's own
        self.cfg = cfg
        self.model, self.tokenizer = load_policy(policy_dir, cfg.model)
        self.int4_targets: set[str] = set()
        if cfg.quant.enabled:
            spec = QuantSpec.from_config(cfg.quant)
            targets = targeted_parameters(self.model, spec)
            convert_to_int4(self.model, spec, targets, *int4_kernel_settings(cfg))
            self.int4_targets = set(targets)
        self.renderer = Renderer(self.tokenizer)
        self.engine = Engine(self.model, self.renderer.pad_token_id, self.renderer.eos_token_id)
        make_env(cfg.env.name)  # fail now, naming the environment, rather than on the first rollout
        self.loop = AgentLoop(self.engine, self.renderer, lambda: make_env(cfg.env.name), cfg.rollout, cfg.env)
        self.generator = torch.Generator().manual_seed(cfg.seed * 1009 + worker_index)
        self.version = 0

    def load_weights(self, weights: WeightPayload, version: int) -> int:
        """Install a weight-sync payload (dense tensors and packed INT4 ones) as policy `version`."""
        packed = {k for k, v in weights.items() if isinstance(v, PackedInt4)}
        if packed != self.int4_targets:
            raise ValueError(f"weight sync: INT4 tensors {sorted(packed ^ self.int4_targets)} differ between learner and rollout worker")
        dense = {k: v for k, v in weights.items() if k not in packed}
        missing, unexpected = self.model.load_state_dict(dense, strict=False)
        if missing or unexpected:
            raise ValueError(f"weight sync: missing {missing}, unexpected {unexpected}")
        load_packed(self.model, weights)
        self.version = version
        return version

    def generate(self, rows: list[PromptRow], samples_per_prompt: int, greedy: bool = False, seed: int | None = None) -> list[Trajectory]:
        """With `seed`, sample from a fresh generator (evals: repeatable, and the training stream is untouched)."""
        generator = self.generator if seed is None else torch.Generator().manual_seed(seed)
        return self.loop.run(rows, samples_per_prompt, self.version, greedy, generator)

    def get_rng_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def pad_token_id(self) -> int:
        return self.renderer.pad_token_id


RolloutWorkerActor = ray.remote(RolloutWorker)


def int4_kernel_settings(cfg: JobConfig) -> tuple[torch.dtype, int | None]:
    """The INT4 kernels' activation dtype and `dense_min_rows`, with the config's defaults resolved.

    auto activations = the policy's dtype (fp32 stays fp32; bf16 and fp16 run bf16, the half type torch's INT4
    kernels take). Unset `dense_min_rows` = 8 with fp32 activations, where torch's CPU kernel loses from ~8 rows
    on, and never with bf16 (see benchmarks/int4_decode.py).
    """
    choice = cfg.quant.rollout_activation_dtype
    if choice == "auto":
        activation = torch.float32 if cfg.model.dtype == "float32" else torch.bfloat16
    else:
        activation = getattr(torch, choice)
    dense_min_rows = cfg.quant.dense_min_rows or (8 if activation == torch.float32 else None)
    return activation, dense_min_rows


def generate_on_workers(workers: list, rows: list[PromptRow], samples_per_prompt: int, greedy: bool = False, seed: int | None = None) -> list[Trajectory]:
    """Spread prompt rows over the workers (all samples of a prompt stay on one worker) and gather the results."""
    chunks = [rows[i :: len(workers)] for i in range(len(workers))]
    futures = [
        w.generate.remote(chunk, samples_per_prompt, greedy, None if seed is None else seed + i)
        for i, (w, chunk) in enumerate(zip(workers, chunks, strict=True))
        if chunk
    ]
    return [traj for result in ray.get(futures) for traj in result]
