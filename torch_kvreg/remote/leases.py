"""Who holds which cache: local caches held by transfers and by peers' leases, and the
leases this process holds on peers' caches (shared by concurrent transfers, lingering a
little after the last one)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time

from .. import _C
from ..errors import LLMException, LLMStatusCode, make_error
from . import protocol
from .control import Link
from .protocol import RemoteCache

log = logging.getLogger("torch_kvreg.remote")

# A lease on a peer's cache outlives its last transfer by this long, so that the next
# transfer to that cache (the next layer of a layer-wise push, the next pull of a decode
# loop) finds it instead of paying a round trip to acquire it (and one to release the old).
# The peer's unregister of that cache waits at most this much longer.
LEASE_LINGER_S = 0.05


def served_cache(cache_id: int | None, key: str | None) -> tuple[_C.CacheRecord, int, int]:
    """The local cache a peer names (by id, or by key: then the index the key gives), as
    (_C.get_cache's record, cache id, index); LLM_KV_CACHE_NOT_EXIST unless it is
    registered remote-accessible (a private cache's contents are not described either)."""
    index = 0
    if key is not None:
        try:
            cache_id, index = _C.find_key(key)
        except RuntimeError:
            raise make_error(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, f"no cache is registered with key {key!r}") from None
    if cache_id is None:
        raise make_error(LLMStatusCode.LLM_PARAM_INVALID, "a request for a cache names a cache id or a key")
    try:
        record = _C.get_cache(cache_id)
    except RuntimeError:
        raise make_error(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, f"cache id {cache_id} is not registered") from None
    if not record.remote_accessible:
        raise make_error(
            LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, f"cache id {cache_id} is registered with remote_accessible=False"
        )
    return record, cache_id, index


class LocalHolds:
    """Local caches in use by transfers in flight and by peers' leases, counted here and in
    the native registry, so that an unregister from any path waits for them. ``lock`` is
    the engine's (its condition is notified when a count drops)."""

    def __init__(self, lock: threading.Condition, wait_s: float) -> None:
        self.lock, self.wait_s = lock, wait_s
        self.in_flight: dict[int, int] = {}  # cache id -> holds; a cache nobody holds is absent
        self.closing: set[int] = set()  # caches being unregistered: no new holds
        self.leases: dict[int, int] = {}  # lease id peers hold -> cache id
        self.lease_ids = itertools.count(1)

    def _count_in(self, cache_id: int) -> None:
        self.in_flight[cache_id] = self.in_flight.get(cache_id, 0) + 1

    def _count_out(self, cache_id: int) -> None:
        left = self.in_flight.get(cache_id, 0) - 1
        if left < 0:
            # Every hold is given back once by construction (a job's let_go, a lease's
            # release): this would be a bug, and the cache could be freed under a transfer.
            log.error("cache %d released more often than it was held", cache_id)
            left = 0
        if left:
            self.in_flight[cache_id] = left
        else:
            self.in_flight.pop(cache_id, None)

    def hold(self, cache_id: int) -> None:
        """One more transfer using a local cache."""
        with self.lock:
            if cache_id in self.closing:
                raise make_error(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, f"cache id {cache_id} is being unregistered")
            _C.hold(cache_id)
            self._count_in(cache_id)

    def hold_again(self, cache_id: int) -> bool:
        """hold() under the engine's lock, for a caller that checked ``closing`` itself;
        False when the cache is no longer registered."""
        try:
            _C.hold(cache_id)
        except RuntimeError:
            return False
        self._count_in(cache_id)
        return True

    def unhold(self, cache_id: int) -> None:
        with self.lock:
            self._count_out(cache_id)
            _C.unhold(cache_id)
            self.lock.notify_all()

    def close(self, cache_id: int) -> None:
        """Marks a cache as being unregistered and waits (bounded) until nothing holds it;
        LLM_TIMEOUT (the mark taken back) if something still does. The caller ends the
        mark with ``closed``."""
        with self.lock:
            self.closing.add(cache_id)
            if not self.lock.wait_for(lambda: self.in_flight.get(cache_id, 0) == 0, timeout=self.wait_s):
                self.closing.discard(cache_id)
                raise make_error(
                    LLMStatusCode.LLM_TIMEOUT,
                    f"cache {cache_id} still has a transfer in flight after {self.wait_s * 1000:.0f} ms",
                )

    def closed(self, cache_id: int) -> None:
        with self.lock:
            self.closing.discard(cache_id)

    def wait_idle(self) -> bool:
        """Waits (bounded) until no local cache is held; False if one still is."""
        with self.lock:
            return self.lock.wait_for(lambda: not self.in_flight, timeout=self.wait_s)

    # --- leases peers hold on local caches ----------------------------------------------
    def grant(self, cache_id: int, usable: bool) -> int:
        """A lease for a peer on a local cache (``usable``: not closing and registered with
        NIXL, as the caller found under the lock)."""
        with self.lock:
            if cache_id in self.closing or not usable:
                raise make_error(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, f"cache id {cache_id} is being unregistered")
            if not self.hold_again(cache_id):  # unregister, from any path, now waits for the peer
                raise make_error(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, f"cache id {cache_id} is not registered")
            lease = next(self.lease_ids)
            self.leases[lease] = cache_id
            return lease

    def end_lease(self, lease: int) -> None:
        with self.lock:
            cache_id = self.leases.pop(lease, None)
            if cache_id is not None:
                self._count_out(cache_id)
                _C.unhold(cache_id)
                self.lock.notify_all()

    def end_all_leases(self) -> None:
        with self.lock:
            for lease in list(self.leases):
                self.end_lease(lease)


class SharedLease:
    """A lease on a peer's cache and its entry, shared by the transfers using it now."""

    __slots__ = ("key", "link", "lease", "remote", "md", "index", "refs", "idle_since")

    def __init__(self, key: tuple, link: Link, lease: int, remote: RemoteCache, md: bytes, index: int):
        self.key, self.link, self.lease = key, link, lease
        self.remote, self.md, self.index = remote, md, index
        self.refs = 1
        self.idle_since: float | None = None  # when its last transfer let go of it


class PeerLeases:
    """Leases this process holds on peers' caches. Transfers in flight at the same time on
    the same remote cache share one (acquired by the first, given back by the last), so
    that a burst costs one round trip, not two per transfer; an unused one lingers
    LEASE_LINGER_S before it is given back. ``lock`` is the engine's."""

    def __init__(self, lock: threading.Condition) -> None:
        self.lock = lock
        self.shared: dict[tuple, SharedLease] = {}  # (link, remote cache ref) -> lease in use
        self.lingering = 0  # shared leases nobody uses now, kept LEASE_LINGER_S

    def take(self, link: Link, remote_ref: int | str) -> SharedLease:
        key = (id(link), remote_ref)
        with self.lock:
            shared = self.shared.get(key)
            if shared is not None and shared.link is link and link.alive:
                self.use(shared)
                return shared
        response = link.request(protocol.Acquire.of(remote_ref))
        try:
            reply = protocol.AcquireReply.parse(response)
        except protocol.ProtocolError as exc:
            if isinstance(response.get("lease"), int):
                with contextlib.suppress(LLMException):
                    link.request(protocol.Release(response["lease"]))
            raise make_error(
                LLMStatusCode.LLM_FAILED, f"cluster {link.cluster_id} sent a malformed cache entry: {exc}"
            ) from None
        shared = SharedLease(key, link, reply.lease, reply.cache, reply.md, reply.index)
        with self.lock:
            if key not in self.shared:  # else another thread won the race: ours stays private
                self.shared[key] = shared
        return shared

    def use(self, shared: SharedLease) -> None:
        """One more user of a shared lease (caller holds the lock)."""
        if shared.refs == 0:
            self.lingering -= 1
        shared.refs += 1

    def put(self, shared: SharedLease, linger: bool) -> bool:
        """One user fewer. True when the lease now lingers (the caller wakes whoever
        expires it); a lease not shared (or not ``linger``) is given back at once."""
        with self.lock:
            shared.refs -= 1
            if shared.refs > 0:
                return False
            current = self.shared.get(shared.key) is shared
            if current and linger and shared.link.alive:
                shared.idle_since = time.monotonic()
                self.lingering += 1
                return True
            if current:
                del self.shared[shared.key]
        if shared.link.alive:
            with contextlib.suppress(LLMException):
                shared.link.request(protocol.Release(shared.lease))
        return False

    def expire(self, everything: bool = False) -> tuple[float | None, list[SharedLease]]:
        """Takes out the leases that lingered LEASE_LINGER_S unused (``everything``: all
        unused ones): (seconds until the next is due or None, those taken out; the caller
        gives them back with ``give_back``, outside the lock)."""
        if not self.lingering:
            return None, []
        now, due, expired = time.monotonic(), None, []
        with self.lock:
            for key, shared in list(self.shared.items()):
                if shared.refs or shared.idle_since is None:
                    continue
                left = shared.idle_since + LEASE_LINGER_S - now
                if everything or left <= 0 or not shared.link.alive:
                    del self.shared[key]
                    self.lingering -= 1
                    expired.append(shared)
                else:
                    due = left if due is None else min(due, left)
        return due, expired

    @staticmethod
    def give_back(expired: list[SharedLease]) -> None:
        for shared in expired:
            if shared.link.alive:
                with contextlib.suppress(LLMException):
                    shared.link.request(protocol.Release(shared.lease))

    def forget_link(self, link: Link) -> None:
        """Drops the unused leases over a link that ends (the peer gives back what we leased
        when the connection closes); busy ones go when their transfers end."""
        with self.lock:
            for key, shared in list(self.shared.items()):
                if shared.link is link and shared.refs == 0:
                    del self.shared[key]
                    self.lingering -= 1
