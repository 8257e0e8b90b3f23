"""Block transfers between registered caches in this process (HOST and DEVICE)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Iterator, Mapping

import torch

from . import _C, counters
from . import verify as verification
from .errors import LLMException, LLMStatusCode, make_error, raises_llm, translate, wrong_type
from .inflight import Transfer
from .registry import cache_id_of, get_cache
from .types import Blocks, Cache, Placement, as_int, block_tensor, layer_tensors

# Local asynchronous copies run here, one at a time (each copy already uses every core).
_copier: concurrent.futures.ThreadPoolExecutor | None = None
_copier_lock = threading.Lock()


def _copy_worker() -> concurrent.futures.ThreadPoolExecutor:
    global _copier
    with _copier_lock:
        if _copier is None:
            _copier = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvreg-copy")
        return _copier


def _layer_tensors(
    src_id: int, dst_id: int, layers: range | None, tensors_per_layer: int
) -> tuple[list[int], list[int]]:
    """The tensor indices ``layers`` selects in each cache (the same layers on both sides)."""
    src_tensors = layer_tensors(layers, tensors_per_layer, get_cache(src_id).cache_desc.num_tensors)
    dst_tensors = layer_tensors(layers, tensors_per_layer, get_cache(dst_id).cache_desc.num_tensors)
    return src_tensors, dst_tensors


@raises_llm
def copy_kv_blocks(
    src: Cache | int,
    dst: Cache | int,
    src_blocks: Blocks,
    dst_blocks: Blocks,
    *,
    layers: range | None = None,
    tensors_per_layer: int = 2,
    verify: bool = False,
) -> None:
    """Copies dim-0 slice ``src_blocks[j]`` of every src tensor to ``dst_blocks[j]`` of dst.

    Works HOST->HOST, HOST->DEVICE, DEVICE->HOST and DEVICE->DEVICE; ordered on the
    current CUDA stream. Validates everything before any byte moves. ``layers`` (a range)
    copies only those layers' tensors (layer i: tensors ``i*tensors_per_layer ..
    (i+1)*tensors_per_layer-1``), the same layers of both caches. ``verify`` (or the
    option llm.VerifyTransfers): CRC-32C of each source block before, of each destination
    block after; a difference is LLM_FAILED naming the blocks (see torch_kvreg.verify).

    >>> import torch, torch_kvreg
    >>> torch_kvreg.initialize()
    >>> a = torch_kvreg.register_kv_cache([torch.arange(8.).reshape(4, 2)])
    >>> b = torch_kvreg.register_kv_cache([torch.zeros(4, 2)])
    >>> torch_kvreg.copy_kv_blocks(a, b, [3, 0], [0, 1])
    >>> torch_kvreg.finalize()
    """
    src_id, dst_id = cache_id_of(src, "src"), cache_id_of(dst, "dst")
    src_list, dst_list = block_tensor(src_blocks, "src_blocks"), block_tensor(dst_blocks, "dst_blocks")
    checked = verification.wanted(verify)
    with _counted_local_copy() as counted:
        desc = get_cache(src_id).cache_desc
        selected = None if layers is None else _layer_tensors(src_id, dst_id, layers, tensors_per_layer)
        src_tensors, dst_tensors = (None, None) if selected is None else selected
        tensors = desc.num_tensors if selected is None else len(selected[0])
        if checked and _on_host(src_id, dst_id):
            verification.copied("local copy", src_id, dst_id, src_list, dst_list, selected)
            counted.nbytes = src_list.numel() * desc.block_nbytes * tensors
            return
        expected = verification.source_checksums(src_id, src_tensors, src_list) if checked else None
        if selected is None:
            torch.ops.llm.copy_kv_blocks(src_id, dst_id, src_list, dst_list)
        else:
            _C.copy_blocks_of_tensors(src_id, dst_id, src_list, dst_list, *selected)
        if expected is not None:
            landed = verification.landed_checksums(dst_id, dst_tensors, dst_list)
            verification.check_landed("local copy", dst_list.tolist(), expected, landed)
        counted.nbytes = src_list.numel() * desc.block_nbytes * tensors


def _on_host(src_id: int, dst_id: int) -> bool:
    """Whether both caches are HOST memory (a verified copy between them is one pass)."""
    return get_cache(src_id).cache_desc.placement == get_cache(dst_id).cache_desc.placement == Placement.HOST


class _LocalCopyCount:
    nbytes = 0


@contextlib.contextmanager
def _counted_local_copy() -> Iterator[_LocalCopyCount]:
    """Counts a blocking local copy in torch_kvreg.stats(): its bytes (set on the yielded
    object) if it returns, its status if it raises one."""
    counted, start = _LocalCopyCount(), time.perf_counter()
    try:
        yield counted
    except BaseException as exc:
        error = translate(exc)
        status = error.status_code if error is not None else LLMStatusCode.LLM_FAILED
        counters.record("local_copy", 0, time.perf_counter() - start, status)
        raise
    counters.record("local_copy", counted.nbytes, time.perf_counter() - start)


def swap_blocks(src: Cache | int, dst: Cache | int, src_to_dst: Mapping[int, int], *, verify: bool = False) -> None:
    """llm_datadist-style block copy: ``{src_block: dst_block}`` (``verify``: as for
    copy_kv_blocks).

    >>> import torch, torch_kvreg
    >>> torch_kvreg.initialize()
    >>> a = torch_kvreg.register_kv_cache([torch.ones(4, 2)])
    >>> b = torch_kvreg.register_kv_cache([torch.zeros(4, 2)])
    >>> torch_kvreg.swap_blocks(a, b, {0: 2, 1: 3})
    >>> torch_kvreg.finalize()
    """
    if not isinstance(src_to_dst, Mapping):
        raise wrong_type(f"src_to_dst must be a mapping of int to int, got {type(src_to_dst).__name__}")
    copy_kv_blocks(src, dst, list(src_to_dst.keys()), list(src_to_dst.values()), verify=verify)


@raises_llm
def copy_kv_cache(
    src: Cache | int,
    dst: Cache | int,
    src_batch_index: int = 0,
    dst_batch_index: int = 0,
    offset: int = 0,
    size: int = -1,
    *,
    verify: bool = False,
) -> None:
    """Copies ``size`` bytes (-1: the rest) from byte ``offset`` of slice ``src_batch_index``
    to the same place of slice ``dst_batch_index``, for every tensor (``verify``: as for
    copy_kv_blocks, over the bytes copied).

    >>> import torch, torch_kvreg
    >>> torch_kvreg.initialize()
    >>> a = torch_kvreg.register_kv_cache([torch.ones(2, 4)])
    >>> b = torch_kvreg.register_kv_cache([torch.zeros(2, 4)])
    >>> torch_kvreg.copy_kv_cache(a, b, 0, 1, offset=4, size=8)
    >>> torch_kvreg.finalize()
    """
    src_id, dst_id = cache_id_of(src, "src"), cache_id_of(dst, "dst")
    checked = verification.wanted(verify)
    with _counted_local_copy() as counted:
        desc = get_cache(src_id).cache_desc
        src_index, dst_index = as_int(src_batch_index, "src_batch_index"), as_int(dst_batch_index, "dst_batch_index")
        offset, size = as_int(offset, "offset"), as_int(size, "size")
        # (the copy checks the arguments before any byte moves; the CRCs, taken first, too)
        if checked and _on_host(src_id, dst_id):
            slice_bytes = (offset, size)
            one = torch.tensor([src_index]), torch.tensor([dst_index])
            verification.copied("local copy", src_id, dst_id, *one, slice_bytes=slice_bytes)
            counted.nbytes = (desc.block_nbytes - offset if size == -1 else size) * desc.num_tensors
            return
        expected = verification.source_checksums(src_id, None, [src_index], size, offset) if checked else None
        torch.ops.llm.copy_kv_cache(src_id, dst_id, src_index, dst_index, offset, size)
        if expected is not None:
            landed = verification.landed_checksums(dst_id, None, [dst_index], size, offset)
            verification.check_landed("local copy", [dst_index], expected, landed)
        counted.nbytes = (desc.block_nbytes - offset if size == -1 else size) * desc.num_tensors


@raises_llm
def copy_kv_blocks_async(
    src: Cache | int,
    dst: Cache | int,
    src_blocks: Blocks,
    dst_blocks: Blocks,
    *,
    layers: range | None = None,
    tensors_per_layer: int = 2,
    verify: bool = False,
) -> Transfer:
    """Starts ``copy_kv_blocks`` on a worker thread (without the GIL) and returns its
    Transfer. Checked before it returns, as the blocking form; both caches count as in use
    (unregister waits for the copy) until it has finished. ``verify``: the CRCs are taken
    and compared on the worker; blocks that differ are the Transfer's ``failed_blocks``.

    >>> import torch, torch_kvreg
    >>> torch_kvreg.initialize()
    >>> a = torch_kvreg.register_kv_cache([torch.ones(4, 2)])
    >>> b = torch_kvreg.register_kv_cache([torch.zeros(4, 2)])
    >>> transfer = torch_kvreg.copy_kv_blocks_async(a, b, [0, 1], [2, 3])
    >>> transfer.wait(), transfer.status.name
    (16, 'LLM_SUCCESS')
    >>> torch_kvreg.finalize()
    """
    src_id, dst_id = cache_id_of(src, "src"), cache_id_of(dst, "dst")
    src_list, dst_list = block_tensor(src_blocks, "src_blocks"), block_tensor(dst_blocks, "dst_blocks")
    checked = verification.wanted(verify)
    src_cache, dst_cache = get_cache(src_id), get_cache(dst_id)
    if layers is None:
        tensors = None
        counts = (src_cache.cache_desc.num_tensors, dst_cache.cache_desc.num_tensors)
    else:
        tensors = _layer_tensors(src_id, dst_id, layers, tensors_per_layer)
        counts = (len(tensors[0]), len(tensors[1]))
    fields = [
        (
            count,
            int(c.cache_desc.data_type),
            list(c.cache_desc.shape),
            int(c.cache_desc.placement),
            c.cache_desc.device_index,
        )
        for count, c in zip(counts, (src_cache, dst_cache))
    ]
    # The checks of the copy itself, now: a bad call raises here and nothing is queued.
    same = src_id == dst_id and (tensors is None or bool(set(tensors[0]) & set(tensors[1])))
    _C.plan_blocks(fields[0], src_id, fields[1], dst_id, src_list, dst_list, 1 << 20, same)
    nbytes = src_list.numel() * src_cache.cache_desc.block_nbytes * counts[0]
    transfer_blocks = dst_list.tolist()
    on_host = src_cache.cache_desc.placement == dst_cache.cache_desc.placement == Placement.HOST
    transfer = Transfer(nbytes, transfer_blocks, "local copy", "local_copy")
    held = []
    try:
        for cache_id in {src_id, dst_id}:
            _C.hold(cache_id)
            held.append(cache_id)
    except BaseException:
        for cache_id in held:
            _C.unhold(cache_id)
        raise

    def run() -> None:
        try:
            src_tensors, dst_tensors = (None, None) if tensors is None else tensors
            if checked and on_host:
                verification.copied("local copy", src_id, dst_id, src_list, dst_list, tensors)
                transfer.succeed()
                return
            expected = verification.source_checksums(src_id, src_tensors, src_list) if checked else None
            if tensors is None:
                _C.copy_blocks(src_id, dst_id, src_list, dst_list)
            else:
                _C.copy_blocks_of_tensors(src_id, dst_id, src_list, dst_list, *tensors)
            if expected is not None:
                landed = verification.landed_checksums(dst_id, dst_tensors, dst_list)
                verification.check_landed("local copy", transfer_blocks, expected, landed)
            transfer.succeed()
        except Exception as exc:  # reported through the Transfer
            error = translate(exc)
            transfer.fail(
                error
                if isinstance(error, LLMException)
                else make_error(LLMStatusCode.LLM_FAILED, f"local copy failed: {exc}")
            )
        finally:
            for cache_id in held:
                _C.unhold(cache_id)

    _copy_worker().submit(run)
    return transfer


COPY_STRATEGIES = (
    "auto",
    "memcpy",
    "stream",
    "stream_noprefetch",
    "memcpy:single",
    "stream:single",
    "stream_noprefetch:single",
)


def copy_strategy() -> str:
    """How CPU block copies are made in this process: "auto" until the first large copy
    (32 MiB or more) has measured the candidates on its own blocks, then the fastest of
    "memcpy", "stream" (streaming stores, software prefetch, four blocks interleaved) and
    "stream_noprefetch", each on all of torch's threads or, with ":single", on one (where
    cores share memory bandwidth, a second thread can cost more than it adds). The
    environment variable TORCH_KVREG_COPY sets it at start.

    >>> copy_strategy() in COPY_STRATEGIES
    True
    """
    return _C.copy_strategy()


@raises_llm
def set_copy_strategy(name: str) -> None:
    """Sets the CPU copy strategy ("auto" measures again on the next large copy).

    >>> before = copy_strategy()
    >>> set_copy_strategy("memcpy"); copy_strategy()
    'memcpy'
    >>> set_copy_strategy(before)
    """
    if not isinstance(name, str):
        raise wrong_type(f"the copy strategy must be a str, got {type(name).__name__}")
    _C.set_copy_strategy(name)
