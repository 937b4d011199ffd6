"""RolloutWorker: a Ray actor that owns a copy of the policy, an engine and the agent loop.

It receives weights with their version (`load_weights`) and generates `samples_per_prompt` trajectories per
prompt row, each stamped with the versions that generated it. With `quant.enabled`, the quantization targets run
as INT4 (`rollouts.int4`) from the start, and weight syncs carry them packed. With `trainer.lora`, a sync carries
the adapters alone and the worker installs each adapted weight as its frozen base + the adapter (`rollouts.lora`).

With partial rollouts (`rollout.partial_rollout_budget`), the worker keeps the groups it could not finish within
an iteration's budget (paused episodes with their environments, and their groups' finished samples) and resumes
them first in the next `generate` call; it returns only whole groups, so group advantages see every sample.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import torch
import transformers
from ray import cloudpickle

from envs.agent import is_agent_function
from envs.base import PromptRow
from envs.config import EnvConfig
from envs.registry import env_class, make_env
from rollouts.agent_loop import AgentLoop, Episode, GenerationProgress
from rollouts.agents import AgentRunner
from rollouts.collective import BroadcastMember, Manifest, buffer_size, unflatten
from rollouts.config import LoraConfig, ModelConfig, QuantConfig, RolloutConfig
from rollouts.delta import WeightDelta, apply_delta, owned_copy, payload_digest
from rollouts.endpoint import Endpoint
from rollouts.engine import Engine
from rollouts.int4 import convert_to_int4, load_packed
from rollouts.lora import AdapterInstaller, adapted_parameters
from rollouts.model import load_policy
from rollouts.quant import PackedInt4, QuantSpec, WeightPayload, targeted_parameters
from rollouts.records import Trajectory
from rollouts.renderer import Renderer
from rollouts.sampling import SamplingParams
from rollouts.shipping import ShippedDir, open_dir, shipped_cache

log = logging.getLogger("tiderl")


@dataclass(frozen=True)
class WorkerSpec:
    """What a rollout worker needs of the job: its own sections (`rl.config.JobConfig.worker_spec()` builds it)."""

    model: ModelConfig
    rollout: RolloutConfig
    env: EnvConfig
    quant: QuantConfig
    seed: int
    """The job's seed: worker i samples from its own stream, seeded `seed * 1009 + i`."""
    cache_dir: str | None = None
    """Where a policy shipped through Ray is unpacked on a node that lacks the driver's disk (None: the default)."""
    lora: LoraConfig | None = None
    """`trainer.lora`: the weights it adapts arrive as adapters, added to this worker's frozen base."""
    record_routing: bool = False
    """`algorithm.routing_replay` is on: the engine records each position's routed experts (`rollouts.routing`)."""


class RolloutWorker(BroadcastMember):
    def __init__(self, policy_dir: str | ShippedDir, cfg: WorkerSpec, worker_index: int) -> None:
        torch.set_num_threads(cfg.rollout.threads_per_worker)
        transformers.utils.logging.disable_progress_bar()  # one bar per actor per load would drown the job's own
        self.cfg = cfg
        self.model, self.tokenizer = load_policy(open_dir(policy_dir, shipped_cache(cfg.cache_dir)), cfg.model)
        if cfg.rollout.gpus_per_worker > 0 and torch.cuda.is_available():  # a worker given GPUs generates there
            self.model.to("cuda")
        self.int4_targets: set[str] = set()
        spec = QuantSpec.from_config(cfg.quant) if cfg.quant.enabled else None
        # LoRA: the adapted weights run dense, as frozen base (INT4 values where quantized) + the pushed adapter
        adapted = adapted_parameters(self.model, cfg.lora) if cfg.lora is not None else []
        self.adapters = AdapterInstaller(self.model, adapted, spec) if cfg.lora is not None else None
        if spec is not None:
            targets = [n for n in targeted_parameters(self.model, spec) if n not in set(adapted)]
            if targets:
                convert_to_int4(self.model, spec, targets, *int4_kernel_settings(cfg.quant, cfg.model.dtype))
            self.int4_targets = set(targets)
        self.renderer = Renderer(self.tokenizer)
        r = cfg.rollout
        self.engine = Engine(
            self.model,
            self.renderer.pad_token_id,
            self.renderer.eos_token_id,
            r.repeat_window,
            r.repeat_max_period,
            r.max_num_seqs,
            r.prefix_reuse,
            record_routing=cfg.record_routing,
            matmul_dtype=None if r.matmul_dtype == "auto" else getattr(torch, r.matmul_dtype),
        )
        self.agents: AgentRunner | None = None
        agent = env_class(cfg.env.name)
        if is_agent_function(agent):  # the user's agent, run against this worker's OpenAI-compatible endpoint
            endpoint = Endpoint(self.engine, self.renderer, r, served_model_name(cfg.model), cfg.env.max_turns)
            endpoint.start()
            self.agents = AgentRunner(endpoint, agent, cfg.env.name)
        else:
            make_env(cfg.env)  # fail now, naming the environment, rather than on the first rollout
        self.loop = AgentLoop(self.engine, self.renderer, lambda: make_env(cfg.env), cfg.rollout, cfg.env)
        self.generator = torch.Generator().manual_seed(cfg.seed * 1009 + worker_index)
        self.index = worker_index
        self.version = 0
        self.sync_id: str | None = None  # the weight push this worker holds (None: the policy it started from)
        self.int4_held: dict[str, PackedInt4] = {}
        self.loads = {"full": 0, "delta": 0}
        self.open_groups: dict[int, list[Episode]] = {}
        self.reward_models: dict[str, ray.actor.ActorHandle] = {}
        self.reward_model_item: Callable[[Episode], Any] | None = None
        self.model_refs: dict[int, dict[str, ray.ObjectRef]] = {}

    def set_progress_sink(self, sink: Callable[[int, GenerationProgress], None] | None) -> None:
        """Report each generation call's progress to `sink(worker_index, progress)` while it runs (the controller's
        terminal display; passed in, as reward models are)."""
        index = self.index
        self.loop.on_progress = None if sink is None else lambda progress: sink(index, progress)

    def set_reward_models(self, handles: dict, make_item: Callable[[Episode], Any]) -> None:
        """Reward model actors to send each finished group to (`reward.models_async`), and the function that turns
        an episode into what they score (the reward layer's, passed in: rollouts never import rewards)."""
        self.reward_models = dict(handles)
        self.reward_model_item = make_item

    def load_weights(self, weights: WeightPayload | WeightDelta, version: int, sync_id: str | None = None) -> int:
        """Install a weight-sync push as policy `version`: a full payload (dense tensors and packed INT4 ones; with
        LoRA, the adapters alone), or a delta against the push this worker holds (`rollouts.delta`), written into
        its weights in place. `sync_id` names the push (what a later delta is taken against)."""
        if isinstance(weights, WeightDelta):
            self._apply_delta(weights)
        elif self.adapters is not None:
            self.adapters.install(self.model, weights)
        else:
            self._install_full(weights)
        self.version, self.sync_id = version, sync_id
        return version

    def _install_full(self, weights: WeightPayload) -> None:
        packed = {k for k, v in weights.items() if isinstance(v, PackedInt4)}
        if packed != self.int4_targets:
            raise ValueError(
                f"weight sync: INT4 tensors {sorted(packed ^ self.int4_targets)} differ between learner and rollout "
                f"worker"
            )
        dense = {k: v for k, v in weights.items() if k not in packed}
        missing, unexpected = self.model.load_state_dict(dense, strict=False)
        if missing or unexpected:
            raise ValueError(f"weight sync: missing {missing}, unexpected {unexpected}")
        # the worker's own copies: a later delta writes into them (an object-store payload may be read-only)
        self.int4_held = {k: owned_copy(weights[k]) for k in packed}  # type: ignore[arg-type]
        load_packed(self.model, self.int4_held)
        self.loads["full"] += 1

    def _apply_delta(self, delta: WeightDelta) -> None:
        if delta.base_id != self.sync_id or self.adapters is not None:
            raise ValueError(
                f"weight sync: a delta against push {delta.base_id} reached rollout worker {self.index}, which holds "
                f"{'LoRA adapters' if self.adapters is not None else self.sync_id}; the sender must push the full "
                f"weights"
            )
        apply_delta(delta, self.int4_held, self.model.state_dict())
        load_packed(self.model, {name: self.int4_held[name] for name in delta.int4})  # rebuild their kernel layouts
        self.loads["delta"] += 1

    def weight_sync_state(self) -> dict[str, Any]:
        """The push this worker holds and how many full and delta pushes it has loaded."""
        return {"version": self.version, "sync_id": self.sync_id, **self.loads}

    def weights_digest(self) -> str:
        """`rollouts.delta.payload_digest` of the weights this worker runs (its full-precision state and the packed
        INT4 tensors of the last push): equal to the digest of the full payload it was pushed."""
        return payload_digest({**self.model.state_dict(), **self.int4_held})

    def receive_weights(self, manifest: Manifest, version: int, sync_id: str | None = None) -> int:
        """Collective weight sync: receive learner rank 0's broadcast buffer and install it as `version`."""
        if self.broadcast_group is None:
            raise RuntimeError("receive_weights before join_broadcast")
        buffer = torch.empty(buffer_size(manifest), dtype=torch.uint8, device=self.broadcast_group.device)
        return self.load_weights(unflatten(manifest, self.broadcast_group.broadcast(buffer)), version, sync_id)

    def generate(
        self, rows: list[PromptRow], samples_per_prompt: int, greedy: bool = False, seed: int | None = None
    ) -> list[Trajectory]:
        """Every sample to its end. With `seed`, from a fresh generator (evals: repeatable, the training stream
        untouched)."""
        generator = self.generator if seed is None else torch.Generator().manual_seed(seed)
        if self.agents is not None:
            return self._run_agents(rows, [row.index for row in rows], samples_per_prompt, greedy, generator, None)
        return self.loop.run(rows, samples_per_prompt, self.version, greedy, generator)

    def generate_step(
        self,
        rows: list[PromptRow],
        group_ids: list[int],
        samples_per_prompt: int,
        iteration_budget: int,
        temperature: float | None = None,
    ) -> list[Trajectory]:
        """One RL step's rollouts: resume the groups left open by the last step, start `rows`, and return the
        trajectories of every group whose samples are all done. `iteration_budget` 0 = no pausing; `temperature`
        overrides the configured one (the schedule)."""
        if self.agents is not None:  # agents run each sample to its end (preflight refuses partial rollouts)
            return self._run_agents(rows, group_ids, samples_per_prompt, False, self.generator, temperature)
        for gid, episodes in zip(
            group_ids,
            _chunks(self.loop.new_episodes(rows, samples_per_prompt, group_ids), samples_per_prompt),
            strict=True,
        ):
            if gid in self.open_groups:
                raise ValueError(f"group id {gid} is already in flight on this worker")
            self.open_groups[gid] = episodes
        episodes = [ep for group in self.open_groups.values() for ep in group]
        on_done = self._score_group_if_done if self.reward_models else None
        self.loop.run_episodes(
            episodes,
            self.version,
            greedy=False,
            generator=self.generator,
            iteration_budget=iteration_budget,
            on_done=on_done,
            temperature=temperature,
        )
        done = [gid for gid, group in self.open_groups.items() if all(ep.done for ep in group)]
        trajectories = []
        for gid in done:
            refs = self.model_refs.pop(gid, {})
            for position, ep in enumerate(self.open_groups.pop(gid)):
                traj = self.loop.trajectory(ep)
                traj.model_score_refs = {name: (ref, position) for name, ref in refs.items()}
                trajectories.append(traj)
        return trajectories

    def _score_group_if_done(self, ep: Episode) -> None:
        """Once every sample of `ep`'s group is done, send the group to each reward model (not awaited)."""
        group = self.open_groups.get(ep.sample.group_id, [])
        if not group or not all(member.done for member in group) or ep.sample.group_id in self.model_refs:
            return
        assert self.reward_model_item is not None  # set with the handles
        items = [self.reward_model_item(m) for m in group]
        self.model_refs[ep.sample.group_id] = {
            name: actor.score.remote(items) for name, actor in self.reward_models.items()
        }

    def export_paused(self) -> list[tuple[int, PromptRow, bytes | None]]:
        """The groups left open (partial rollouts), for a checkpoint: (group id, prompt row, the pickled episodes
        with their environments, or None when an environment does not pickle: the group then starts again)."""
        out = []
        for gid, episodes in self.open_groups.items():
            try:
                blob: bytes | None = cloudpickle.dumps(episodes)
            except Exception as e:  # an environment holding a process, socket or lock
                log.warning(
                    "paused group %d does not pickle (%s: %s); a resume starts it again", gid, type(e).__name__, e
                )
                blob = None
            out.append((gid, episodes[0].sample.row, blob))
        return out

    def adopt_groups(
        self, rows: list[PromptRow], group_ids: list[int], samples_per_prompt: int, blobs: list[bytes | None]
    ) -> int:
        """Take over open groups (a resumed checkpoint, or a dead worker's): their pickled episodes, or fresh
        episodes for the prompt when there are none; the next `generate_step` continues them."""
        blobs = blobs or [None] * len(rows)
        for row, gid, blob in zip(rows, group_ids, blobs, strict=True):
            if gid in self.open_groups:
                raise ValueError(f"group id {gid} is already in flight on this worker")
            self.open_groups[gid] = (
                cloudpickle.loads(blob)
                if blob is not None
                else self.loop.new_episodes([row], samples_per_prompt, [gid])
            )
        return len(self.open_groups)

    def drop_open_groups(self) -> int:
        """Close and forget the open groups (their environments too); returns how many there were."""
        n = len(self.open_groups)
        self.loop.close_envs([ep for episodes in self.open_groups.values() for ep in episodes])
        self.open_groups.clear()
        self.model_refs.clear()
        return n

    def num_paused(self) -> int:
        """Samples paused mid-rollout, waiting for the next step."""
        return sum(not ep.done for group in self.open_groups.values() for ep in group)

    def get_rng_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def pad_token_id(self) -> int:
        return self.renderer.pad_token_id

    def endpoint_url(self) -> str | None:
        """Base URL of this worker's OpenAI-compatible endpoint (None: its environment is not an agent function)."""
        return self.agents.endpoint.base_url if self.agents is not None else None

    def _run_agents(
        self,
        rows: list[PromptRow],
        group_ids: list[int],
        samples_per_prompt: int,
        greedy: bool,
        generator: torch.Generator,
        temperature: float | None,
    ) -> list[Trajectory]:
        """Every sample as the agent function's episode against this worker's endpoint (`rollouts.agents`)."""
        assert self.agents is not None
        r = self.cfg.rollout
        sampling = SamplingParams(temperature or r.temperature, greedy, r.top_p, r.top_k)
        base_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        trajectories = self.agents.run(rows, samples_per_prompt, group_ids, self.version, sampling, base_seed)
        if self.loop.on_progress is not None:
            tokens = sum(t.response_length for t in trajectories)
            self.loop.on_progress(GenerationProgress(done=len(trajectories), tokens=tokens))
        return trajectories


RolloutWorkerActor = ray.remote(RolloutWorker)


def int4_kernel_settings(quant: QuantConfig, model_dtype: str) -> tuple[torch.dtype, int | None]:
    """The INT4 kernels' activation dtype and `dense_min_rows`, with the config's defaults resolved.

    auto activations = the policy's dtype (fp32 stays fp32; bf16 and fp16 run bf16, the half type torch's INT4
    kernels take). Unset `dense_min_rows` = 8 with fp32 activations, where torch's CPU kernel loses from ~8 rows
    on, and never with bf16 (see benchmarks/int4_decode.py).
    """
    choice = quant.rollout_activation_dtype
    if choice == "auto":
        activation = torch.float32 if model_dtype == "float32" else torch.bfloat16
    else:
        activation = getattr(torch, choice)
    dense_min_rows = quant.dense_min_rows or (8 if activation == torch.float32 else None)
    return activation, dense_min_rows


def served_model_name(model: ModelConfig) -> str:
    """The name `/v1/models` lists: the policy directory's name, or `tiderl-tiny` for the built-in policy."""
    return model.path.rstrip("/").rsplit("/", 1)[-1] if model.path else "tiderl-tiny"


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]
