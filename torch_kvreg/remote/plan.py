"""Segments and descriptor lists for one remote transfer, validated before any byte moves
by the same C++ checks as local copies."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .. import _C
from ..errors import param_invalid
from ..types import Cache, CacheDesc, Placement, layer_tensors

# Runs of consecutive blocks become one descriptor, up to this many bytes.
MAX_DESCRIPTOR_BYTES = 64 << 20

# (src byte offsets, dst byte offsets, lengths), one entry per coalesced run.
Segments = tuple[np.ndarray, np.ndarray, np.ndarray]
# Given the remote desc: the (local, remote) tensor indices that take part in a transfer.
TensorSelection = Callable[[CacheDesc], tuple[list[int], list[int]]]
# Given the remote desc and the slice its key names (else 0): the transfer's segments.
MakeSegments = Callable[[CacheDesc, int], Segments]
# The remote cache of a transfer: its id, or a key the peer registered it under.
RemoteRef = int | str
# Bytes added to each selected tensor's base address, (local, remote): a transfer between
# geometries addresses a block's V half as a shifted base of the tensor holding it.
LaneShifts = Callable[[], tuple[Sequence[int], Sequence[int]]]
# Per lane (as tensors() lists them) its own segments, (src offsets, dst offsets, lengths):
# a transfer between geometries whose K and V are laid out differently.
LaneRuns = Callable[[], Sequence[Segments]]
# Starts a transfer between geometries whose peer cache is mapped here, as box copies:
# (the peer's desc, the region, every peer tensor's address in it) -> the native job.
MappedBoxes = Callable[[CacheDesc, _C.SharedRegion, list[int]], _C.PeerCopyJob]
# One side of a planned transfer: (the desc fields of its tensors taking part, its cache id).
PlanSide = tuple["_C.DescFields", int]


def fields(desc: CacheDesc | _C.DescFields, num_tensors: int | None = None) -> _C.DescFields:
    """What the C++ planner takes of a desc (``num_tensors`` of its tensors: all if None)."""
    if isinstance(desc, tuple):
        return desc
    count = desc.num_tensors if num_tensors is None else num_tensors
    return (count, int(desc.data_type), list(desc.shape), int(desc.placement), desc.device_index)


def _columns(rows: torch.Tensor) -> Segments:
    table = rows.numpy().view(np.uint64)  # offsets and lengths are never negative
    return table[:, 0], table[:, 1], table[:, 2]


def block_segments(
    src: CacheDesc | _C.DescFields,
    src_id: int,
    dst: CacheDesc | _C.DescFields,
    dst_id: int,
    src_blocks: torch.Tensor,
    dst_blocks: torch.Tensor,
) -> Segments:
    """(src byte offsets, dst byte offsets, lengths) of the coalesced runs, after the checks
    of copy_kv_blocks (the same C++ code): equal lengths, compatible descs, indices in range,
    no repeated destination. Ids only name the caches in messages."""
    rows = _C.plan_blocks(fields(src), src_id, fields(dst), dst_id, src_blocks, dst_blocks, MAX_DESCRIPTOR_BYTES)
    return _columns(rows)


def slice_segments(
    src: CacheDesc | _C.DescFields,
    src_id: int,
    dst: CacheDesc | _C.DescFields,
    dst_id: int,
    src_index: int,
    dst_index: int,
    size: int,
) -> Segments:
    """copy_kv_cache's checks and segment for ``size`` bytes (-1: all) of one slice."""
    rows = _C.plan_slice(fields(src), src_id, fields(dst), dst_id, src_index, dst_index, 0, size)
    return _columns(rows)


def descriptors(addrs: Sequence[int], device_id: int, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Nx3 (address, length, device) rows: every segment of every tensor, tensor by tensor."""
    bases = np.asarray(addrs, dtype=np.uint64)
    rows = np.empty((bases.size, offsets.size, 3), dtype=np.uint64)
    rows[:, :, 0] = bases[:, None] + offsets[None, :]
    rows[:, :, 1] = lengths
    rows[:, :, 2] = device_id
    return rows.reshape(-1, 3)


def mem_type(desc: CacheDesc) -> str:
    return "DRAM" if desc.placement == Placement.HOST else "VRAM"


def device_id(desc: CacheDesc) -> int:
    return 0 if desc.placement == Placement.HOST else max(desc.device_index, 0)


def selection(
    local_desc: CacheDesc,
    local_layers: range | None,
    remote_layers: range | None,
    tensors_per_layer: int,
    remote_is_src: bool,
) -> TensorSelection:
    """tensors(remote_desc) for Engine.transfer: equal-length local and remote tensor lists."""

    def tensors(remote_desc: CacheDesc) -> tuple[list[int], list[int]]:
        local_tensors = layer_tensors(
            local_layers,
            tensors_per_layer,
            local_desc.num_tensors,
            "dst_layer_range" if remote_is_src else "src_layer_range",
        )
        remote_tensors = layer_tensors(
            remote_layers,
            tensors_per_layer,
            remote_desc.num_tensors,
            "src_layer_range" if remote_is_src else "dst_layer_range",
        )
        if len(local_tensors) != len(remote_tensors):
            raise param_invalid(
                f"the layers select {len(remote_tensors) if remote_is_src else len(local_tensors)} "
                f"source and {len(local_tensors) if remote_is_src else len(remote_tensors)} "
                "destination tensors; they must be equal"
            )
        return local_tensors, remote_tensors

    return tensors


def planned(
    local: Cache,
    remote_ref: RemoteRef,
    tensors: TensorSelection,
    read: bool,
    plan_one: Callable[[PlanSide, PlanSide, int], Segments],
) -> MakeSegments:
    """make_segments for Engine.transfer: the planner sees the descs of the tensors taking
    part, source first (the remote side is the source of a READ)."""

    def segments(remote_desc: CacheDesc, key_index: int) -> Segments:
        local_tensors, remote_tensors = tensors(remote_desc)
        local_side = (fields(local.cache_desc, len(local_tensors)), local.cache_id)
        remote_side = (fields(remote_desc, len(remote_tensors)), remote_ref if isinstance(remote_ref, int) else -1)
        src, dst = (remote_side, local_side) if read else (local_side, remote_side)
        return plan_one(src, dst, key_index)

    return segments


def one_lane(
    bases: tuple[Sequence[int], Sequence[int]],
    tensors: tuple[list[int], list[int]],
    shifts: tuple[Sequence[int], Sequence[int]] | None,
    runs: Sequence[Segments],
    read: bool,
) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]], Segments]:
    """Lanes that each have their own segments as one lane that every path can move: the
    lane whose base is lowest on each side (its tensor and shift), and every lane's
    segments rebased onto it, lane by lane: ((local, remote) tensor, (local, remote)
    shift, (local offsets, remote offsets, lengths)). ``bases``: the (local, remote)
    addresses of every tensor; ``runs`` per lane, src first (the remote side is the src
    of a READ).

    >>> runs = (np.array([0], np.uint64), np.array([4], np.uint64), np.array([2], np.uint64))
    >>> tensors, shifts, (local, remote, lengths) = one_lane(
    ...     ([1000, 5000], [64]), ([1, 0], [0, 0]), ([0, 8], [0, 32]), [runs, runs], read=False)
    >>> tensors, shifts, local.tolist(), remote.tolist(), lengths.tolist()
    (([0], [0]), ([8], [0]), [3992, 0], [4, 36], [2, 2])
    """
    shifts = shifts or ([0] * len(tensors[0]), [0] * len(tensors[1]))
    local = np.asarray(bases[0], dtype=np.int64)[tensors[0]] + np.asarray(shifts[0], dtype=np.int64)
    remote = np.asarray(bases[1], dtype=np.int64)[tensors[1]] + np.asarray(shifts[1], dtype=np.int64)
    low_local, low_remote = int(np.argmin(local)), int(np.argmin(remote))
    pieces: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    for lane, (src, dst, lengths) in enumerate(runs):
        local_offsets, remote_offsets = (dst, src) if read else (src, dst)
        pieces[0].append(local_offsets + np.uint64(local[lane] - local[low_local]))
        pieces[1].append(remote_offsets + np.uint64(remote[lane] - remote[low_remote]))
        pieces[2].append(lengths)
    return (
        ([tensors[0][low_local]], [tensors[1][low_remote]]),
        ([int(shifts[0][low_local])], [int(shifts[1][low_remote])]),
        (np.concatenate(pieces[0]), np.concatenate(pieces[1]), np.concatenate(pieces[2])),
    )
