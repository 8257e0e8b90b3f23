"""Lifecycle, limits, usage and registration: typed wrappers over the native registry.

The native registry (csrc/registry.cpp) owns every fact; these functions check Python
types, call it, and turn its errors into the LLMException family.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
from collections.abc import Mapping, Sequence

import torch

from . import (
    _C,
    _ops,  # noqa: F401  (loads the native library and the op registrations)
    display,
    lifecycle,
)
from .errors import LLMStatusCode, make_error, param_invalid, raises_llm, wrong_type
from .options import (
    DEFAULT_SYNC_KV_CACHE_WAIT_TIME_MS,
    OPTION_DEVICE_ID,
    OPTION_SYNC_KV_CACHE_WAIT_TIME,
    kept,
    native_options,
)

# Also imported from here by the remote layer and the vLLM connector.
from .options import OPTION_LINK_SECRET as OPTION_LINK_SECRET
from .options import OPTION_LISTEN_IP_INFO as OPTION_LISTEN_IP_INFO
from .options import parse_listen_address as parse_listen_address
from .types import (
    Cache,
    CacheDesc,
    DataType,
    Limits,
    LlmRole,
    Placement,
    RegisterCfg,
    Usage,
    as_int,
    format_bytes,
    tensor_list,
)

log = logging.getLogger("torch_kvreg")
_MAX_ADDRESS = 2**63 - 1


def _limits(native: _C.Limits) -> Limits:
    return Limits(native.max_addrs, native.max_device_bytes, native.max_host_bytes)


def default_limits() -> Limits:
    """The caps in force when ``initialize`` is given no ``limits`` (defined in C++).

    >>> default_limits().max_addrs
    240
    """
    return _limits(_C.default_limits())


@raises_llm
def initialize(
    cluster_id: int = 0,
    role: LlmRole | int = LlmRole.MIX,
    *,
    device_id: int | None = None,
    options: Mapping[str, str] | None = None,
    limits: Limits | None = None,
) -> None:
    """Starts the registry. Again with the same arguments: no-op; with others: LLM_FAILED.

    >>> import torch_kvreg
    >>> torch_kvreg.initialize(cluster_id=0, options={"llm.SyncKvCacheWaitTime": "2000"})
    >>> torch_kvreg.is_initialized()
    True
    >>> torch_kvreg.finalize()
    """
    cluster_id = as_int(cluster_id, "cluster_id")
    if cluster_id < 0:
        raise param_invalid(f"cluster_id must be >= 0, got {cluster_id}")
    if isinstance(role, bool) or not isinstance(role, int):
        raise wrong_type(f"role must be an LlmRole, got {type(role).__name__}")
    try:
        role = LlmRole(role)
    except ValueError:
        raise param_invalid(f"role {role!r} is not an LlmRole (1, 2 or 3)") from None
    if device_id is not None:
        device_id = as_int(device_id, "device_id")
        if device_id < 0:
            raise param_invalid(f"device_id must be >= 0, got {device_id}")
    checked = native_options(options, device_id)
    if device_id is None and OPTION_DEVICE_ID in checked:
        device_id = int(checked[OPTION_DEVICE_ID])
    if limits is None:
        limits = default_limits()
    if not isinstance(limits, Limits):
        raise wrong_type(f"limits must be a torch_kvreg.Limits, got {type(limits).__name__}")
    caps = tuple(as_int(v, "limits field") for v in (limits.max_addrs, limits.max_device_bytes, limits.max_host_bytes))
    if any(v < 0 for v in caps) or any(v > _MAX_ADDRESS for v in caps):
        raise param_invalid(f"limits must be between 0 and 2**63-1, got {limits!r}")
    first_time = not _C.is_initialized()
    _C.initialize(
        cluster_id=cluster_id,
        role=int(role),
        device_id=-1 if device_id is None else device_id,
        options=kept(checked),
        max_addrs=caps[0],
        max_device_bytes=caps[1],
        max_host_bytes=caps[2],
        wait_ms=int(checked.get(OPTION_SYNC_KV_CACHE_WAIT_TIME, DEFAULT_SYNC_KV_CACHE_WAIT_TIME_MS)),
    )
    if first_time:
        try:
            lifecycle.initialized(checked)
        except BaseException:
            with contextlib.suppress(Exception):
                lifecycle.finalizing()
            _C.finalize()
            raise


def finalize() -> None:
    """Unregisters every cache and resets all state; no-op when not initialized.

    Transfers still in flight are waited for, at most ``llm.SyncKvCacheWaitTime``; a cache
    one of them still uses after that is unregistered all the same, its memory kept (and
    not registrable again) until that transfer ends, and a WARNING is logged.

    >>> import torch_kvreg
    >>> torch_kvreg.finalize()
    >>> torch_kvreg.is_initialized()
    False
    """
    try:
        lifecycle.finalizing()
    finally:
        wait_ms = option(OPTION_SYNC_KV_CACHE_WAIT_TIME)
        kept = _C.finalize()
        if kept:
            log.warning(
                "finalize: %d cache(s) still had transfers in flight after %s ms; unregistered, their "
                "memory is kept until those transfers end",
                kept,
                wait_ms or DEFAULT_SYNC_KV_CACHE_WAIT_TIME_MS,
            )


def is_initialized() -> bool:
    """Whether ``initialize`` has run (and ``finalize`` has not since).

    >>> import torch_kvreg
    >>> torch_kvreg.initialize()
    >>> torch_kvreg.is_initialized()
    True
    >>> torch_kvreg.finalize()
    >>> torch_kvreg.is_initialized()
    False
    """
    return bool(_C.is_initialized())


def option(key: str, default: str | None = None) -> str | None:
    """The value of an ``initialize`` option now in force (the link secret only as a digest)."""
    return _C.config().options.get(key, default)


def cluster_id() -> int:
    """The cluster id given to ``initialize``."""
    return _C.config().cluster_id


def limits() -> Limits:
    """The caps in force: defaults of 240 addresses, 50 GiB device and 20 GiB host memory.

    >>> import torch_kvreg
    >>> torch_kvreg.limits().max_host_bytes == 20 * 2**30
    True
    """
    return _limits(_C.limits())


def usage() -> Usage:
    """What is registered now.

    >>> import torch, torch_kvreg
    >>> torch_kvreg.initialize()
    >>> cache = torch_kvreg.register_kv_cache([torch.zeros(4, 8), torch.zeros(4, 8)])
    >>> torch_kvreg.usage()
    Usage(num_caches=1, num_addrs=2, device_bytes=0 B, host_bytes=256 B)
    >>> torch_kvreg.finalize()
    """
    native = _C.usage()
    return Usage(native.num_caches, native.num_addrs, native.device_bytes, native.host_bytes)


def cache_from_native(record: _C.CacheRecord) -> Cache:
    """A Cache from the record that ``_C.get_cache`` returns."""
    desc = _desc(record.num_tensors, record.data_type, tuple(record.shape), record.placement, record.device_index)
    return Cache(record.cache_id, desc, tuple(record.addrs), tuple(record.layer_names), tuple(record.name_layers))


@functools.lru_cache(maxsize=1024)
def _desc(num_tensors: int, data_type: int, shape: tuple[int, ...], placement: int, device_index: int) -> CacheDesc:
    # Descs are values: one object per distinct desc, so that every transfer does not check
    # and size the same desc again (each remote start looks its local cache up).
    return CacheDesc(num_tensors, DataType(data_type), shape, Placement(placement), device_index)


def cache_id_of(cache: Cache | int, name: str = "cache") -> int:
    if isinstance(cache, Cache):
        return cache.cache_id
    return as_int(cache, name)


@raises_llm
def get_cache(cache_id: int) -> Cache:
    """The registered cache with this id; LLM_KV_CACHE_NOT_EXIST if there is none.

    >>> import torch, torch_kvreg
    >>> torch_kvreg.initialize()
    >>> cache = torch_kvreg.register_kv_cache([torch.zeros(4, 8)])
    >>> torch_kvreg.get_cache(cache.cache_id) == cache
    True
    >>> torch_kvreg.finalize()
    """
    return cache_from_native(_C.get_cache(cache_id_of(cache_id, "cache_id")))


def remote_accessible(cache: Cache | int) -> bool:
    """Whether remote peers may pull from or push to this cache."""
    return raises_llm(_C.get_cache)(cache_id_of(cache)).remote_accessible


@raises_llm
def cache_keys(cache: Cache | int) -> list[str]:
    """The keys a cache was registered with (removed ones read "").

    >>> import torch, torch_kvreg
    >>> torch_kvreg.initialize()
    >>> cache = torch_kvreg.register_kv_cache(torch.zeros(4, 2), keys=["req-7", "", "req-9"])
    >>> torch_kvreg.cache_keys(cache), torch_kvreg.find_cache_key("req-9") == (cache.cache_id, 2)
    (['req-7', '', 'req-9'], True)
    >>> torch_kvreg.finalize()
    """
    return list(_C.cache_keys(cache_id_of(cache)))


@raises_llm
def find_cache_key(key: str) -> tuple[int, int]:
    """(cache id, slice index) of the live cache registered with ``key``."""
    if not isinstance(key, str):
        raise wrong_type(f"key must be a str, got {type(key).__name__}")
    cache_id, index = _C.find_key(key)
    return int(cache_id), int(index)


@raises_llm
def remove_cache_key(key: str) -> None:
    """Forgets a key; the cache stays registered. LLM_KV_CACHE_NOT_EXIST if unknown."""
    if not isinstance(key, str):
        raise wrong_type(f"key must be a str, got {type(key).__name__}")
    _C.remove_key(key)


def registered_caches() -> list[Cache]:
    """Every live registration, by increasing id.

    >>> import torch, torch_kvreg
    >>> torch_kvreg.initialize()
    >>> first = torch_kvreg.register_kv_cache(torch.zeros(4))
    >>> second = torch_kvreg.register_kv_cache(torch.zeros(4))
    >>> torch_kvreg.registered_caches() == [first, second]
    True
    >>> torch_kvreg.finalize()
    """
    caches = []
    for cache_id in _C.cache_ids():
        try:
            caches.append(cache_from_native(_C.get_cache(cache_id)))
        except RuntimeError:  # unregistered by another thread meanwhile
            continue
    return caches


def _cfg_args(cfg: object) -> tuple[bool, int]:
    if cfg is None:
        cfg = RegisterCfg()
    if not isinstance(cfg, RegisterCfg):
        raise wrong_type(f"cfg must be a torch_kvreg.RegisterCfg, got {type(cfg).__name__}")
    remote = -1 if cfg.remote_accessible is None else int(cfg.remote_accessible)
    return cfg.pin_host_memory, remote


def _keys(keys: Sequence[str]) -> list[str]:
    if isinstance(keys, (str, bytes)) or not isinstance(keys, Sequence):
        raise wrong_type(f"keys must be a sequence of str, got {type(keys).__name__}")
    for i, key in enumerate(keys):
        if not isinstance(key, str):
            raise wrong_type(f"keys[{i}] is a {type(key).__name__}, not a str")
    return list(keys)


@raises_llm
def register_kv_cache(
    tensors_or_desc: torch.Tensor | Sequence[torch.Tensor] | CacheDesc,
    addrs_or_cfg: Sequence[int] | RegisterCfg | None = None,
    cfg: RegisterCfg | None = None,
    *,
    keys: Sequence[str] = (),
) -> Cache:
    """Registers a KV cache and returns it with its new id.

    Two forms: ``register_kv_cache(tensors, cfg=None)`` derives the CacheDesc from the
    tensors and keeps their storages alive until unregistered;
    ``register_kv_cache(cache_desc, addrs, cfg=None)`` registers memory from another
    allocator, which the caller keeps alive.

    ``keys`` name dim-0 slices for peers (LLM-DataDist's cache keys): ``keys[i]`` names
    slice i, "" leaves it unnamed; a key is unique among live registrations.

    >>> import torch, torch_kvreg
    >>> torch_kvreg.initialize()
    >>> k, v = torch.zeros(8, 16, 2, 4), torch.zeros(8, 16, 2, 4)
    >>> cache = torch_kvreg.register_kv_cache([k, v])
    >>> cache.cache_desc.shape, cache.tensor_addrs == (k.data_ptr(), v.data_ptr())
    ((8, 16, 2, 4), True)
    >>> torch_kvreg.unregister_kv_cache(cache)
    >>> torch_kvreg.finalize()
    """
    if isinstance(tensors_or_desc, CacheDesc):
        desc = tensors_or_desc
        addrs = addrs_or_cfg
        if isinstance(addrs, (str, bytes, RegisterCfg)) or not isinstance(addrs, Sequence):
            raise wrong_type(f"addrs must be a sequence of ints, got {type(addrs).__name__}")
        addr_list = [as_int(a, f"addrs[{i}]") for i, a in enumerate(addrs)]
        for i, addr in enumerate(addr_list):
            if not 0 < addr <= _MAX_ADDRESS:
                raise param_invalid(f"addrs[{i}] = {addr} is not a valid (non-null, 63-bit) address")
        pin, remote = _cfg_args(cfg)
        fields = (
            desc.num_tensors,
            int(desc.data_type),
            list(desc.shape),
            int(desc.placement),
            desc.device_index,
            addr_list,
            pin,
            remote,
        )
        if keys:
            cache_id = _C.register_addrs(*fields, _keys(keys))
        else:
            cache_id = torch.ops.llm.register_kv_cache.addrs(*fields)
    else:
        if cfg is not None and addrs_or_cfg is not None:
            raise wrong_type("the tensor form takes (tensors, cfg); addrs are only for the CacheDesc form")
        tensors = tensor_list(tensors_or_desc)
        pin, remote = _cfg_args(cfg if cfg is not None else addrs_or_cfg)
        if keys:
            cache_id = _C.register_tensors(tensors, pin, remote, _keys(keys))
        else:
            cache_id = torch.ops.llm.register_kv_cache.default(tensors, pin, remote)
    cache = get_cache(int(cache_id))
    try:
        lifecycle.registered(cache)
    except BaseException:
        torch.ops.llm.unregister_kv_cache(cache.cache_id)
        raise
    return cache


@raises_llm
def unregister_kv_cache(cache: Cache | int) -> None:
    """Unregisters a cache, after any transfer in flight on it has finished.

    >>> import torch, torch_kvreg
    >>> torch_kvreg.initialize()
    >>> cache = torch_kvreg.register_kv_cache(torch.zeros(4, 4))
    >>> torch_kvreg.unregister_kv_cache(cache.cache_id)
    >>> torch_kvreg.usage().num_caches
    0
    >>> torch_kvreg.finalize()
    """
    cache_id = cache_id_of(cache)
    _C.get_cache(cache_id)  # LLM_KV_CACHE_NOT_EXIST before touching anything else
    lifecycle.unregistering(cache_id)
    torch.ops.llm.unregister_kv_cache(cache_id)


def registered_caches_table() -> display.Table:
    """One row per registered cache: id, placement, dtype, shape, tensors, bytes, whether
    remote peers may reach it and the transfers holding it now. Prints as aligned text,
    renders as a table in Jupyter; a snapshot, so it renders even after its caches leave.

    >>> import torch, torch_kvreg
    >>> torch_kvreg.initialize()
    >>> _ = torch_kvreg.register_kv_cache([torch.zeros(4, 8), torch.zeros(4, 8)])
    >>> print(torch_kvreg.registered_caches_table())  # doctest: +ELLIPSIS +NORMALIZE_WHITESPACE
    id  placement  dtype     shape   tensors  bytes  remote  in flight
    ...
    ... HOST DT_FLOAT (4, 8) 2 256 B no 0
    >>> torch_kvreg.finalize()
    """
    rows = []
    if _C.is_initialized():
        for cache_id in _C.cache_ids():
            try:
                record = _C.get_cache(cache_id)
            except RuntimeError:  # unregistered since cache_ids()
                continue
            desc = cache_from_native(record).cache_desc
            rows.append(
                [
                    cache_id,
                    desc.placement.name,
                    desc.data_type.name,
                    tuple(desc.shape),
                    desc.num_tensors,
                    format_bytes(desc.nbytes),
                    "yes" if record.remote_accessible else "no",
                    _C.in_flight(cache_id),
                ]
            )
    return display.Table(["id", "placement", "dtype", "shape", "tensors", "bytes", "remote", "in flight"], rows)


def require_initialized() -> None:
    if not _C.is_initialized():
        raise make_error(
            LLMStatusCode.LLM_FAILED, "torch_kvreg is not initialized; call torch_kvreg.initialize() first"
        )


atexit.register(finalize)
