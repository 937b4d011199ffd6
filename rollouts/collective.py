"""Weight sync by collective broadcast (`cluster.weight_sync: collective`): learner rank 0 broadcasts one flat
buffer of the weight-sync payload to every rollout worker, NCCL between GPUs, gloo between CPUs.

The object-store path (the default) copies the payload into Ray's object store and every worker pulls it,
which is what one node or CPU workers want; between GPU nodes a NCCL broadcast moves the weights GPU to GPU
without the host round trip. The broadcast group is separate from the learners' data-parallel group: torch's
`new_group` needs a default group spanning every member, which rollout workers are not part of, so the group is
built from its own TCPStore (as verl and OpenRLHF do for the same reason). Its members are learner rank 0
(rank 0 here) and the workers (1..n); when a member is replaced (a restarted worker or learner) every member
leaves and the group is formed again.

The payload (dense tensors and packed INT4 ones, or a delta push's changed groups and rows: `rollouts.delta`)
travels as one uint8 buffer plus a small manifest (names, dtypes, shapes) sent through Ray, so one push is one
collective whatever the number of tensors.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from rollouts.delta import DenseRows, IndexCode, Int4Groups, WeightDelta
from rollouts.quant import PackedInt4, WeightPayload

Manifest = list[tuple[str, str, Any]]
"""(name, "dense" | "int4", spec): dense spec = (dtype, shape); int4 spec = ((dtype, shape) of packed, of scale,
the dense shape, the dense dtype, the group size). A delta push (`rollouts.delta`) starts with ("", "delta",
(base id, sync id, INT4 groups)), then (name, "int4_groups" | "dense_rows", (index kind, unit count, (dtype, shape)
of the index, then of the words and scales, or of the rows))."""


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


def flatten(payload: WeightPayload | WeightDelta, device: torch.device | str = "cpu") -> tuple[Manifest, torch.Tensor]:
    """The payload (or a delta push, `rollouts.delta`) as (manifest, one uint8 buffer on `device`)."""
    manifest: Manifest = []
    parts: list[torch.Tensor] = []
    if isinstance(payload, WeightDelta):
        manifest.append(("", "delta", (payload.base_id, payload.sync_id, payload.int4_groups)))
        for kind, entries in (("int4_groups", payload.int4), ("dense_rows", payload.dense)):
            for name in sorted(entries):
                entry = entries[name]
                index = entry.index
                tensors = [index.data, *((entry.words, entry.scales) if kind == "int4_groups" else (entry.rows,))]
                manifest.append((name, kind, (index.kind, index.count, *((t.dtype, tuple(t.shape)) for t in tensors))))
                parts += tensors
    for name in sorted(payload) if not isinstance(payload, WeightDelta) else []:
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
        specs = {"int4": spec[:2], "dense": [spec], "delta": [], "int4_groups": spec[2:], "dense_rows": spec[2:]}[kind]
        for dtype, shape in specs:
            total += torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return total


def unflatten(manifest: Manifest, buffer: torch.Tensor) -> WeightPayload | WeightDelta:
    """Inverse of `flatten` (tensors are views into `buffer`, on its device)."""
    offset = 0

    def take(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        nonlocal offset
        size = torch.empty((), dtype=dtype).element_size()
        n = torch.Size(shape).numel() * size
        raw = buffer[offset : offset + n]
        if offset % size:  # after a delta's odd-sized uint8 index: a view would be misaligned
            raw = raw.clone()
        offset += n
        return raw.view(dtype).reshape(shape)

    payload: WeightPayload = {}
    delta: WeightDelta | None = None
    for name, kind, spec in manifest:
        if kind == "delta":
            delta = WeightDelta(spec[0], spec[1], int4_groups=spec[2])
        elif kind in ("int4_groups", "dense_rows"):
            assert delta is not None, "a delta manifest starts with its header"
            index = IndexCode(spec[0], take(*spec[2]), spec[1])
            if kind == "int4_groups":
                delta.int4[name] = Int4Groups(index, take(*spec[3]), take(*spec[4]))
            else:
                delta.dense[name] = DenseRows(index, take(*spec[3]))
        elif kind == "int4":
            (pd, ps), (sd, ss), shape, dtype, group_size = spec
            payload[name] = PackedInt4(
                packed=take(pd, ps), scale=take(sd, ss), shape=shape, dtype=dtype, group_size=group_size
            )
        else:
            payload[name] = take(*spec)
    if offset != buffer.numel():
        raise ValueError(f"weight broadcast: {buffer.numel()} bytes received, the manifest describes {offset}")
    return delta if delta is not None else payload


def _check_packed_fields() -> None:
    """`flatten` carries exactly PackedInt4's fields; fail at import if the record grows a field it would drop."""
    fields = {f.name for f in dataclasses.fields(PackedInt4)}
    if fields != {"packed", "scale", "shape", "dtype", "group_size"}:
        raise ImportError(f"rollouts.collective does not carry PackedInt4 fields {sorted(fields)}")


_check_packed_fields()
