"""Segments and descriptor lists for one remote transfer, validated before any byte moves
by the same C++ checks as local copies."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .. import _C
from ..types import CacheDesc, Placement

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
