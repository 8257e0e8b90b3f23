"""Peers on this host: the proof that a peer's pid is what it says, and block routes.

Peers on this host (one kernel, pid and network namespace) are copied to and from directly
(process_vm_readv/writev on native threads, csrc/peer_copy.h): NIXL over UCX copies there
too, but on one thread inside its post, which holds the engine's progress thread.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Callable, Sequence

import numpy as np

from .. import _C
from ..errors import LLMException, LLMStatusCode, make_error, translate
from ..types import Cache
from . import plan, protocol
from .control import Link
from .leases import SharedLease

log = logging.getLogger("torch_kvreg.remote")

# "0" sends same-host peers' transfers through NIXL instead.
SAME_HOST_ENV = "TORCH_KVREG_SAME_HOST_COPY"
# Block routes kept at most; more start the table again.
MAX_ROUTES = 256


def host_identity() -> str | None:
    """What two processes share when they may copy each other's memory directly: one
    kernel boot, one pid namespace (a pid means the same process to both) and one network
    namespace (what containers and the cross-host tests treat as another host). None when
    same-host copies are off (TORCH_KVREG_SAME_HOST_COPY=0) or /proc does not say. Either
    setting (this one, TORCH_KVREG_PEER_COPY_THREADS) malformed: LLM_PARAM_INVALID."""
    text = os.environ.get(SAME_HOST_ENV, "1")
    if text not in ("0", "1"):
        raise make_error(LLMStatusCode.LLM_PARAM_INVALID, f"{SAME_HOST_ENV} must be 0 or 1, got {text!r}")
    if text == "0":
        return None
    try:
        _C.peer_copy_threads()  # starts the copy pool: a malformed thread count is refused here
    except ValueError as exc:
        raise translate(exc) or exc from None
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            boot_id = boot.read().strip()
        return f"{boot_id}|{os.readlink('/proc/self/ns/pid')}|{os.readlink('/proc/self/ns/net')}"
    except OSError:
        return None


def show_nonce(host: str | None, request: protocol.SameHost, link: Link) -> protocol.SameHostReply:
    """A linker on this host asks to copy our memory directly: we put its nonce at an
    address of ours and say where. Reading it there proves that the pid we name is ours,
    and that the kernel lets the linker copy from it."""
    if host is None:
        raise make_error(LLMStatusCode.LLM_FEATURE_NOT_ENABLED, "same-host copies are off here")
    link.same_host_nonce = np.frombuffer(request.nonce, dtype=np.uint8).copy()  # kept alive with the link
    return protocol.SameHostReply(os.getpid(), int(link.same_host_nonce.ctypes.data))


def peer_pid(host: str | None, link: Link, hello: protocol.HelloReply, timeout_s: float) -> int | None:
    """The peer's pid when it is on this host and lets us copy its memory, else None (its
    transfers then go through NIXL)."""
    if host is None or hello.host != host:
        return None
    nonce = secrets.token_bytes(protocol.NONCE_BYTES)
    try:
        shown = protocol.SameHostReply.parse(link.request(protocol.SameHost(nonce), timeout_s))
    except (LLMException, protocol.ProtocolError) as exc:
        log.info("cluster %s is on this host, direct copies refused (%s): NIXL moves its bytes", link.cluster_id, exc)
        return None
    status, found = _C.peer_copy_peek(shown.pid, shown.address, len(nonce))
    if status != 0 or found != nonce:
        reason = os.strerror(-status) if status < 0 else "the nonce was not where it said"
        log.info("cluster %s is on this host, no direct copies (%s): NIXL moves its bytes", link.cluster_id, reason)
        return None
    log.info("cluster %s is on this host (pid %d): transfers copy directly", link.cluster_id, shown.pid)
    return shown.pid


class Route:
    """What a same-host block transfer worked out (tensors, descs, addresses, peer) kept as
    a native plan, so that the next transfers with the same caches and layers start in one
    native call, as ordinary same-host jobs. While any of its jobs is in flight it holds the
    local cache and one reference to the shared lease, for all of them together."""

    __slots__ = (
        "native",
        "key",
        "path",
        "link",
        "lease",
        "local_id",
        "description",
        "block_bytes",
        "started",
        "ended",
        "end_lock",
        "holding",
        "settle",
    )

    def __init__(
        self, native: _C.PeerRoute, path: str, link: Link, lease: SharedLease, local_id: int, description: str
    ) -> None:
        self.native, self.link, self.lease, self.local_id = native, link, lease, local_id
        self.key: tuple = ()  # its key in Routes.table (Routes.keep sets it)
        self.path = path  # "pull" or "push", as torch_kvreg.stats() counts it
        self.description = description
        self.block_bytes = native.block_bytes
        # Its jobs started (counted under the engine's lock) and let go (under end_lock, so
        # that a job ending takes the engine's lock only when it may be the last).
        self.started = 0
        self.ended = 0
        self.end_lock = threading.Lock()
        self.holding = False
        # Called when its last job may have let go (the engine's: Routes.settle, then it
        # gives back the route's holds).
        self.settle: Callable[[Route], None] = lambda route: None

    def job_ended(self) -> None:
        """Each of its jobs' let_go (and a start the native route refused)."""
        with self.end_lock:
            self.ended += 1
            if self.ended < self.started:
                return  # others are out (``started`` only grows: a read of it is never ahead)
        self.settle(self)


def make_route(
    operation: str, link: Link, lease: SharedLease, local: Cache, tensors: tuple[Sequence[int], Sequence[int]]
) -> Route | None:
    """The route of a same-host block transfer between ``local`` and the leased cache, over
    the (local, remote) tensors taking part; None for a peer not on this host."""
    remote, pid = lease.remote, link.peer_pid
    if pid is None:
        return None
    local_tensors, remote_tensors = tensors
    local_side = (plan.fields(local.cache_desc, len(local_tensors)), local.cache_id)
    remote_side = (plan.fields(remote.desc, len(remote_tensors)), remote.cache_id)
    read = operation == "READ"
    src, dst = (remote_side, local_side) if read else (local_side, remote_side)
    native = _C.PeerRoute(
        pid,
        read,
        [local.tensor_addrs[i] for i in local_tensors],
        [remote.addrs[i] for i in remote_tensors],
        src[0],
        src[1],
        dst[0],
        dst[1],
        plan.MAX_DESCRIPTOR_BYTES,
    )
    path = "pull" if read else "push"
    return Route(native, path, link, lease, local.cache_id, f"{operation.lower()} with cluster {link.cluster_id}")


class Routes:
    """The routes kept, by (operation, cluster id, remote cache id, local cache id, local
    layers, remote layers, tensors per layer). ``lock`` is the engine's."""

    def __init__(self, lock: threading.RLock) -> None:
        self.lock = lock
        self.table: dict[tuple, Route] = {}
        self.busy: set[Route] = set()  # routes holding (with jobs under way)
        self.starts = 0  # transfers started on a route (read by tests and benchmarks)

    def keep(self, key: tuple, route: Route) -> None:
        """Caller holds the lock."""
        if len(self.table) >= MAX_ROUTES:
            self.table.clear()
        route.key = key
        self.table[key] = route

    def drop(self, stale: Callable[[Route], bool]) -> None:
        """Forgets the idle routes ``stale`` picks (caller holds the lock); a busy one is
        dropped by its next start, which finds it stale."""
        for key, route in list(self.table.items()):
            if not route.holding and stale(route):
                del self.table[key]

    def settle(self, route: Route) -> bool:
        """Whether the route, its last job let go, no longer holds anything (the caller
        then gives back its hold on the local cache and the lease)."""
        with self.lock:  # what starts take: decided under it
            with route.end_lock:
                if route.ended != route.started or not route.holding:
                    return False
            route.holding = False
            self.busy.discard(route)
            return True
