"""Kernels of the remote ops under ``torch.ops.llm`` (schemas in csrc/ops.cpp): the remote
layer registers its own, so that the registry below it never imports it."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import raises_llm
from ..inflight import remember, take
from ..types import CacheIndex
from .api import pull_kv_blocks, pull_kv_blocks_async, pull_kv_cache, push_kv_blocks

_library = torch.library.Library("llm", "IMPL")


def _pull_kv_blocks(
    cluster_id: int, src_cache_id: int, dst_cache_id: int, src_blocks: Tensor, dst_blocks: Tensor
) -> None:
    pull_kv_blocks(CacheIndex(cluster_id, int(src_cache_id)), int(dst_cache_id), src_blocks, dst_blocks)


def _push_kv_blocks(
    src_cache_id: int, cluster_id: int, dst_cache_id: int, src_blocks: Tensor, dst_blocks: Tensor
) -> None:
    push_kv_blocks(int(src_cache_id), CacheIndex(cluster_id, int(dst_cache_id)), src_blocks, dst_blocks)


def _pull_kv_cache(
    cluster_id: int, src_cache_id: int, src_batch_index: int, dst_cache_id: int, batch_index: int = 0, size: int = -1
) -> None:
    pull_kv_cache(CacheIndex(cluster_id, int(src_cache_id), src_batch_index), int(dst_cache_id), batch_index, size)


def _start_pull_kv_blocks(
    cluster_id: int, src_cache_id: int, dst_cache_id: int, src_blocks: Tensor, dst_blocks: Tensor
) -> int:
    src = CacheIndex(cluster_id, int(src_cache_id))
    return remember(pull_kv_blocks_async(src, int(dst_cache_id), src_blocks, dst_blocks))


def _wait_transfer(transfer_id: int) -> None:
    raises_llm(take)(int(transfer_id)).wait()


for _name, _kernel in (
    ("pull_kv_blocks", _pull_kv_blocks),
    ("push_kv_blocks", _push_kv_blocks),
    ("pull_kv_cache", _pull_kv_cache),
    ("start_pull_kv_blocks", _start_pull_kv_blocks),
    ("wait_transfer", _wait_transfer),
):
    _library.impl(_name, _kernel, "CompositeExplicitAutograd", allow_override=True)
