"""Sharded learners (`trainer.sharding: fsdp`): parameters, gradients and optimizer state split over the learner group
with FSDP2 (`torch.distributed.fsdp.fully_shard`), gloo on CPU, NCCL on GPU.

Why `fully_shard` directly and not through accelerate's FSDP2 plugin: accelerate keeps its process group and
settings in a process-wide `AcceleratorState` built from a launcher's environment (`LOCAL_RANK`, `MASTER_ADDR`,
`ACCELERATE_USE_FSDP`), while our learners are Ray actors that form their group at run time beside a second group
(the weight broadcast); and what its `fsdp2_prepare_model` adds over a few `fully_shard` calls (moving the model to
meta, a wrap policy from `_no_split_modules`, the tail [final norm, lm_head] kept unsharded after forward) does not
fit this learner, which needs the output head as its own unit (it runs the head outside the model's forward, on the
scored tokens only: rl/trainer/forward.py), summed rather than averaged gradients, the QAT swap below, and the same
collectives on every rank when the ranks' shards differ. The units are accelerate's: one per decoder layer (the
model's `_no_split_modules`), the output head, the root.

What a step needs that data-parallel replicas did not:

- **The same collectives on every rank.** Every forward all-gathers each unit and every backward reduce-scatters
  it, so ranks must run the same sequence of forwards and backwards even when their token-balanced shards cut into
  different numbers of micro-batches (or a rank's shard is empty): `align` pads each rank's list to the group's
  longest with idle micro-batches (`idle_pass`: a 2-token forward whose loss is multiplied by 0). For the same reason
  the prompt-sharing forward (one or two model calls per micro-batch, depending on the data) is off.
- **Summed gradients.** Each rank's loss is its share of the whole batch's (rl/trainer/distributed.py), so the
  reduce-scatter sums (`set_gradient_divide_factor(1)`); the global gradient norm for clipping comes from
  `clip_grad_norm_` over the sharded gradients (DTensors: the norm is reduced over the group).
- **QAT on shards.** FSDP2 shards every parameter along dim 0: the output rows of a linear weight, the experts of a
  fused [experts, out, in] tensor. INT4 groups run along the last (input) dim, so every group lies whole in one
  shard and fake-quant of a shard is exactly those rows of fake-quant of the whole weight. `step` puts
  fake_quantize(master shard) into the shards the forward all-gathers, keeps the master shard aside, and after the
  backward puts the master back: its gradient is the gradient at the fake-quant weights, the straight-through
  estimator the replicated learner applies (rl/trainer/learner.py `_step_fake_quant`).
- **Whole weights out.** The weight push, the digest and the checkpoint's `policy/` need the full weights: after each
  update (and at start and after a load) every rank joins one gather that leaves them, on the CPU, on rank 0 only
  (`full_state`); rank 0 publishes them. Rank 0 thus holds one full copy of the weights in host memory between an
  update and its push, which the push needs anyway; at a scale where that does not fit, the gather would stream
  tensor by tensor into the INT4 payload instead.
- **Optimizer state in checkpoints** is saved sharded with torch.distributed.checkpoint (`save_optimizer`): each rank
  writes its own file, rank 0 the metadata, and the driver puts them in one directory; a load reads them back on
  every rank (a checkpoint also resumes on a different number of learners).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from rollouts.quant import QuantSpec, fake_quantize

SHARDS_DIR = "learner_shards"
"""The checkpoint directory of the sharded optimizer state (torch.distributed.checkpoint files)."""

MicroBatches = list[tuple[torch.Tensor | None, bool]]
"""(row indices, needs a backward); None rows: an idle micro-batch that only keeps the collectives in step."""


class ShardedPolicy:
    """The FSDP2 state of one learner's policy: sharding, the QAT swap, the gathers and the sharded checkpoint."""

    def __init__(self, model: torch.nn.Module, device: torch.device, quant: QuantSpec | None, targets: list[str]):
        self.model, self.quant = model, quant
        self.rank, self.world, self.device = dist.get_rank(), dist.get_world_size(), device
        mesh = init_device_mesh(device.type, (self.world,))
        layer_classes = set(getattr(model, "_no_split_modules", None) or ())
        layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
        if not layers:
            raise ValueError(
                f"trainer.sharding=fsdp: {type(model).__name__} names no decoder layer class (`_no_split_modules`) "
                "to shard by; use trainer.sharding=replicate"
            )
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        # the head runs outside the model's forward (forward.py): its own unit, unless tied to the input embedding
        # (a parameter must belong to one unit), in which case the learner computes logits inside the forward
        self.head_apart = head is not None and not (embed is not None and head.weight is embed.weight)
        if self.head_apart:
            fully_shard(head, mesh=mesh)
        fully_shard(model, mesh=mesh, reshard_after_forward=True)  # no unsharded copy outlives a forward
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)  # sum: each rank's loss is already its share of the batch's
                module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no AVG or PREMUL_SUM)
        params = dict(model.named_parameters())
        self.targets = {name: params[name] for name in targets}
        self._masters: dict[str, torch.Tensor] | None = None  # the master shards while the fake-quant ones are in
        self.grad_bytes = 0  # this rank's gradient shards at the end of the last backward
        self.full_state: dict[str, torch.Tensor] = {}  # rank 0: the whole weights after the last update (CPU)

    # ------------------------------------------------------------------------------------------------ the step

    @contextlib.contextmanager
    def step(self, fake_quant: bool) -> Iterator[None]:
        """An update's forwards and backwards: with `fake_quant`, through the fake-quant of the targeted weights."""
        if fake_quant:
            self._swap_in()
        try:
            yield
            self.grad_bytes = sum(_local_bytes(p.grad) for p in self.model.parameters() if p.grad is not None)
        finally:
            if fake_quant:
                self._swap_out()

    def forward(self, model: torch.nn.Module, fake_quant: bool) -> Callable[..., Any]:
        """The model call in the requested mode: the model itself when the shards hold that mode's weights, else a
        call that swaps them for its duration, without autograd (a backward must see the weights its forward saw;
        the update's own forwards run inside `step`, whose mode they share)."""
        if not self.targets or fake_quant == (self._masters is not None):
            return model

        def switched(**kwargs: Any) -> Any:
            swap_in = self._masters is None
            (self._swap_in if swap_in else self._swap_out)()
            try:
                with torch.no_grad():
                    return model(**kwargs)
            finally:
                (self._swap_out if swap_in else self._swap_in)()

        return switched

    def _swap_in(self) -> None:
        """The fake-quant of each targeted master shard into the shard (whole INT4 groups: module docstring)."""
        assert self.quant is not None and self._masters is None
        self._masters = {}
        with torch.no_grad():
            for name, param in self.targets.items():
                local = param.to_local()
                self._masters[name] = local.clone()
                if local.numel():  # a rank may hold no rows of a small tensor
                    local.copy_(fake_quantize(local, self.quant))

    def _swap_out(self) -> None:
        assert self._masters is not None
        with torch.no_grad():
            for name, param in self.targets.items():
                param.to_local().copy_(self._masters[name])
        self._masters = None

    def align(self, micro_batches: MicroBatches) -> MicroBatches:
        """This rank's micro-batches (those with a backward first, as the learner plans them) padded with idle ones to
        the group's most of each kind, so that every rank runs the same forwards and backwards."""
        grad = [mb for mb in micro_batches if mb[1]]
        rest = [mb for mb in micro_batches if not mb[1]]
        most = torch.tensor([len(grad), len(rest)], dtype=torch.int64, device=self.device)  # NCCL: on the GPU
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        return [
            *grad,
            *[(None, True)] * (int(most[0]) - len(grad)),
            *rest,
            *[(None, False)] * (int(most[1]) - len(rest)),
        ]

    def idle_pass(self, score: Callable[..., tuple[torch.Tensor, torch.Tensor]], needs_grad: bool, other: bool) -> None:
        """An idle micro-batch: the forward (and backward) of a 2-token sequence that adds nothing, and with
        `other` the attribution's second forward, through `score` (the learner's `sequence_logprobs` in this step's
        mode: (ids, mask, where, other) -> logprobs, entropy)."""
        ids = torch.zeros(1, 2, dtype=torch.long, device=self.device)
        attn, where = torch.ones_like(ids), torch.tensor([[False, True]], device=self.device)
        with torch.set_grad_enabled(needs_grad):
            logp, _ = score(ids, attn, where, False)
            if needs_grad:
                (logp.sum() * 0.0).backward()
        if other:
            with torch.no_grad():
                score(ids, attn, where, True)

    # ------------------------------------------------------------------------------------------ whole weights

    def gather(self) -> None:
        """Every rank: the whole weights, on the CPU, into rank 0's `full_state` (one all-gather per tensor)."""
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        self.full_state = {k: v.detach() for k, v in state.items()} if self.rank == 0 else {}

    def load_full(self, state: dict[str, torch.Tensor]) -> None:
        """Every rank, each given the whole weights: keep this rank's shards of them."""
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))

    def forward_int4_weights(self) -> dict[str, torch.Tensor]:
        """Every rank: the targeted weights as the update's forward all-gathers them under QAT (the fake-quant of
        the master shards, gathered whole); rank 0 gets them, on the CPU."""
        self._swap_in()
        try:
            with torch.no_grad():
                full = {name: p.full_tensor().cpu() for name, p in self.targets.items()}
        finally:
            self._swap_out()
        return full if self.rank == 0 else {}

    # ----------------------------------------------------------------------------------------------- memory

    def held_bytes(self, optimizer: Any) -> dict[str, int]:
        """Bytes this rank holds of the parameters, of the gradients (at the end of the last backward) and of the
        optimizer state: the local shards only."""
        params = sum(_local_bytes(p) for p in self.model.parameters())
        return {"params": params, "grads": self.grad_bytes, "optimizer": _optimizer_bytes(optimizer)}

    # ----------------------------------------------------------------------------------------------- checkpoints

    def save_optimizer(self, out: Path, optimizer: Any) -> None:
        """Every rank: its shards of the optimizer state into `out` (its own file; rank 0 also the metadata)."""
        dcp.save({"optimizer": self._optimizer_state(optimizer)}, checkpoint_id=str(out))

    def load_optimizer(self, path: Path, optimizer: Any) -> None:
        """Every rank: its shards of the optimizer state from what `save_optimizer` wrote (all ranks' files)."""
        state = {"optimizer": self._optimizer_state(optimizer)}
        dcp.load(state, checkpoint_id=str(path))
        set_optimizer_state_dict(self.model, _torch_optimizers(optimizer), state["optimizer"])

    def _optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, _torch_optimizers(optimizer))


class ShardedMember:
    """What `Learner` does the same whether or not it is sharded: forming the shards, the whole weights, what a rank
    holds. A mixin of `Learner` (it reads the learner's `cfg`, `model`, `optimizer`, `device`, `quant`,
    `quant_targets`, `rank` and the forward's two savings), kept here so the learner's file holds the update."""

    sharded: ShardedPolicy | None = None
    cfg: Any
    model: torch.nn.Module
    optimizer: Any
    device: torch.device
    quant: QuantSpec | None
    quant_targets: list[str]
    rank: int
    _share_prompt: bool
    _head_on_hidden: bool

    def start_sharding(self) -> None:
        """With `trainer.sharding: fsdp`, once the learners' group is formed: shard the policy, build the optimizer
        over the shards, and turn off the prompt-sharing forward (its number of model calls depends on the data,
        and every rank must make the same calls); the head runs on scored tokens only where it is its own unit."""
        from rl.trainer.optim import build_optimizer

        if self.cfg.trainer.sharding != "fsdp":
            return
        self.sharded = ShardedPolicy(self.model, self.device, self.quant, self.quant_targets)
        self.optimizer = build_optimizer(self.model, self.cfg.trainer)
        self._share_prompt, self._head_on_hidden = False, self._head_on_hidden and self.sharded.head_apart
        self.sharded.gather()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole weights on the CPU (sharded: rank 0's gather after the last update; other ranks hold none)."""
        if self.sharded is not None:
            return self.sharded.full_state
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def forward_int4_weights(self) -> dict[str, torch.Tensor]:
        """The quantization targets as a QAT forward uses them, whole, on the CPU (sharded: every rank calls it and
        rank 0 gets them): what must equal the INT4 weights the push carries, dequantized."""
        if self.sharded is not None:
            return self.sharded.forward_int4_weights()
        assert self.quant is not None
        params = dict(self.model.named_parameters())
        return {name: fake_quantize(params[name], self.quant).detach().cpu() for name in self.quant_targets}

    def held_bytes(self) -> dict[str, int]:
        """Bytes this learner holds of the parameters, the gradients and the optimizer state. Sharded: its shards
        (gradients as the last backward left them); replicated: the whole of each, gradients being as large as the
        trainable parameters after the all-reduce."""
        if self.sharded is not None:
            return self.sharded.held_bytes(self.optimizer)
        trainable = sum(_local_bytes(p) for p in self.model.parameters() if p.requires_grad)
        return {
            "params": sum(_local_bytes(p) for p in self.model.parameters()),
            "grads": trainable,
            "optimizer": _optimizer_bytes(self.optimizer),
        }


def _optimizer_bytes(optimizer: Any) -> int:
    return sum(
        _local_bytes(v)
        for o in optimizer.optimizers.values()
        for state in o.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )


def _torch_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside the learner's CombinedOptimizer (rl/trainer/optim.py)."""
    return list(optimizer.optimizers.values())


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def plain_norm(norm: torch.Tensor) -> float:
    """`clip_grad_norm_`'s total norm as a number (over DTensor gradients it is a replicated DTensor)."""
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
