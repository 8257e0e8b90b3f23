"""Validation and descriptor lists for one remote block transfer (checked before any byte moves)."""

from __future__ import annotations

import numpy as np

from ..errors import LLMStatusCode, make_error, param_invalid
from ..types import CacheDesc, Placement

# Runs of consecutive blocks become one descriptor, up to this many bytes.
MAX_DESCRIPTOR_BYTES = 64 << 20


def check_compatible(src: CacheDesc, dst: CacheDesc) -> None:
    if src.num_tensors != dst.num_tensors:
        raise param_invalid(f"src cache has {src.num_tensors} tensors but dst cache has {dst.num_tensors}")
    if src.data_type != dst.data_type:
        raise param_invalid(f"src cache has data_type {src.data_type.name} but dst cache has {dst.data_type.name}")
    if src.shape[1:] != dst.shape[1:]:
        raise param_invalid(f"src shape {src.shape} and dst shape {dst.shape} differ in shape[1:]")


def _check_range(blocks: np.ndarray, num_blocks: int, name: str) -> None:
    bad = np.flatnonzero((blocks < 0) | (blocks >= num_blocks))
    if bad.size:
        j = int(bad[0])
        raise make_error(
            LLMStatusCode.LLM_PARAM_INVALID,
            f"{name}[{j}] = {int(blocks[j])} is out of range for a cache of {num_blocks} blocks",
            IndexError,
        )


def block_segments(src: CacheDesc, dst: CacheDesc, src_blocks: np.ndarray, dst_blocks: np.ndarray):
    """(src byte offsets, dst byte offsets, lengths) of the coalesced runs, after validation."""
    check_compatible(src, dst)
    if src_blocks.shape != dst_blocks.shape:
        raise param_invalid(f"src_blocks has {src_blocks.size} entries but dst_blocks has {dst_blocks.size}")
    _check_range(src_blocks, src.shape[0], "src_blocks")
    _check_range(dst_blocks, dst.shape[0], "dst_blocks")
    if np.unique(dst_blocks).size != dst_blocks.size:
        values, counts = np.unique(dst_blocks, return_counts=True)
        raise param_invalid(f"dst_blocks names block {int(values[counts > 1][0])} more than once")
    block_nbytes = src.block_nbytes
    if src_blocks.size == 0:
        empty = np.zeros(0, dtype=np.uint64)
        return empty, empty, empty
    # A run continues while both sides step by one block and stays under the size cap.
    max_run = max(1, MAX_DESCRIPTOR_BYTES // block_nbytes)
    steps = (np.diff(src_blocks) == 1) & (np.diff(dst_blocks) == 1)
    starts = [0]
    run = 1
    for j, continues in enumerate(steps.tolist(), start=1):
        if continues and run < max_run:
            run += 1
        else:
            starts.append(j)
            run = 1
    starts_arr = np.asarray(starts, dtype=np.int64)
    lengths = np.diff(np.append(starts_arr, src_blocks.size))
    return (
        (src_blocks[starts_arr] * block_nbytes).astype(np.uint64),
        (dst_blocks[starts_arr] * block_nbytes).astype(np.uint64),
        (lengths * block_nbytes).astype(np.uint64),
    )


def descriptors(addrs, device_id: int, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Nx3 (address, length, device) rows: every segment of every tensor."""
    base = np.asarray(addrs, dtype=np.uint64)[:, None] + offsets[None, :]
    rows = np.empty((base.size, 3), dtype=np.uint64)
    rows[:, 0] = base.reshape(-1)
    rows[:, 1] = np.broadcast_to(lengths, base.shape).reshape(-1)
    rows[:, 2] = device_id
    return rows


def mem_type(desc: CacheDesc) -> str:
    return "DRAM" if desc.placement == Placement.HOST else "VRAM"


def device_id(desc: CacheDesc) -> int:
    return 0 if desc.placement == Placement.HOST else max(desc.device_index, 0)
