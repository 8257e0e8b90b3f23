"""The remote layer's public functions: links, transfers between processes and hosts over
NIXL (optional extra ``torch_kvreg[nixl]``), notices.

The data path is NIXL's (UCX backend): whole tensors are registered with NIXL once and
blocks are addressed by offset, with runs of consecutive blocks coalesced into one
descriptor. The control path (agent metadata and one cache-table entry per transfer) is
a small versioned protocol, see protocol.py.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from .. import _C, lifecycle
from ..errors import LLMException, LLMStatusCode, make_error, param_invalid, raises_llm, wrong_type
from ..inflight import Transfer
from ..registry import (
    DEFAULT_SYNC_KV_CACHE_WAIT_TIME_MS,
    OPTION_LISTEN_IP_INFO,
    OPTION_SYNC_KV_CACHE_WAIT_TIME,
    cluster_id,
    get_cache,
    option,
    parse_listen_address,
    registered_caches,
    remote_accessible,
    require_initialized,
)
from ..types import Blocks, Cache, CacheIndex, ClusterInfo, LlmRole, as_int, block_tensor
from . import plan
from . import verify as remote_checks
from .auth import LinkSecret
from .engine import Engine
from .handshake import cluster_list, link_timeout

_engine: Engine | None = None
_engine_lock = threading.Lock()
_generation = 0  # counts stop_remote calls (under _engine_lock): an engine made late is not kept
_link_secret: LinkSecret | None = None  # from initialize's options; peers must prove it


def nixl_available() -> bool:
    """Whether the ``nixl`` extra is installed (the module ``nixl_cu12`` can be imported).

    >>> import importlib.util
    >>> nixl_available() == (importlib.util.find_spec("nixl_cu12") is not None)
    True
    """
    return importlib.util.find_spec("nixl_cu12") is not None


def _require_nixl() -> None:
    if not nixl_available():
        raise make_error(
            LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
            "remote transfers need NIXL: pip install 'torch_kvreg[nixl]'",
        )


def _wait_ms() -> int:
    return int(option(OPTION_SYNC_KV_CACHE_WAIT_TIME) or DEFAULT_SYNC_KV_CACHE_WAIT_TIME_MS)


def current_engine() -> Engine | None:
    """This process's engine, None before the first link, listen or transfer (a hook for
    diagnostics and tests: the engine is no public API)."""
    return _engine


def existing_engine() -> Engine | None:
    """This process's engine if one was made (initialize must have run)."""
    require_initialized()
    _require_nixl()
    return _engine


def get_engine() -> Engine:
    """This process's engine, created on first use (initialize must have run)."""
    engine = _engine
    if engine is not None:  # finalize drops it before the registry stops
        return engine
    engine = existing_engine() or _make_engine()
    assert engine is not None  # (made, or its making raised)
    return engine


def _make_engine(generation: int | None = None) -> Engine | None:
    """The engine, made unless it exists. With ``generation``: on the thread a decoder's
    initialize starts, so that the first link_clusters waits only for what is left of the
    ~100 ms UCX takes to make a NIXL agent; nothing once finalize ran since, and a failure
    is left for the first link to meet again and report."""
    global _engine
    with _engine_lock:
        if _engine is None and generation in (None, _generation):
            try:
                engine = Engine(cluster_id(), _wait_ms(), _link_secret)
                for cache in registered_caches():
                    if remote_accessible(cache):
                        engine.register(cache)
                _engine = engine
            except Exception:
                if generation is None:
                    raise
        return _engine


# --- the registry's lifecycle, as this layer hears it ----------------------------------------
class _RemoteLifecycle:
    """Subscribed to the registry's lifecycle hooks (the registry does not know this layer)."""

    def initialized(self, options: Mapping[str, str]) -> None:
        global _link_secret
        _link_secret = LinkSecret.from_options(options)
        if OPTION_LISTEN_IP_INFO in options:
            start_listening(options[OPTION_LISTEN_IP_INFO])
        elif _C.config().role == LlmRole.DECODER and nixl_available():  # it links: its engine is made meanwhile
            threading.Thread(target=_make_engine, args=(_generation,), name="kvreg-engine", daemon=True).start()

    def registered(self, cache: Cache) -> None:
        engine = _engine
        if engine is not None and remote_accessible(cache):
            engine.register(cache)

    def unregistering(self, cache_id: int) -> None:
        engine = _engine
        if engine is not None:
            engine.unregister(cache_id)

    def finalizing(self) -> None:
        global _link_secret
        try:
            stop_remote()
        finally:
            _link_secret = None


def start_listening(address: str) -> None:
    """Serves links on ``address`` ("ip:port"): what initialize(options={"llm.ListenIpInfo":
    ...}) does."""
    host, port = parse_listen_address(address)
    get_engine().listen(host, port)


def stop_remote() -> None:
    """Unlinks, stops serving, deregisters from NIXL (finalize does it)."""
    global _engine, _generation
    with _engine_lock:
        engine, _engine = _engine, None
        _generation += 1
    if engine is not None:
        engine.close()


lifecycle.subscribe(_RemoteLifecycle())


# --- public API ----------------------------------------------------------------------------
def listen_address() -> str | None:
    """The bound "ip:port" of this process's control server, or None when not listening.

    >>> import torch_kvreg as kv
    >>> print(kv.listen_address())
    None
    >>> if nixl_available():
    ...     kv.initialize(options={"llm.ListenIpInfo": "127.0.0.1:0"})
    ...     host, port = kv.listen_address().split(":")
    ...     assert host == "127.0.0.1" and int(port) > 0
    ...     kv.finalize()
    """
    engine = _engine
    return None if engine is None else engine.listen_address


@raises_llm
def link_clusters(clusters: Sequence[ClusterInfo], timeout_ms: int = 3000) -> tuple[LLMStatusCode, list[LLMStatusCode]]:
    """Links to remote clusters; returns (overall status, one status per cluster).

    >>> import torch_kvreg as kv
    >>> kv.initialize(cluster_id=1)
    >>> kv.link_clusters([])
    (<LLMStatusCode.LLM_SUCCESS: 0>, [])
    >>> kv.finalize()
    """
    clusters = cluster_list(clusters)
    timeout_ms = link_timeout(timeout_ms)
    if len(clusters) > MAX_CLUSTERS:
        code = LLMStatusCode.LLM_CLUSTER_NUM_EXCEED_LIMIT
        return code, [code] * len(clusters)
    if not clusters:
        require_initialized()
        return LLMStatusCode.LLM_SUCCESS, []
    started = time.perf_counter()
    engine = get_engine()
    waited_ms = (time.perf_counter() - started) * 1000.0  # the first link's "agent" phase
    statuses = [engine.link(info, timeout_ms, 0.0 if i else waited_ms) for i, info in enumerate(clusters)]
    failed = [s for s in statuses if s != LLMStatusCode.LLM_SUCCESS]
    return (failed[0] if failed else LLMStatusCode.LLM_SUCCESS), statuses


@raises_llm
def unlink_clusters(
    clusters: Sequence[ClusterInfo], timeout_ms: int = 3000, force: bool = False
) -> tuple[LLMStatusCode, list[LLMStatusCode]]:
    """Unlinks remote clusters; returns (overall status, one status per cluster)."""
    clusters = cluster_list(clusters)
    link_timeout(timeout_ms)
    if len(clusters) > MAX_CLUSTERS:
        code = LLMStatusCode.LLM_CLUSTER_NUM_EXCEED_LIMIT
        return code, [code] * len(clusters)
    engine = existing_engine()
    if engine is None:
        code = LLMStatusCode.LLM_NOT_YET_LINK
        return (code if clusters else LLMStatusCode.LLM_SUCCESS), [code] * len(clusters)
    statuses = [engine.unlink(info.remote_cluster_id, bool(force)) for info in clusters]
    failed = [s for s in statuses if s != LLMStatusCode.LLM_SUCCESS]
    return (failed[0] if failed else LLMStatusCode.LLM_SUCCESS), statuses


MAX_CLUSTERS = 16


def _cache_index(index: object) -> CacheIndex:
    if not isinstance(index, CacheIndex):
        raise wrong_type(f"expected a CacheIndex, got {type(index).__name__}")
    as_int(index.cluster_id, "cluster_id")
    as_int(index.cache_id, "cache_id")
    as_int(index.batch_index, "batch_index")
    return index


def _local(cache: Cache | int) -> Cache:
    return get_cache(cache.cache_id if isinstance(cache, Cache) else cache)


MAX_NOTIFY_BYTES = 1024


def _notify(notify: object) -> bytes:
    if notify is None:
        return b""
    if isinstance(notify, str):
        notify = notify.encode("utf-8")
    if not isinstance(notify, (bytes, bytearray)):
        raise wrong_type(f"notify must be str, bytes or None, got {type(notify).__name__}")
    if len(notify) > MAX_NOTIFY_BYTES:
        raise param_invalid(f"notify has {len(notify)} bytes, at most {MAX_NOTIFY_BYTES} allowed")
    return bytes(notify)


def start_blocks(
    operation: str,
    local: Cache,
    cluster_id: int,
    remote_ref: plan.RemoteRef,
    src_blocks: Blocks,
    dst_blocks: Blocks,
    local_layers: range | None = None,
    remote_layers: range | None = None,
    tensors_per_layer: int = 2,
    notify: str | bytes | None = None,
    background: bool = False,
) -> Transfer:
    """Starts moving blocks between a local cache and a remote one (by id or key),
    optionally a layer subset of each; the remote side is the source for READ, the
    destination for WRITE. Everything is validated before this returns. ``background``:
    the engine's progress thread posts the request (NIXL may move every byte inside the
    post, as UCX does between processes of one host), so the caller goes on at once."""
    engine = get_engine()
    message = _notify(notify)
    src_list, dst_list = block_tensor(src_blocks, "src_blocks"), block_tensor(dst_blocks, "dst_blocks")
    read = operation == "READ"
    tensors = plan.selection(local.cache_desc, local_layers, remote_layers, tensors_per_layer, read)
    segments = plan.planned(
        local,
        remote_ref,
        tensors,
        read,
        lambda src, dst, _index: plan.block_segments(src[0], src[1], dst[0], dst[1], src_list, dst_list),
    )
    hashable = all(layers is None or type(layers) is range for layers in (local_layers, remote_layers))
    route_key = (
        (operation, cluster_id, remote_ref, local.cache_id, local_layers, remote_layers, tensors_per_layer)
        if hashable
        else None
    )
    return engine.start_transfer(
        operation,
        local,
        cluster_id,
        remote_ref,
        segments,
        tensors,
        message,
        dst_list.tolist(),
        background=background,
        route_key=route_key,
    )


def _routed(
    operation: str,
    remote: object,
    local: object,
    src_blocks: object,
    dst_blocks: object,
    layers: object,
    tensors_per_layer: object,
    notify: object,
) -> Transfer | None:
    """The transfer started on a same-host route an earlier one left (Engine.start_routed), or
    None: the general path then starts it or names what is wrong. Only arguments of exactly
    the expected types are looked up (1.0 == 1: a float would find an int's route)."""
    engine = _engine
    if engine is None or type(remote) is not CacheIndex or not engine.routes.table:
        return None
    local_id = local.cache_id if type(local) is Cache else local
    if not (
        type(local_id) is int
        and type(remote.cluster_id) is int
        and type(remote.cache_id) is int
        and type(remote.batch_index) is int
        and type(tensors_per_layer) is int
        and (layers is None or type(layers) is range)
    ):
        return None
    try:
        message = _notify(notify)
    except (LLMException, UnicodeError):
        return None  # the general path raises it again, for the caller
    key = (operation, remote.cluster_id, remote.cache_id, local_id, layers, layers, tensors_per_layer)
    route = engine.routes.table.get(key)
    return None if route is None else engine.start_routed(route, src_blocks, dst_blocks, message)


def start_slice(
    operation: str,
    local: Cache,
    cluster_id: int,
    remote_ref: plan.RemoteRef,
    remote_index: int | None,
    local_index: int,
    size: int = -1,
    local_layers: range | None = None,
    remote_layers: range | None = None,
    tensors_per_layer: int = 2,
    notify: str | bytes | None = None,
    background: bool = False,
) -> Transfer:
    """Starts moving ``size`` bytes (-1: all) of one dim-0 slice between a local cache and a
    remote one. ``remote_index`` None: the slice the remote key names (``background``: as
    for start_blocks)."""
    engine = get_engine()
    message = _notify(notify)
    local_index, size = as_int(local_index, "batch_index"), as_int(size, "size")
    read = operation == "READ"
    tensors = plan.selection(local.cache_desc, local_layers, remote_layers, tensors_per_layer, read)

    def plan_one(src: plan.PlanSide, dst: plan.PlanSide, key_index: int) -> plan.Segments:
        remote = key_index if remote_index is None else remote_index
        src_index, dst_index = (remote, local_index) if read else (local_index, remote)
        return plan.slice_segments(src[0], src[1], dst[0], dst[1], src_index, dst_index, size)

    dst_index = local_index if read else remote_index
    return engine.start_transfer(
        operation,
        local,
        cluster_id,
        remote_ref,
        plan.planned(local, remote_ref, tensors, read, plan_one),
        tensors,
        message,
        [] if dst_index is None else [dst_index],
        background=background,
    )


def transfer_blocks(*args: Any, verify: bool = False, **kwargs: Any) -> int:
    """``start_blocks(...).wait()``: the bytes moved (verified if ``verify`` or the process
    option says)."""
    return remote_checks.checked(start_blocks, verify, get_engine)(*args, **kwargs).wait()


def transfer_slice(*args: Any, verify: bool = False, **kwargs: Any) -> int:
    """``start_slice(...).wait()``: the bytes moved (verified if ``verify`` or the process
    option says)."""
    return remote_checks.checked(start_slice, verify, get_engine)(*args, **kwargs).wait()


def pull_kv_blocks_async(
    src: CacheIndex,
    dst: Cache | int,
    src_blocks: Blocks,
    dst_blocks: Blocks,
    *,
    layers: range | None = None,
    tensors_per_layer: int = 2,
    notify: str | bytes | None = None,
    verify: bool = False,
) -> Transfer:
    """Starts reading blocks ``src_blocks`` of a remote cache into blocks ``dst_blocks`` of a
    local one; returns its Transfer. Validated against the remote cache's desc before it
    returns. ``layers`` (a range) moves only those layers' tensors (layer i: tensors
    ``i*tensors_per_layer .. (i+1)*tensors_per_layer-1``), the same layers on both sides.
    ``notify`` (str or bytes, at most 1 KiB) reaches the peer's ``get_notifications()``
    once the data has been read. ``verify``: see torch_kvreg.verify (CRCs of the blocks)."""
    return _block_transfer("READ", src, dst, src_blocks, dst_blocks, layers, tensors_per_layer, notify, True, verify)


def push_kv_blocks_async(
    src: Cache | int,
    dst: CacheIndex,
    src_blocks: Blocks,
    dst_blocks: Blocks,
    *,
    layers: range | None = None,
    tensors_per_layer: int = 2,
    notify: str | bytes | None = None,
    verify: bool = False,
) -> Transfer:
    """Starts writing blocks ``src_blocks`` of a local cache into blocks ``dst_blocks`` of a
    remote one; ``notify`` reaches the peer once the data has landed there; ``verify``: see pulls."""
    return _block_transfer("WRITE", dst, src, src_blocks, dst_blocks, layers, tensors_per_layer, notify, True, verify)


def _block_transfer(
    operation: str,
    remote: CacheIndex,
    local: Cache | int,
    src_blocks: Blocks,
    dst_blocks: Blocks,
    layers: range | None,
    tensors_per_layer: int,
    notify: str | bytes | None,
    background: bool,
    verify: bool = False,
) -> Transfer:
    """A block transfer between a remote cache and a local one (READ: remote to local),
    started on a same-host route an earlier one left when there is one, else in full."""
    if remote_checks.routable(verify):
        transfer = _routed(operation, remote, local, src_blocks, dst_blocks, layers, tensors_per_layer, notify)
        if transfer is not None:
            return transfer
    return _start_block_transfer(
        operation, remote, local, src_blocks, dst_blocks, layers, tensors_per_layer, notify, background, verify
    )


@raises_llm
def _start_block_transfer(
    operation: str,
    remote: CacheIndex,
    local: Cache | int,
    src_blocks: Blocks,
    dst_blocks: Blocks,
    layers: range | None,
    tensors_per_layer: int,
    notify: str | bytes | None,
    background: bool,
    verify: bool,
) -> Transfer:
    remote = _cache_index(remote)
    get_engine()
    return remote_checks.checked(start_blocks, verify, get_engine)(
        operation,
        _local(local),
        remote.cluster_id,
        remote.cache_id,
        src_blocks,
        dst_blocks,
        layers,
        layers,
        tensors_per_layer,
        notify,
        background,
    )


@raises_llm
def pull_kv_cache_async(
    src: CacheIndex,
    dst: Cache | int,
    batch_index: int = 0,
    size: int = -1,
    *,
    layers: range | None = None,
    tensors_per_layer: int = 2,
    notify: str | bytes | None = None,
    verify: bool = False,
) -> Transfer:
    """Starts reading ``size`` bytes (-1: the whole slice) of slice ``src.batch_index`` of a
    remote cache into slice ``batch_index`` of a local one, for every tensor (or ``layers``)."""
    return _pull_slice(src, dst, batch_index, size, layers, tensors_per_layer, notify, True, verify)


def _pull_slice(
    src: CacheIndex,
    dst: Cache | int,
    batch_index: int,
    size: int,
    layers: range | None,
    tensors_per_layer: int,
    notify: str | bytes | None,
    background: bool,
    verify: bool,
) -> Transfer:
    src = _cache_index(src)
    get_engine()
    return remote_checks.checked(start_slice, verify, get_engine)(
        "READ",
        _local(dst),
        src.cluster_id,
        src.cache_id,
        src.batch_index,
        batch_index,
        size,
        layers,
        layers,
        tensors_per_layer,
        notify,
        background,
    )


@raises_llm
def pull_kv_blocks(
    src: CacheIndex,
    dst: Cache | int,
    src_blocks: Blocks,
    dst_blocks: Blocks,
    *,
    layers: range | None = None,
    tensors_per_layer: int = 2,
    notify: str | bytes | None = None,
    verify: bool = False,
) -> int:
    """``pull_kv_blocks_async(...).wait()``, posted from this thread: returns the bytes moved."""
    return _block_transfer(
        "READ", src, dst, src_blocks, dst_blocks, layers, tensors_per_layer, notify, False, verify
    ).wait()


@raises_llm
def push_kv_blocks(
    src: Cache | int,
    dst: CacheIndex,
    src_blocks: Blocks,
    dst_blocks: Blocks,
    *,
    layers: range | None = None,
    tensors_per_layer: int = 2,
    notify: str | bytes | None = None,
    verify: bool = False,
) -> int:
    """``push_kv_blocks_async(...).wait()``, posted from this thread: returns the bytes moved."""
    return _block_transfer(
        "WRITE", dst, src, src_blocks, dst_blocks, layers, tensors_per_layer, notify, False, verify
    ).wait()


@raises_llm
def pull_kv_cache(
    src: CacheIndex,
    dst: Cache | int,
    batch_index: int = 0,
    size: int = -1,
    *,
    layers: range | None = None,
    tensors_per_layer: int = 2,
    notify: str | bytes | None = None,
    verify: bool = False,
) -> int:
    """``pull_kv_cache_async(...).wait()``, posted from this thread: returns the bytes moved."""
    return _pull_slice(src, dst, batch_index, size, layers, tensors_per_layer, notify, False, verify).wait()


class Notification(NamedTuple):
    """A completion notice from a peer: its cluster id (None if not linked) and message."""

    cluster_id: int | None
    message: bytes


def get_notifications() -> list[Notification]:
    """Drains the completion notices peers sent with their transfers' ``notify``, oldest
    first. Empty when nothing arrived (or remote transfers are not in use).

    >>> import torch_kvreg as kv
    >>> kv.initialize()
    >>> kv.get_notifications()
    []
    >>> kv.finalize()
    """
    engine = _engine
    if engine is None:
        return []
    return [Notification(cluster_id, message) for cluster_id, message in engine.notifications()]


def stop_listening() -> None:
    """Closes this process's control server (links stay up)."""
    engine = _engine
    if engine is not None:
        engine.stop_listening()


def serve_as(role: LlmRole | int, address: str | None) -> None:
    """LLM-DataDist's role switch: a DECODER stops listening; a PROMPT (or MIX) listens on
    ``address`` ("ip:port"), or keeps listening where it does. Links and caches stay."""
    if int(role) == LlmRole.DECODER:
        stop_listening()
    elif address is not None:
        parse_listen_address(address)
        stop_listening()
        start_listening(address)
    elif int(role) == LlmRole.PROMPT and listen_address() is None:
        raise param_invalid("switching to PROMPT needs a listen address (llm.ListenIpInfo)")
