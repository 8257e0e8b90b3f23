"""Peers' caches in shared memory, mapped here: a same-host transfer becomes a local copy.

A cache that its owner made with ``allocate_kv_cache`` lives in a memfd; the owner's lease
reply says so (protocol.SharedMemory) for remote-accessible caches only. On a link whose
peer proved it is on this host (same_host.peer_pid), the first transfer to such a cache
opens the memfd through /proc/<pid>/fd/<n> (the kernel allows it exactly when it allows
the process_vm copies the proof checked), checks its name, maps it and fills its page
tables; transfers then run as same-host jobs whose bytes move with copy_kv_blocks'
kernels on the same-host pool's threads (_C.mapped_copy_start_segments), or, between
caches of different geometry, with copy_kv_tokens' box kernels
(_C.mapped_geometry_copy_start). Anything that fails here falls back to the process_vm
path.

When a mapping goes: a mapping is only used under a lease on its cache (which keeps the
owner from unregistering it), and its memfd name is checked against each lease's, so a
cache registered again (a restarted peer's cache at the same id) is never read through
an old mapping. It is dropped when its link ends, when a lease on its cache names another
memfd, at finalize, and IDLE_S after the last transfer started on it: memory the owner
freed stays allocated at most that long because of a mapping here. A copy under way holds
its mapping natively, so dropping one never unmaps memory a copy still uses.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from .. import _C
from ..errors import LLMStatusCode, make_error
from ..types import Cache, CacheDesc, Placement
from .control import Link
from .leases import SharedLease
from .protocol import RemoteCache, SharedMemory

log = logging.getLogger("torch_kvreg.remote")

# "0" keeps peers' shared caches unmapped (their transfers take the process_vm path).
MAP_ENV = "TORCH_KVREG_MAP_PEER_CACHES"
# A mapping unused this long is dropped (the housekeeping of the progress thread does it).
IDLE_S = 1.0
# Mappings kept at most; beyond, the least recently used go first.
MAX_MAPPINGS = 256


class Mapping:
    """A peer's memfd mapped here (``region`` None: mapping it failed; not retried for the
    same memfd)."""

    __slots__ = ("name", "region", "remote_base", "used_at")

    def __init__(self, name: str, region: _C.SharedRegion | None, remote_base: int) -> None:
        self.name, self.region, self.remote_base = name, region, remote_base
        self.used_at = time.monotonic()


def enabled() -> bool:
    text = os.environ.get(MAP_ENV, "1")
    if text not in ("0", "1"):
        raise make_error(LLMStatusCode.LLM_PARAM_INVALID, f"{MAP_ENV} must be 0 or 1, got {text!r}")
    return text == "1"


def fits(remote: RemoteCache, shared: SharedMemory) -> bool:
    """Whether every tensor of the cache lies inside the region its owner named."""
    end = shared.base + shared.size
    return all(shared.base <= addr and addr + remote.desc.tensor_nbytes <= end for addr in remote.addrs)


def open_region(pid: int, shared: SharedMemory) -> _C.SharedRegion:
    """Opens and maps the peer's memfd; OSError or the native error when that fails."""
    fd = os.open(f"/proc/{pid}/fd/{shared.fd}", os.O_RDWR | os.O_CLOEXEC)
    try:
        # The descriptor number may have been reused since the lease reply: the random
        # name says whether this is still the cache's memfd.
        found = os.readlink(f"/proc/self/fd/{fd}")
        if found != f"/memfd:{shared.name} (deleted)" and found != f"/memfd:{shared.name}":
            raise OSError(f"descriptor {shared.fd} of pid {pid} is {found!r}, not the cache's memfd")
    except BaseException:
        os.close(fd)
        raise
    return _C.shared_region_map(fd, shared.size)  # takes the descriptor over


class Mappings:
    """The peers' memfds this process has mapped, by (link, remote cache id)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.table: dict[tuple[Link, int], Mapping] = {}
        self.on = enabled()
        self.made = 0  # mappings made (read by tests)
        self.starts = 0  # transfers started on a mapping (read by tests and benchmarks)

    def start(
        self,
        link: Link,
        lease: SharedLease,
        read: bool,
        local_addrs: list[int],
        remote_addrs: Sequence[int],
        segments: tuple[np.ndarray, np.ndarray, np.ndarray],
        watched: bool,
    ) -> _C.PeerCopyJob | None:
        """The job of a same-host transfer with the leased cache when that cache is mapped
        here (mapping it now if need be), else None (nothing started). ``remote_addrs``: the
        peer's addresses of the tensors taking part (as the process_vm path would use them);
        the native start refuses any piece outside the mapping."""
        mapping = self._mapped(link, lease)
        if mapping is None or mapping.region is None:
            return None
        mapped = [addr - mapping.remote_base + mapping.region.base for addr in remote_addrs]
        return _C.mapped_copy_start_segments(mapping.region, read, local_addrs, mapped, *segments, watched)

    def start_boxes(
        self,
        link: Link,
        lease: SharedLease,
        local: Cache,
        boxes: Callable[[CacheDesc, _C.SharedRegion, list[int]], _C.PeerCopyJob],
    ) -> _C.PeerCopyJob | None:
        """start() for a transfer between geometries: when the leased cache is mapped here
        (and both caches are host memory), ``boxes(peer desc, region, every peer tensor's
        address in the region)`` starts it (box kernels, no runs planned); else None."""
        remote = lease.remote
        if not local.cache_desc.placement == remote.desc.placement == Placement.HOST:
            return None
        mapping = self._mapped(link, lease)
        if mapping is None or mapping.region is None:
            return None
        base = mapping.region.base
        return boxes(remote.desc, mapping.region, [addr - mapping.remote_base + base for addr in remote.addrs])

    def _mapped(self, link: Link, lease: SharedLease) -> Mapping | None:
        """The leased cache's mapping (made now if need be; its region None when it cannot
        be mapped), counted as a start, or None when it is not to be mapped."""
        remote = lease.remote
        shared = remote.shared
        if shared is None or not self.on or link.peer_pid is None:
            return None
        mapping = self._mapping(link, link.peer_pid, remote, shared)
        if mapping.region is not None:
            mapping.used_at = time.monotonic()
            self.starts += 1
        return mapping

    def _mapping(self, link: Link, pid: int, remote: RemoteCache, shared: SharedMemory) -> Mapping:
        key = (link, remote.cache_id)
        with self.lock:  # mapping is rare: concurrent first transfers wait for one to map
            mapping = self.table.get(key)
            if mapping is not None and mapping.name == shared.name:
                return mapping
            region = None
            if fits(remote, shared):
                try:
                    region = open_region(pid, shared)
                    self.made += 1
                except (OSError, RuntimeError, ValueError) as exc:
                    log.info("cluster %s: cache %d not mapped (%s)", link.cluster_id, remote.cache_id, exc)
            mapping = Mapping(shared.name, region, shared.base)
            self.table.pop(key, None)  # a different memfd at that id: the old one goes
            self.table[key] = mapping
            while len(self.table) > MAX_MAPPINGS:
                del self.table[next(iter(self.table))]
            return mapping

    def expire(self, due: float | None) -> float | None:
        """Drops the mappings unused for IDLE_S; ``due`` made earlier by the next one due."""
        now = time.monotonic()
        with self.lock:
            for key, mapping in list(self.table.items()):
                left = mapping.used_at + IDLE_S - now
                if left <= 0:
                    del self.table[key]
                else:
                    due = left if due is None else min(due, left)
        return due

    def drop_link(self, link: Link) -> None:
        with self.lock:
            for key in [key for key in self.table if key[0] is link]:
                del self.table[key]

    def clear(self) -> None:
        with self.lock:
            self.table.clear()

    def mapped(self) -> int:
        """Mappings held now (failed ones not counted)."""
        with self.lock:
            return sum(mapping.region is not None for mapping in self.table.values())
