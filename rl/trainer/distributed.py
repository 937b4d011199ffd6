"""Data-parallel learners: the torch.distributed process group inside the learner actors, and the two
collectives a step needs (summing gradients, summing the records of counts and metric sums).

Each learner trains on its shard of the batch with the *whole* batch's normalizers (token and sequence
counts), so the shards' losses add up to the single-learner loss and the sum of their gradients is exactly
its gradient; the optimizer then takes the same step on every rank and the parameters stay identical.
torch's DistributedDataParallel would average gradients during backward, which is the same sum only when every
rank normalizes by its own shard and shards are equal; our shards are balanced by tokens, not equal, and
micro-batches accumulate several backwards, so we reduce once per step ourselves.
"""

from __future__ import annotations

import dataclasses
import socket
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

Record = TypeVar("Record")  # a dataclass whose fields are all floats (rl.trainer.update_sums)


def free_address() -> tuple[str, int]:
    """This node's IP and a free TCP port: the rendezvous of the process group, run on rank 0's node."""
    import ray

    ip = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        return ip, int(s.getsockname()[1])


def init_process_group(
    rank: int, world_size: int, address: str, port: int, backend: str, timeout_s: float = 300.0
) -> None:
    """Join the learners' process group (gloo on CPU, nccl on GPU)."""
    dist.init_process_group(
        backend,
        init_method=f"tcp://{address}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Sum every parameter's gradient over the ranks, in one flat buffer (one collective per step).

    A parameter no rank touched (an MoE expert no token was routed to) keeps `grad = None`, as on a single
    learner, so the optimizer skips it there too (AdamW would otherwise decay its moments on a zero gradient).
    """
    if not is_distributed():
        return
    trainable = [p for p in parameters if p.requires_grad]
    touched = torch.tensor([p.grad is not None for p in trainable], dtype=torch.float32, device=trainable[0].device)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainable]
    flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads] + [touched])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(trainable, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n
    for p, hit in zip(trainable, flat[offset:].tolist(), strict=True):
        if hit == 0:
            p.grad = None


def all_reduce_sums(values: dict[str, float]) -> dict[str, float]:
    """Sum a dict of floats over the ranks (every rank must pass the same keys)."""
    if not is_distributed():
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def all_reduce_record(record: Record) -> Record:
    """Sum every field of a dataclass of floats over the ranks: `all_reduce_sums` of its fields by name (float64,
    in one collective); a new record of the same type, or `record` itself with a single learner."""
    if not is_distributed():
        return record
    return type(record)(**all_reduce_sums(dataclasses.asdict(record)))


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
