"""Caches torch_kvreg allocates: HOST memory in a memfd that a same-host peer can map.

``allocate_kv_cache`` puts a cache's tensors in one memfd (each tensor page-aligned) and
registers them like ``register_kv_cache`` (same limits, usage and errors); the native side
lists the regions it created, so that a lease on any cache registered over one of them
says which descriptor holds it. A peer on this host that leases the cache (remote-accessible
caches only) is told that descriptor, maps it once and then copies blocks from and into
it with the local copy kernels (remote/shared_memory.py) instead of a system call per run.

The memory goes when the cache is unregistered and no tensor over it is referenced any
more: every tensor's storage holds the mapping (and with it the descriptor).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import _C
from .errors import LLMStatusCode, make_error, param_invalid, raises_llm, wrong_type
from .registry import limits, register_kv_cache, require_initialized, usage
from .types import Cache, DataType, Placement, RegisterCfg, as_int

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


def shared_region(cache: Cache) -> SharedRegion | None:
    """The region a registered HOST cache lies in, when every tensor of it lies in one
    region that allocate_kv_cache (or the vLLM connector's allocation context) made here;
    else None. However the cache was registered: layer views of one backing buffer too."""
    desc = cache.cache_desc
    if desc.placement != Placement.HOST or not cache.tensor_addrs:
        return None
    found = _C.shared_region_find(cache.tensor_addrs[0], desc.tensor_nbytes)
    if found is None:
        return None
    region = SharedRegion(found.name, found.fd, found.base, found.size)
    del found  # (a reference held here would keep the memory)
    end = region.base + region.size
    if all(region.base <= addr and addr + desc.tensor_nbytes <= end for addr in cache.tensor_addrs):
        return region
    return None


def shared_bytes(nbytes: int) -> torch.Tensor:
    """A zero-filled uint8 CPU tensor of ``nbytes`` in a new shared region (freed with the
    last tensor over it): what allocate_kv_cache's tensors are views of."""
    name = f"{MEMFD_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
    return _C.shared_region_bytes(_C.shared_region_create(name, nbytes), 0, nbytes)


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
    if not isinstance(dtype, torch.dtype):
        raise wrong_type(f"dtype must be a torch.dtype or a DataType, got {type(dtype).__name__}")
    DataType.from_torch(dtype)  # raises for a dtype with no LLM DataType
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
    *,
    keys: Sequence[str] = (),
) -> tuple[Cache, list[torch.Tensor]]:
    """Allocates ``num_tensors`` zero-filled HOST tensors of ``shape`` and ``dtype`` in memory
    that same-host peers can map, registers them as one cache and returns it with them.

    A peer on this host linked to this process (after the link's handshake, and only for a
    cache registered remote-accessible) maps the memory once; its pulls from and pushes
    into the cache are then copies in its own address space. The memory is freed once the
    cache is unregistered and no returned tensor is referenced. Errors as
    ``register_kv_cache`` gives them (limits: LLM_OUT_OF_MEMORY); a bad count, shape or
    dtype is LLM_PARAM_INVALID. A failed call leaves nothing allocated or registered.
    ``keys`` name dim-0 slices for peers, as in ``register_kv_cache``.

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
    backing = shared_bytes(stride * count)  # raises_llm translates its errors
    tensors = [backing[i * stride : i * stride + tensor_nbytes].view(torch_dtype).view(dims) for i in range(count)]
    del backing  # the tensors hold the region now
    try:
        cache = register_kv_cache(tensors, cfg, keys=keys)
    except BaseException:
        tensors.clear()  # (the registry's own frames in the traceback still hold them until collected)
        raise
    return cache, tensors
