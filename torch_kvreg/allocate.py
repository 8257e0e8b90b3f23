"""Caches torch_kvreg allocates: HOST memory in a memfd that a same-host peer can map.

``allocate_kv_cache`` puts a cache's tensors in one memfd (each tensor page-aligned),
registers them like ``register_kv_cache`` (same limits, usage and errors) and remembers
which descriptor holds them. A peer on this host that leases the cache (remote-accessible
caches only) is told that descriptor, maps it once and then copies blocks from and into
it with the local copy kernels (remote/shared_memory.py) instead of a system call per run.

The memory goes when the cache is unregistered and no tensor over it is referenced any
more: every tensor's storage holds the mapping (and with it the descriptor).
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import _C
from .errors import LLMStatusCode, make_error, param_invalid, raises_llm, wrong_type
from .registry import limits, register_kv_cache, require_initialized, usage
from .types import Cache, DataType, RegisterCfg, as_int

# Every memfd's name starts with this; a random suffix tells a peer it opened the right one.
MEMFD_PREFIX = "torch_kvreg-"
_PAGE = 4096
_MAX_RANK = 32
_MAX_TENSORS = 240  # per registration, as register_kv_cache
_MAX_BYTES = 2**62


class SharedRegion(NamedTuple):
    """Where an allocated cache lives, as a peer needs it: the memfd's name, the descriptor
    holding it in this process, and the mapping's base address and size here."""

    name: str
    fd: int
    base: int
    size: int


_lock = threading.Lock()
_shared: dict[int, SharedRegion] = {}  # cache id -> its region (ids are never reused)


def shared_region(cache_id: int) -> SharedRegion | None:
    """The region of a registered cache that allocate_kv_cache made, else None."""
    with _lock:
        return _shared.get(cache_id)


def _forget_unregistered() -> None:
    """Drops the entries of caches no longer registered (caller holds _lock)."""
    live = set(_C.cache_ids()) if _C.is_initialized() else set()
    for cache_id in [cache_id for cache_id in _shared if cache_id not in live]:
        del _shared[cache_id]


def _checked(num_tensors: object, shape: object, dtype: object) -> tuple[int, tuple[int, ...], torch.dtype]:
    count = as_int(num_tensors, "num_tensors")
    if not 1 <= count <= _MAX_TENSORS:
        raise param_invalid(f"num_tensors must be 1 to {_MAX_TENSORS}, got {count}")
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (Sequence, torch.Size)):
        raise wrong_type(f"shape must be a sequence of ints, got {type(shape).__name__}")
    dims = tuple(as_int(d, "shape entry") for d in shape)
    if not 1 <= len(dims) <= _MAX_RANK:
        raise param_invalid(f"shape must have 1 to {_MAX_RANK} dims, got {len(dims)}")
    if any(d <= 0 for d in dims):
        raise param_invalid(f"shape {dims} has a dim that is not positive")
    if isinstance(dtype, DataType):
        dtype = dtype.to_torch()
    DataType.from_torch(dtype)  # type: ignore[arg-type]  (raises for a dtype with no LLM DataType)
    assert isinstance(dtype, torch.dtype)
    return count, dims, dtype


def _check_limits(count: int, nbytes: int) -> None:
    """The registry's caps, checked before any memory is made (the registration checks them
    again, atomically): a refused allocation then leaves nothing behind, not even memory
    that a traceback would keep until the garbage collector runs."""
    caps, used = limits(), usage()
    if used.num_addrs + count > caps.max_addrs:
        raise make_error(
            LLMStatusCode.LLM_OUT_OF_MEMORY,
            f"registering {count} addresses would make {used.num_addrs + count}, over the limit of {caps.max_addrs}",
        )
    if used.host_bytes + nbytes > caps.max_host_bytes:
        raise make_error(
            LLMStatusCode.LLM_OUT_OF_MEMORY,
            f"registering {nbytes} host bytes would make {used.host_bytes + nbytes}, "
            f"over the limit of {caps.max_host_bytes}",
        )


@raises_llm
def allocate_kv_cache(
    num_tensors: int,
    shape: Sequence[int],
    dtype: torch.dtype | DataType,
    cfg: RegisterCfg | None = None,
) -> tuple[Cache, list[torch.Tensor]]:
    """Allocates ``num_tensors`` zero-filled HOST tensors of ``shape`` and ``dtype`` in memory
    that same-host peers can map, registers them as one cache and returns it with them.

    A peer on this host linked to this process (after the link's handshake, and only for a
    cache registered remote-accessible) maps the memory once; its pulls from and pushes
    into the cache are then copies in its own address space. The memory is freed once the
    cache is unregistered and no returned tensor is referenced. Errors as
    ``register_kv_cache`` gives them (limits: LLM_OUT_OF_MEMORY); a bad count, shape or
    dtype is LLM_PARAM_INVALID. A failed call leaves nothing allocated or registered.

    >>> import torch, torch_kvreg
    >>> torch_kvreg.initialize()
    >>> cache, (k, v) = torch_kvreg.allocate_kv_cache(2, (16, 4, 8), torch.float16)
    >>> k.shape, cache.tensor_addrs == (k.data_ptr(), v.data_ptr()), int(k.abs().sum())
    (torch.Size([16, 4, 8]), True, 0)
    >>> torch_kvreg.unregister_kv_cache(cache)
    >>> torch_kvreg.finalize()
    """
    require_initialized()
    count, dims, torch_dtype = _checked(num_tensors, shape, dtype)
    if cfg is not None and not isinstance(cfg, RegisterCfg):
        raise wrong_type(f"cfg must be a torch_kvreg.RegisterCfg, got {type(cfg).__name__}")
    tensor_nbytes = torch_dtype.itemsize
    for d in dims:
        tensor_nbytes *= d
    stride = -(-tensor_nbytes // _PAGE) * _PAGE
    if stride * count > _MAX_BYTES:
        raise make_error(LLMStatusCode.LLM_OUT_OF_MEMORY, f"{count} tensors of {tensor_nbytes} bytes are too large")
    _check_limits(count, tensor_nbytes * count)
    name = f"{MEMFD_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
    region = _C.SharedRegion.create(name, stride * count)  # raises_llm translates its errors
    tensors = [_C.shared_region_bytes(region, i * stride, tensor_nbytes).view(torch_dtype).view(dims) for i in range(count)]
    entry = SharedRegion(name, region.fd, region.base, region.size)
    del region  # the tensors hold it now
    try:
        cache = register_kv_cache(tensors, cfg)
    except BaseException:
        tensors.clear()  # (the registry's own frames in the traceback still hold them until collected)
        raise
    with _lock:
        _forget_unregistered()
        _shared[cache.cache_id] = entry
    return cache, tensors
