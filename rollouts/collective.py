"""Weight sync by collective broadcast (`cluster.weight_sync: collective`): learner rank 0 broadcasts one flat
buffer of the weight-sync payload to every rollout worker, NCCL between GPUs, gloo between CPUs.

The object-store path (the default) copies the payload into Ray's object store and every worker pulls it,
which is what one node or CPU workers want; between GPU nodes a NCCL broadcast moves the weights GPU to GPU
without the host round trip. The broadcast group is separate from the learners' data-parallel group: torch's
`new_group` needs a default group spanning every member, which rollout workers are not part of, so the group is
built from its own TCPStore (as verl and OpenRLHF do for the same reason). Its members are learner rank 0
(rank 0 here) and the workers (1..n); when a member is replaced (a restarted worker or learner) every member
leaves and the group is formed again.

The payload (dense tensors and packed INT4 ones) travels as one uint8 buffer plus a small manifest (names,
dtypes, shapes) sent through Ray, so one push is one collective whatever the number of tensors.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from rollouts.quant import PackedInt4, WeightPayload

Manifest = list[tuple[str, str, Any]]
"""(name, "dense" | "int4", spec): dense spec = (dtype, shape); int4 spec = ((dtype, shape) of packed, of scale,
the dense shape, the dense dtype, the group size)."""


class BroadcastGroup:
    """One member's handle on the weight-broadcast group."""

    def __init__(
        self, rank: int, world_size: int, address: str, port: int, backend: str, timeout_s: float = 600.0
    ) -> None:
        timeout = timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout)
        if backend == "nccl":
            self.group: Any = dist.ProcessGroupNCCL(self.store, rank, world_size, dist.ProcessGroupNCCL.Options())
        else:
            self.group = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)
        self.rank, self.device = rank, torch.device("cuda" if backend == "nccl" else "cpu")

    def broadcast(self, buffer: torch.Tensor) -> torch.Tensor:
        """Rank 0's `buffer` into everyone's (the receivers pass an empty buffer of the right size)."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.group.broadcast([buffer], opts).wait()
        return buffer


class BroadcastMember:
    """What the learner and rollout worker actors share: joining and leaving the broadcast group."""

    broadcast_group: BroadcastGroup | None = None

    def join_broadcast(self, rank: int, world_size: int, address: str, port: int, backend: str) -> int:
        self.leave_broadcast()
        self.broadcast_group = BroadcastGroup(rank, world_size, address, port, backend)
        return rank

    def leave_broadcast(self) -> None:
        if self.broadcast_group is not None:
            self.broadcast_group.group = None  # dropping the process group and its store closes their connections
            self.broadcast_group = None


def flatten(payload: WeightPayload, device: torch.device | str = "cpu") -> tuple[Manifest, torch.Tensor]:
    """The payload as (manifest, one uint8 buffer on `device`)."""
    manifest: Manifest = []
    parts: list[torch.Tensor] = []
    for name in sorted(payload):
        value = payload[name]
        if isinstance(value, PackedInt4):
            manifest.append(
                (
                    name,
                    "int4",
                    (
                        (value.packed.dtype, tuple(value.packed.shape)),
                        (value.scale.dtype, tuple(value.scale.shape)),
                        tuple(value.shape),
                        value.dtype,
                        value.group_size,
                    ),
                )
            )
            parts += [value.packed, value.scale]
        else:
            manifest.append((name, "dense", (value.dtype, tuple(value.shape))))
            parts.append(value)
    buffer = (
        torch.cat([p.detach().contiguous().reshape(-1).view(torch.uint8) for p in parts])
        if parts
        else torch.zeros(0, dtype=torch.uint8)
    )
    return manifest, buffer.to(device)


def buffer_size(manifest: Manifest) -> int:
    total = 0
    for _, kind, spec in manifest:
        for dtype, shape in spec[:2] if kind == "int4" else [spec]:
            total += torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return total


def unflatten(manifest: Manifest, buffer: torch.Tensor) -> WeightPayload:
    """Inverse of `flatten` (tensors are views into `buffer`, on its device)."""
    offset = 0

    def take(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        nonlocal offset
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        t = buffer[offset : offset + n].view(dtype).reshape(shape)
        offset += n
        return t

    payload: WeightPayload = {}
    for name, kind, spec in manifest:
        if kind == "int4":
            (pd, ps), (sd, ss), shape, dtype, group_size = spec
            payload[name] = PackedInt4(
                packed=take(pd, ps), scale=take(sd, ss), shape=shape, dtype=dtype, group_size=group_size
            )
        else:
            payload[name] = take(*spec)
    if offset != buffer.numel():
        raise ValueError(f"weight broadcast: {buffer.numel()} bytes received, the manifest describes {offset}")
    return payload


def _check_packed_fields() -> None:
    """`flatten` carries exactly PackedInt4's fields; fail at import if the record grows a field it would drop."""
    fields = {f.name for f in dataclasses.fields(PackedInt4)}
    if fields != {"packed", "scale", "shape", "dtype", "group_size"}:
        raise ImportError(f"rollouts.collective does not carry PackedInt4 fields {sorted(fields)}")


_check_packed_fields()
