"""Delta weight sync: a push that carries only the INT4 groups and full-precision rows that changed since the push a
rollout worker holds (`cluster.weight_sync_delta`).

At RL learning rates most INT4 codes do not move from one step to the next (a code flips only when its weight
crosses a rounding boundary, steps of amax/7 apart), so most of a full push repeats what the workers already hold.
A `WeightDelta` is the difference between two pushes (`WeightPayload`s of the same model), each named by a sync id:

- a packed INT4 tensor is cut into its groups: group g is the g-th scale and the `group_size / 8` int32 words that
  hold its codes (32 input values of one output row, by default). A group travels when any of its words or its
  scale differs, bit for bit. A tensor whose input dim is not a multiple of the group size goes by whole rows.
- a full-precision tensor is cut into rows (slices along its first dim; one row for a tensor of fewer than 2 dims),
  or kept whole with `dense_by="tensor"`, and a row travels when any of its bits differ.

Which groups or rows travel is a bitmap or the gaps between their sorted indices, whichever is smaller. The receiver
writes them into its own copy in place (`apply_delta`), which reproduces the new push bit for bit: exactly what a
full push would have installed. A receiver that does not hold the delta's base push cannot use it; the sender sees
to that (a full push on any version gap) and `apply_delta`'s caller checks it.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

import torch

from rollouts.quant import PackedInt4, WeightPayload

_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def new_sync_id(version: int) -> str:
    """A name for one push, unique across learners and restarts (a policy version repeats after a resume)."""
    return f"v{version}-{uuid.uuid4().hex[:12]}"


@dataclass
class IndexCode:
    """Which of `count` units (groups or rows) changed: a bitmap or the gaps between sorted indices."""

    kind: Literal["bitmap", "gaps"]
    data: torch.Tensor
    """bitmap: uint8 [ceil(count / 8)], unit i at bit i % 8 of byte i // 8; gaps: [changed] in the narrowest of
    uint8 / int16 / int32 that holds them, index j = sum of the first j + 1 gaps - 1."""
    count: int

    @staticmethod
    def encode(mask: torch.Tensor) -> IndexCode:
        """The smaller encoding of a bool mask [count]."""
        count = int(mask.numel())
        index = mask.nonzero()[:, 0]
        gaps = torch.diff(index, prepend=torch.tensor([-1]))
        top = int(gaps.max()) if gaps.numel() else 0
        dtype = torch.uint8 if top <= 255 else torch.int16 if top <= 32767 else torch.int32
        if gaps.numel() * torch.empty((), dtype=dtype).element_size() < (count + 7) // 8:
            return IndexCode("gaps", gaps.to(dtype), count)
        bits = torch.nn.functional.pad(mask.to(torch.uint8), (0, -count % 8)).view(-1, 8)
        return IndexCode("bitmap", (bits << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8), count)

    def indices(self) -> torch.Tensor:
        """The changed units' indices, ascending (int64)."""
        if self.kind == "gaps":
            return self.data.to(torch.int64).cumsum(0) - 1
        bits = (self.data[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
        return bits.reshape(-1)[: self.count].nonzero()[:, 0]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


@dataclass
class Int4Groups:
    """The changed groups of one packed INT4 tensor: their words and scales, new values."""

    index: IndexCode
    words: torch.Tensor  # int32 [changed, unit_words]
    scales: torch.Tensor  # [changed, unit_scales], the scale dtype

    @property
    def nbytes(self) -> int:
        return self.index.nbytes + _nbytes(self.words) + _nbytes(self.scales)


@dataclass
class DenseRows:
    """The changed rows of one full-precision tensor viewed as [rows, row_len]."""

    index: IndexCode
    rows: torch.Tensor  # [changed, row_len], the tensor's dtype

    @property
    def nbytes(self) -> int:
        return self.index.nbytes + _nbytes(self.rows)


@dataclass
class WeightDelta:
    """Push `sync_id` as the difference from push `base_id`."""

    base_id: str
    sync_id: str
    int4: dict[str, Int4Groups] = field(default_factory=dict)
    dense: dict[str, DenseRows] = field(default_factory=dict)
    int4_groups: int = 0
    """Groups (units) over every INT4 tensor of the model, changed or not: the denominator of the changed share."""
    int4_codes: int = 0
    int4_codes_changed: int = 0
    """INT4 values over every INT4 tensor, and how many of their 4-bit codes differ from the base push."""

    @property
    def nbytes(self) -> int:
        return sum(g.nbytes for g in self.int4.values()) + sum(r.nbytes for r in self.dense.values())

    @property
    def int4_groups_changed(self) -> int:
        return sum(int(g.words.shape[0]) for g in self.int4.values())


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """`t`'s bit patterns as integers of the same width (so -0.0 != 0.0 and NaN == the same NaN, as bytes compare)."""
    return t.view(_SAME_WIDTH_INT[t.element_size()])


def changed_codes(new: torch.Tensor, old: torch.Tensor) -> int:
    """How many 4-bit fields differ between two int32 tensors of packed codes."""
    flipped = new ^ old
    return sum(int(((flipped >> (4 * k)) & 0xF).count_nonzero()) for k in range(8))


def int4_units(p: PackedInt4) -> tuple[torch.Tensor, torch.Tensor]:
    """(words [units, unit_words], scales [units, unit_scales]): views of `p`'s tensors, one row per group (per
    dense row when the input dim is not a multiple of the group size)."""
    in_features = p.shape[-1]
    if in_features % p.group_size == 0:
        return p.packed.view(-1, p.group_size // 8), p.scale.view(-1, 1)
    return p.packed.view(-1, p.packed.shape[-1]), p.scale.view(-1, p.scale.shape[-1])


def dense_rows(t: torch.Tensor, by: Literal["row", "tensor"]) -> torch.Tensor:
    """A view of `t` as [rows, row_len]: slices along its first dim (`row`), or the whole tensor as one row."""
    if by == "row" and t.ndim >= 2:
        return t.view(t.shape[0], -1)
    return t.view(1, -1)


def diff(
    old: WeightPayload, new: WeightPayload, base_id: str, sync_id: str, dense_by: Literal["row", "tensor"] = "tensor"
) -> WeightDelta:
    """The delta that turns push `old` (`base_id`) into push `new` (`sync_id`). Both must hold the same tensors with
    the same kinds and shapes (pushes of one model)."""
    if old.keys() != new.keys():
        raise ValueError(f"delta sync: the pushes hold different tensors: {sorted(old.keys() ^ new.keys())}")
    delta = WeightDelta(base_id, sync_id)
    for name, value in new.items():
        before = old[name]
        if isinstance(value, PackedInt4):
            if (
                not isinstance(before, PackedInt4)
                or before.shape != value.shape
                or before.group_size != value.group_size
            ):
                raise ValueError(f"delta sync: {name} is not the same INT4 tensor in both pushes")
            (w_new, s_new), (w_old, s_old) = int4_units(value), int4_units(before)
            delta.int4_groups += w_new.shape[0]
            mask = (_bits(w_new) != _bits(w_old)).any(1) | (_bits(s_new) != _bits(s_old)).any(1)
            delta.int4_codes += int(torch.Size(value.shape).numel())
            if mask.any():
                delta.int4[name] = Int4Groups(IndexCode.encode(mask), w_new[mask], s_new[mask])
                delta.int4_codes_changed += changed_codes(w_new[mask], w_old[mask])
        else:
            if not isinstance(before, torch.Tensor) or before.shape != value.shape or before.dtype != value.dtype:
                raise ValueError(f"delta sync: {name} is not the same full-precision tensor in both pushes")
            if value.numel() == 0:
                continue
            r_new, r_old = dense_rows(value.contiguous(), dense_by), dense_rows(before.contiguous(), dense_by)
            mask = (_bits(r_new) != _bits(r_old)).any(1)
            if mask.any():
                delta.dense[name] = DenseRows(IndexCode.encode(mask), r_new[mask])
    return delta


def apply_delta(delta: WeightDelta, int4: dict[str, PackedInt4], dense: dict[str, torch.Tensor]) -> None:
    """Write `delta` into the receiver's copy of its base push, in place: `int4` its packed tensors, `dense` its
    full-precision ones (e.g. the model's state dict, whose tensors share the parameters' storage)."""
    for name, groups in delta.int4.items():
        if name not in int4:
            raise KeyError(f"delta sync: INT4 tensor {name!r} is not held by this receiver")
        words, scales = int4_units(int4[name])
        index = groups.index.indices().to(words.device)
        words[index] = groups.words.to(words.device)
        scales[index] = groups.scales.to(scales.device)
    for name, rows in delta.dense.items():
        if name not in dense:
            raise KeyError(f"delta sync: tensor {name!r} is not held by this receiver")
        target = dense[name]
        view = target.view(-1, rows.rows.shape[1]) if target.numel() else target.view(0, 0)
        if view.shape[0] != rows.index.count:
            raise ValueError(
                f"delta sync: {name} has {view.shape[0]} rows of {rows.rows.shape[1]}, the delta {rows.index.count}"
            )
        view[rows.index.indices().to(target.device)] = rows.rows.to(target.device)


def owned_copy(p: PackedInt4) -> PackedInt4:
    """A writable copy of a packed tensor (a payload from the object store may be a read-only view)."""
    return PackedInt4(p.packed.clone(), p.scale.clone(), p.shape, p.dtype, p.group_size)


@dataclass(frozen=True)
class PushInfo:
    """What one push carried, as the sender saw it (the pool routes by it; its `metrics` go into metrics.jsonl)."""

    sync_id: str
    base_id: str | None
    """The update is a delta against this push; None: the update is the full payload."""
    nbytes: int
    """Bytes of the update (what a worker holding the base receives)."""
    full_nbytes: int
    """Bytes of the full payload of the same weights (INT4 packed + full precision)."""
    int4_groups: int = 0
    int4_groups_changed: int = 0
    int4_codes: int = 0
    int4_codes_changed: int = 0
    encode_s: float = 0.0
    """Seconds the sender spent diffing (0 for a full push)."""

    def metrics(self) -> dict[str, float]:
        out = {
            "sync_bytes": float(self.nbytes),
            "sync_full_bytes": float(self.full_nbytes),
            "sync_delta": float(self.base_id is not None),
        }
        if self.base_id is not None:
            out["time_sync_encode_s"] = self.encode_s
            if self.int4_groups:
                out["sync_int4_groups_changed"] = self.int4_groups_changed / self.int4_groups
                out["sync_int4_codes_changed"] = self.int4_codes_changed / self.int4_codes
        return out


def payload_bytes(payload: WeightPayload) -> int:
    """Bytes of a full push: packed INT4 tensors (words and scales) and full-precision ones."""
    return sum(v.nbytes if isinstance(v, PackedInt4) else _nbytes(v) for v in payload.values())


class DeltaSender:
    """The sender's memory of its last push, so the next one can be a delta against it.

    With `delta` off nothing is kept and every push is full. With it on, the last push's payload is kept (one copy
    of the packed weights and the full-precision ones) and a push against it (`base_id`) is a delta; a push against
    anything else (a worker that missed a push, a new worker, a restarted sender) is full.
    """

    def __init__(self, dense_by: Literal["row", "tensor"] = "tensor") -> None:
        self.dense_by: Literal["row", "tensor"] = dense_by
        self.last: tuple[str, WeightPayload] | None = None

    def push(
        self, payload: WeightPayload, version: int, base_id: str | None, delta: bool
    ) -> tuple[PushInfo, WeightPayload | WeightDelta, WeightPayload | None]:
        """(what it carried, the update to send, the full payload when the update is a delta: for workers that do
        not hold `base_id`, and for restarting one)."""
        sync_id, full_nbytes = new_sync_id(version), payload_bytes(payload)
        last, self.last = self.last, (sync_id, payload) if delta else None
        if not delta or base_id is None or last is None or last[0] != base_id:
            return PushInfo(sync_id, None, full_nbytes, full_nbytes), payload, None
        start = time.perf_counter()
        update = diff(last[1], payload, base_id, sync_id, self.dense_by)
        if update.nbytes >= full_nbytes:  # nearly everything changed: the indices would only add to a full push
            return PushInfo(sync_id, None, full_nbytes, full_nbytes), payload, None
        info = PushInfo(
            sync_id,
            base_id,
            update.nbytes,
            full_nbytes,
            update.int4_groups,
            update.int4_groups_changed,
            update.int4_codes,
            update.int4_codes_changed,
            time.perf_counter() - start,
        )
        return info, update, payload

    def last_payload(self) -> tuple[str, WeightPayload] | None:
        """(sync id, full payload) of the last push, when kept."""
        return self.last


def payload_digest(payload: WeightPayload) -> str:
    """A hash of every tensor's name and bytes (packed words and scales for INT4): equal digests, equal pushes."""
    h = hashlib.sha256()
    for name in sorted(payload):
        value = payload[name]
        for t in (value.packed, value.scale) if isinstance(value, PackedInt4) else (value,):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
