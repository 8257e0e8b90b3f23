"""Pulls and pushes between caches of different geometry (block size, layout, tensor-parallel
split): the native planner's lanes and segments, checked against the peer's cache desc
before any byte moves, run as one remote transfer (a same-host copy or a NIXL request)."""

from __future__ import annotations

import os

import numpy as np
import torch

from .. import _C
from ..errors import raises_llm
from ..geometry import KVGeometry, Selection, TokenPlan, checked_geometry, fields, native_plan, selection
from ..inflight import Transfer
from ..types import Blocks, Cache, CacheDesc, block_tensor
from . import api, plan


class _Planned:
    """The plan of one transfer, made once from the peer's desc: the engine asks for the
    lanes' tensors, then the segments, then the lanes' shifts, and, when K and V are laid
    out differently on either side (their runs differ), each lane's runs."""

    def __init__(
        self,
        local: Cache,
        read: bool,
        geometries: tuple[KVGeometry, KVGeometry],
        blocks: tuple[torch.Tensor, torch.Tensor],
        chosen: Selection,
    ):
        self.local, self.read, self.geometries, self.blocks, self.chosen = local, read, geometries, blocks, chosen
        self.plan: TokenPlan | None = None
        self.watched = False  # whether a notice goes out when the copy ends

    def of(self, remote_desc: CacheDesc) -> TokenPlan:
        if self.plan is None:
            src, dst = (remote_desc, self.local.cache_desc) if self.read else (self.local.cache_desc, remote_desc)
            made = native_plan(
                src, self.geometries[0], dst, self.geometries[1], *self.blocks, self.chosen, plan.MAX_DESCRIPTOR_BYTES
            )
            self.plan = made
        return self.plan

    def _sides(self, column: int) -> tuple[list[int], list[int]]:
        """(local, remote) values of a lane column pair: tensors (0) or shifts (1)."""
        assert self.plan is not None
        lanes = self.plan.lanes
        src, dst = lanes[:, column].tolist(), lanes[:, column + 2].tolist()
        return (dst, src) if self.read else (src, dst)

    def tensors(self, remote_desc: CacheDesc) -> tuple[list[int], list[int]]:
        self.of(remote_desc)
        return self._sides(0)

    def shifts(self) -> tuple[list[int], list[int]]:
        return self._sides(1)

    def segments(self, remote_desc: CacheDesc, _key_index: int) -> plan.Segments:
        return _columns(self.of(remote_desc).segments)

    def lane_runs(self) -> list[plan.Segments]:
        """Per lane its runs: K's on even lanes, V's on odd ones."""
        assert self.plan is not None
        k_runs, v_runs = _columns(self.plan.segments), _columns(self.plan.v_segments)
        return [v_runs if lane % 2 else k_runs for lane in range(len(self.plan.lanes))]

    def mapped_boxes(self, remote_desc: CacheDesc, region: _C.SharedRegion, mapped: list[int]) -> _C.PeerCopyJob:
        """The job of this transfer when the peer's cache is mapped here (``mapped``: its
        tensors' addresses in ``region``): the box kernels of copy_kv_tokens, planned (no
        runs) and checked natively against both descs and the region."""
        local = (fields(self.local.cache_desc), list(self.local.tensor_addrs))
        remote = (fields(remote_desc), mapped)
        (src, src_addrs), (dst, dst_addrs) = (remote, local) if self.read else (local, remote)
        return _C.mapped_geometry_copy_start(
            region,
            self.read,
            src,
            self.geometries[0].fields(),
            src_addrs,
            dst,
            self.geometries[1].fields(),
            dst_addrs,
            *self.blocks,
            self.chosen,
            self.watched,
        )

    def differ(self) -> bool:
        """Whether K's and V's runs differ (known once planned)."""
        return self.geometries[0].kv_differ or self.geometries[1].kv_differ


def _columns(rows: torch.Tensor) -> plan.Segments:
    table = rows.numpy().view(np.uint64)  # offsets and lengths are never negative
    return table[:, 0], table[:, 1], table[:, 2]


def start_tokens(
    operation: str,
    local: Cache | int,
    remote: object,
    src_blocks: Blocks,
    dst_blocks: Blocks,
    num_tokens: int,
    src_geometry: KVGeometry,
    dst_geometry: KVGeometry,
    chosen: tuple[int, int, range | None, range | None, range | None],
    notify: str | bytes | None,
    background: bool,
) -> Transfer:
    """Starts a token transfer between a local cache and a remote one (READ: remote to
    local); everything, the peer's desc included, is checked before this returns."""
    remote_index = api._cache_index(remote)
    engine = api.get_engine()
    message = api._notify(notify)
    geometries = (checked_geometry(src_geometry, "src_geometry"), checked_geometry(dst_geometry, "dst_geometry"))
    blocks = (block_tensor(src_blocks, "src_blocks"), block_tensor(dst_blocks, "dst_blocks"))
    src_offset, dst_offset, layers, dst_layers, heads = chosen
    planned = _Planned(
        api._local(local),
        operation == "READ",
        geometries,
        blocks,
        selection(num_tokens, src_offset, dst_offset, layers, dst_layers, heads),
    )
    planned.watched = bool(message)
    # TORCH_KVREG_GEOMETRY_COPY=runs: mapped peers' caches take the plan's runs too (A/B baseline).
    boxes = None if os.environ.get("TORCH_KVREG_GEOMETRY_COPY") == "runs" else planned.mapped_boxes
    return engine.start_transfer(
        operation,
        planned.local,
        remote_index.cluster_id,
        remote_index.cache_id,
        planned.segments,
        planned.tensors,
        message,
        blocks[1].tolist(),
        background=background,
        lane_shifts=planned.shifts,
        lane_runs=planned.lane_runs if planned.differ() else None,
        mapped_boxes=boxes,
    )


@raises_llm
def pull_kv_tokens_async(
    src: object,
    dst: Cache | int,
    src_blocks: Blocks,
    dst_blocks: Blocks,
    num_tokens: int = -1,
    *,
    src_geometry: KVGeometry,
    dst_geometry: KVGeometry,
    src_offset: int = 0,
    dst_offset: int = 0,
    layers: range | None = None,
    dst_layers: range | None = None,
    heads: range | None = None,
    notify: str | bytes | None = None,
) -> Transfer:
    """Starts reading tokens of a remote cache (``src``: a CacheIndex) of geometry
    ``src_geometry`` into a local one of ``dst_geometry``; the arguments are
    ``copy_kv_tokens``'s, plus ``notify`` (delivered once the data has been read)."""
    chosen = (src_offset, dst_offset, layers, dst_layers, heads)
    return start_tokens(
        "READ", dst, src, src_blocks, dst_blocks, num_tokens, src_geometry, dst_geometry, chosen, notify, True
    )


@raises_llm
def push_kv_tokens_async(
    src: Cache | int,
    dst: object,
    src_blocks: Blocks,
    dst_blocks: Blocks,
    num_tokens: int = -1,
    *,
    src_geometry: KVGeometry,
    dst_geometry: KVGeometry,
    src_offset: int = 0,
    dst_offset: int = 0,
    layers: range | None = None,
    dst_layers: range | None = None,
    heads: range | None = None,
    notify: str | bytes | None = None,
) -> Transfer:
    """Starts writing tokens of a local cache into a remote one (``dst``: a CacheIndex);
    ``notify`` reaches the peer once the data has landed there."""
    chosen = (src_offset, dst_offset, layers, dst_layers, heads)
    return start_tokens(
        "WRITE", src, dst, src_blocks, dst_blocks, num_tokens, src_geometry, dst_geometry, chosen, notify, True
    )


@raises_llm
def pull_kv_tokens(
    src: object,
    dst: Cache | int,
    src_blocks: Blocks,
    dst_blocks: Blocks,
    num_tokens: int = -1,
    *,
    src_geometry: KVGeometry,
    dst_geometry: KVGeometry,
    src_offset: int = 0,
    dst_offset: int = 0,
    layers: range | None = None,
    dst_layers: range | None = None,
    heads: range | None = None,
    notify: str | bytes | None = None,
) -> int:
    """``pull_kv_tokens_async(...).wait()``, posted from this thread: the bytes moved.

    >>> import torch, torch_kvreg as kv
    >>> kv.initialize()
    >>> g = kv.KVGeometry("flash_attn", block_size=16, num_kv_heads=2, head_dim=8)
    >>> local = kv.register_kv_cache([torch.zeros(4, 16, 2, 8), torch.zeros(4, 16, 2, 8)])
    >>> try:
    ...     kv.pull_kv_tokens(kv.CacheIndex(9, 1), local, [0], [0], src_geometry=g, dst_geometry=g)
    ... except kv.LLMException as exc:  # no peer here: not linked (or no nixl extra)
    ...     print(exc.status_code.name in ("LLM_NOT_YET_LINK", "LLM_FEATURE_NOT_ENABLED"))
    True
    >>> kv.finalize()
    """
    chosen = (src_offset, dst_offset, layers, dst_layers, heads)
    return start_tokens(
        "READ", dst, src, src_blocks, dst_blocks, num_tokens, src_geometry, dst_geometry, chosen, notify, False
    ).wait()


@raises_llm
def push_kv_tokens(
    src: Cache | int,
    dst: object,
    src_blocks: Blocks,
    dst_blocks: Blocks,
    num_tokens: int = -1,
    *,
    src_geometry: KVGeometry,
    dst_geometry: KVGeometry,
    src_offset: int = 0,
    dst_offset: int = 0,
    layers: range | None = None,
    dst_layers: range | None = None,
    heads: range | None = None,
    notify: str | bytes | None = None,
) -> int:
    """``push_kv_tokens_async(...).wait()``, posted from this thread: the bytes moved."""
    chosen = (src_offset, dst_offset, layers, dst_layers, heads)
    return start_tokens(
        "WRITE", src, dst, src_blocks, dst_blocks, num_tokens, src_geometry, dst_geometry, chosen, notify, False
    ).wait()
