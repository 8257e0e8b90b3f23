"""The NIXL agent of this process, its control server, its links, and remote transfers."""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import os
import secrets
import socket
import socketserver
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import numpy as np

from .. import _C
from ..errors import LLMException, LLMStatusCode, make_error, translate
from ..inflight import Transfer
from ..types import Cache, CacheDesc, ClusterInfo, Placement
from . import plan, protocol
from .auth import LinkSecret, new_nonce
from .protocol import RemoteCache

# nixl_cu12's opaque handles (a transfer request, a prepared descriptor list) and its agent.
NixlHandle = Any
NixlAgent = Any

log = logging.getLogger("torch_kvreg.remote")
# From this many scattered blocks on, transfers index prepared per-block descriptor lists.
PREPPED_MIN_SEGMENTS = 16
# Per-block lists cover every block of every tensor of a cache, and NIXL indexes them with
# int32: caches with more descriptors than this (large, or a desc a peer claims) use
# per-request descriptor lists, whose size follows the request.
MAX_PREPPED_DESCRIPTORS = 1 << 24
# Background transfers posted together as one NIXL request carry at most this many descriptors.
MAX_GROUP_DESCRIPTORS = 1 << 16
# How long a thread starting a background transfer lets go of the GIL when it wakes the
# progress thread (the sleep lasts at least this long).
HAND_OVER_S = 20e-6
# A lease on a peer's cache outlives its last transfer by this long, so that the next
# transfer to that cache (the next layer of a layer-wise push, the next pull of a decode
# loop) finds it instead of paying a round trip to acquire it (and one to release the old).
# The peer's unregister of that cache waits at most this much longer.
LEASE_LINGER_S = 0.05
# Peers on this host (one kernel, pid and network namespace) are copied to and from
# directly (process_vm_readv/writev on native threads, see csrc/peer_copy.h): NIXL over UCX
# copies there too, but on one thread inside its post, which holds this engine's progress
# thread, and each post's end waits for the GIL. "0" sends them through NIXL instead.
SAME_HOST_ENV = "TORCH_KVREG_SAME_HOST_COPY"
# A same-host copy job's states (peer_copy.h); failures are -errno.
_JOB_RUNNING, _JOB_DONE = 0, 1
# A same-host copy is completed by the thread that waits for it or polls done(); one with a
# notice wakes the progress thread when it ends (the notice goes out at once); the others
# the progress thread completes at its next look, at most this long after they end.
JOB_SWEEP_S = 0.005
# Same-host block routes kept at most (start_routed); more start the table again.
MAX_ROUTES = 256
# Links to vanished peers kept listed (their transfers fail with LLM_LINK_FAILED until the
# cluster is unlinked or linked again); the oldest beyond this are forgotten.
MAX_DEAD_LINKS = 64
# Senders of notices remembered after their links end (Engine.senders).
MAX_REMEMBERED_SENDERS = 4096


# NIXL's agent runs a progress thread that, as nixl-cu12 configures it (pthrDelay 0), polls
# without pause: a whole core per process, idle or not (measured: 0.98 CPU-seconds per
# second). On a two-core host that starved the prefill's compute and this engine's own
# threads. With any pause it costs under 2% of a core; UCX still progresses on time (the
# passive side of TCP transfers needs it), and this engine's progress thread drives its own
# transfers. TORCH_KVREG_NIXL_PROGRESS_DELAY_US sets it (0: nixl-cu12's busy polling).
DEFAULT_PROGRESS_DELAY_US = 10
_agent_lock = threading.Lock()


def host_identity() -> str | None:
    """What two processes share when they may copy each other's memory directly: one
    kernel boot, one pid namespace (a pid means the same process to both) and one network
    namespace (what containers and the cross-host tests treat as another host). None when
    same-host copies are off (TORCH_KVREG_SAME_HOST_COPY=0) or /proc does not say. Either
    setting (this one, TORCH_KVREG_PEER_COPY_THREADS) malformed: LLM_PARAM_INVALID."""
    text = os.environ.get(SAME_HOST_ENV, "1")
    if text not in ("0", "1"):
        raise _error(LLMStatusCode.LLM_PARAM_INVALID, f"{SAME_HOST_ENV} must be 0 or 1, got {text!r}")
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


def make_agent(name: str) -> NixlAgent:
    """A NIXL agent with the UCX backend whose progress thread pauses between polls, safe to
    call from several threads."""
    from nixl_cu12 import _api, nixl_agent, nixl_agent_config, nixl_thread_sync_t

    text = os.environ.get("TORCH_KVREG_NIXL_PROGRESS_DELAY_US", str(DEFAULT_PROGRESS_DELAY_US))
    if not text.isdigit() or int(text) > 10**6:
        raise _error(
            LLMStatusCode.LLM_PARAM_INVALID,
            f"TORCH_KVREG_NIXL_PROGRESS_DELAY_US must be 0 to 1000000 (us), got {text!r}",
        )
    delay = int(text)
    # UCX's memory events (hooks it patches into mmap and munmap when the UCX backend first
    # loads) took ~0.4 s of every process's first link, spinning in sched_yield; they serve
    # UCX's own registration cache only, and NIXL registers every cache explicitly. A
    # user's own setting wins.
    os.environ.setdefault("UCX_MEM_EVENTS", "no")
    config_class: Any = _api.nixlBind.nixlAgentConfig

    class PausingConfig(config_class):  # nixl_agent sets pthrDelay itself; this keeps ours
        def __setattr__(self, field: str, value: object) -> None:
            super().__setattr__(field, delay if field == "pthrDelay" else value)

    with _agent_lock:
        _api.nixlBind.nixlAgentConfig = PausingConfig
        try:
            # Reader-writer locking inside the agent: this engine calls it from several threads
            # (callers posting, the progress thread, link threads loading peers' metadata).
            return nixl_agent(
                name, nixl_agent_config(backends=["UCX"], sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_RW)
            )
        finally:
            _api.nixlBind.nixlAgentConfig = config_class


def _error(status: LLMStatusCode, message: str) -> LLMException:
    return make_error(status, message)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_message(sock: socket.socket) -> dict:
    length = protocol.frame_length(_recv_exact(sock, 4))
    return protocol.decode(_recv_exact(sock, length))


def _preppable(desc: CacheDesc) -> bool:
    return desc.num_tensors * desc.shape[0] <= MAX_PREPPED_DESCRIPTORS


class Link:
    """One control connection to a peer cluster, whichever side opened it. Both sides send
    requests on it and serve the other's (a prompt that linked to a decoder can be pushed
    to by that decoder): a reader loop serves requests and hands responses to waiters."""

    def __init__(self, engine: Engine, sock: socket.socket, info: ClusterInfo | None, wait_s: float):
        self.engine = engine
        self.sock = sock
        self.info = info  # None until a hello names the peer (inbound connections)
        self.agent_name = ""
        self.wait_s = wait_s
        self.alive = True
        self.said_bye = False  # the peer unlinked (as opposed to vanishing)
        self.closed_at = 0.0  # when it was found closed (the oldest dead links are pruned first)
        self.send_lock = threading.Lock()
        self.pending_lock = threading.Lock()
        self.pending: dict[int, list] = {}  # request id -> [Event, response or None]
        self.request_ids = itertools.count(1)
        self.leases: set[int] = set()  # leases the peer holds on this process's caches
        self.loaded_md: dict[int, bytes] = {}  # remote cache id -> metadata already loaded
        self.remote_preps: dict[int, object] = {}  # remote cache id -> prepared per-block dlist
        # Requests from the peer are served only once it has proved the link secret (or the
        # engine has none). An inbound link remembers the challenge it answered.
        self.authenticated = engine.secret is None
        self.challenge: tuple[int, bytes, bytes] | None = None  # (cluster id, its nonce, ours)
        self.last_heard = time.monotonic()
        # A peer on this host whose memory this process may copy directly: its pid.
        self.peer_pid: int | None = None
        self.same_host_nonce: np.ndarray | None = None  # what we showed a linker, kept alive

    @property
    def cluster_id(self) -> int | None:
        return None if self.info is None else self.info.remote_cluster_id

    def _send(self, message: dict) -> None:
        with self.send_lock:
            self.sock.sendall(protocol.encode(message))

    def request(self, message: dict, timeout_s: float | None = None) -> dict:
        """One request/response; LLM_TIMEOUT or LLM_LINK_FAILED when the peer fails."""
        timeout_s = self.wait_s if timeout_s is None else timeout_s
        peer = self.cluster_id if self.cluster_id is not None else "peer"
        if not self.alive:
            raise _error(LLMStatusCode.LLM_LINK_FAILED, f"the link to cluster {peer} is down")
        request_id = next(self.request_ids)
        slot: list = [threading.Event(), None]
        with self.pending_lock:
            self.pending[request_id] = slot
        try:
            self._send({**message, "id": request_id})
        except (OSError, protocol.ProtocolError) as exc:
            with self.pending_lock:
                self.pending.pop(request_id, None)
            raise _error(LLMStatusCode.LLM_LINK_FAILED, f"link to cluster {peer} failed: {exc}") from None
        if not slot[0].wait(timeout_s):
            with self.pending_lock:
                self.pending.pop(request_id, None)
            raise _error(LLMStatusCode.LLM_TIMEOUT, f"cluster {peer} did not answer within {timeout_s * 1000:.0f} ms")
        response = slot[1]
        if response is None:
            raise _error(LLMStatusCode.LLM_LINK_FAILED, f"the link to cluster {peer} closed")
        try:
            failure = protocol.parse_error(response)
        except protocol.ProtocolError as exc:
            raise _error(LLMStatusCode.LLM_FAILED, f"malformed response: {exc}") from None
        if failure is not None:
            raise _error(failure[0], f"cluster {peer}: {failure[1]}")
        return response

    def ping(self) -> None:
        """Asks the peer for a sign of life without waiting; its answer (any frame, in
        fact) refreshes ``last_heard``. A link that cannot even send is closed."""
        request_id = next(self.request_ids)
        with self.pending_lock:
            self.pending[request_id] = [threading.Event(), None]  # the answer lands here, unread
        try:
            self._send({"op": "ping", "id": request_id})
        except (OSError, protocol.ProtocolError):
            self.close()

    def _reply(self, message: dict, request_id: object) -> None:
        if request_id is not None:
            message = {**message, "id": request_id}
        with contextlib.suppress(OSError, protocol.ProtocolError):
            self._send(message)

    def _deliver(self, message: dict) -> bool:
        """Hands a response to its waiter; False if the frame is no awaited response."""
        request_id = message.get("id")
        if "op" in message or not isinstance(message.get("ok"), bool) or type(request_id) is not int:
            return False
        with self.pending_lock:
            slot = self.pending.pop(request_id, None)
        if slot is None:
            return False
        slot[1] = message
        slot[0].set()
        return True

    def serve(self) -> None:
        """The reader loop; returns when the connection ends, releasing what the peer held."""
        try:
            while True:
                try:
                    message = read_message(self.sock)
                except (ConnectionError, OSError):
                    return
                except protocol.ProtocolError as exc:
                    self._reply(
                        {"ok": False, "status": "LLM_PARAM_INVALID", "message": f"malformed request: {exc}"}, None
                    )
                    return  # a peer that sends garbage loses its connection
                self.last_heard = time.monotonic()
                if self._deliver(message):
                    continue
                request_id = message.get("id")
                if request_id is not None and (type(request_id) is not int or not 0 < request_id < 2**63):
                    request_id = None
                try:
                    op, fields = protocol.parse_request(message)
                    if request_id is None and message.get("id") is not None:
                        raise protocol.ProtocolError("field 'id' must be a positive int")
                except protocol.ProtocolError as exc:
                    self._reply(
                        {"ok": False, "status": "LLM_PARAM_INVALID", "message": f"malformed request: {exc}"}, request_id
                    )
                    return
                if not self.authenticated and (op not in ("challenge", "hello") or self.info is not None):
                    # Before the peer proved the secret: only the handshake, and only on a
                    # link it opened. Nothing else is answered, and the link is dropped.
                    self._reply(
                        {
                            "ok": False,
                            "status": "LLM_LINK_FAILED",
                            "message": "this cluster requires a link secret; the handshake did not prove it",
                        },
                        request_id,
                    )
                    return
                if op == "bye":
                    self.said_bye = True
                    self._reply({"ok": True}, request_id)
                    return
                try:
                    reply = self.engine.serve(op, fields, self)
                except LLMException as exc:
                    reply = {"ok": False, "status": exc.status_code.name, "message": exc.detail}
                self._reply(reply, request_id)
                if op in ("challenge", "hello") and not reply["ok"]:
                    return  # a failed handshake ends the connection
        finally:
            if self.alive:
                self.closed_at = time.monotonic()
            self.alive = False
            with self.pending_lock:
                waiting, self.pending = list(self.pending.values()), {}
            for slot in waiting:
                slot[0].set()  # response None: the link closed
            for lease in list(self.leases):
                self.engine.release_lease(lease)
            self.leases.clear()
            self.engine.connection_closed(self)

    def start(self) -> None:
        threading.Thread(target=self.serve, name="kvreg-link", daemon=True).start()

    def close(self) -> None:
        if self.alive:
            self.closed_at = time.monotonic()
        self.alive = False
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()


class _ControlHandler(socketserver.BaseRequestHandler):
    """Serves one connection a peer opened to us, in this thread, until it closes."""

    def handle(self) -> None:
        engine = cast(_Server, self.server).engine
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = Link(engine, sock, None, engine.wait_s)
        with engine.lock:
            if engine.server is None:  # closing
                return
            engine.connections.add(link)
        link.serve()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    engine: Engine  # set right after construction; its handlers reach the engine through it


class Engine:
    """Everything this process needs to be a NIXL peer."""

    def __init__(self, cluster_id: int, wait_ms: int, secret: LinkSecret | None = None):
        # NIXL logs every agent and backend creation at INFO; keep a user's own setting.
        os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
        self.cluster_id = cluster_id
        self.wait_s = wait_ms / 1000.0
        self.secret = secret  # set: every peer proves it knows the secret before it links
        # A link silent for heartbeat_s gets a ping; one silent for dead_after_s is closed,
        # which releases what the peer held and fails transfers to it at once.
        self.heartbeat_s = min(max(self.wait_s / 4, 0.05), 2.0)
        self.dead_after_s = max(self.wait_s, 3 * self.heartbeat_s)
        self.heartbeat_thread: threading.Thread | None = None
        self.closed = threading.Event()
        self.name = f"kvreg-{cluster_id}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.host = host_identity()
        self.agent = make_agent(self.name)
        self.routes: collections.Counter[str] = collections.Counter()  # transfers by path
        # Who completed same-host copies: the thread waiting for one, or the progress thread.
        self.job_completions: collections.Counter[str] = collections.Counter()
        # Same-host block routes by (operation, cluster, remote cache id, local cache id,
        # local layers, remote layers, tensors per layer): start_routed.
        self.fast_routes: dict[tuple, _Route] = {}
        self.busy_routes: set[_Route] = set()  # routes holding (with copies under way)
        self.route_starts = 0  # transfers started on a route
        self.lock_raw = threading.RLock()  # self.lock's own lock, entered directly on hot paths
        self.lock = threading.Condition(self.lock_raw)
        self.nixl_regs: dict[int, object] = {}  # cache id -> NIXL registration descriptors
        self.local_preps: dict[int, object] = {}  # cache id -> prepared per-block dlist
        self.in_flight: dict[int, int] = {}  # cache id -> transfers or remote leases using it
        self.closing: set[int] = set()
        self.leases: dict[int, int] = {}  # lease id -> cache id
        self.lease_ids = itertools.count(1)
        self.links: dict[int, Link] = {}  # linked clusters, whichever side opened the link
        # Agent name -> cluster id of every peer linked lately, kept after its link ends: a
        # notice sent just before an unlink (or a crash) is read after it, and still names
        # its sender. Bounded, oldest forgotten first.
        self.senders: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.connections: set[Link] = set()  # connections peers opened to us
        self.server: _Server | None = None
        self.listen_address: str | None = None
        self.shared_leases: dict[tuple, _SharedLease] = {}  # (link, remote cache) -> lease in use
        self.lingering = 0  # shared leases no transfer uses now, kept LEASE_LINGER_S
        self.progress = threading.Condition()  # guards flights and stopping
        self.flights: list[_Flight] = []
        self.progress_idle = False  # the progress thread waits for flights
        # While the progress thread posts: since when, and how long the post should take at
        # the rate posts have moved bytes so far (UCX may copy everything inside the post).
        self.posting_since: float | None = None
        self.posting_expected_s = 0.0
        self.post_rate = 2e9  # bytes per second
        self.handed_over_at: float | None = None  # the post after which a starter last yielded
        self.stopping = False
        self.progress_thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------
    def _watch_links(self) -> None:
        """The heartbeat: pings links that went quiet and closes those silent for
        ``dead_after_s`` (a cut cable sends no FIN), so that what the peer held is released
        and transfers to it fail at once with LLM_LINK_FAILED."""
        while not self.closed.wait(self.heartbeat_s):
            now = time.monotonic()
            with self.lock:
                links = set(self.links.values()) | set(self.connections)
            for link in links:
                if not link.alive or link.info is None:  # only linked peers (which answer pings)
                    continue
                silent = now - link.last_heard
                if silent > self.dead_after_s:
                    log.warning("cluster %s silent for %.1f s: closing its link", link.cluster_id, silent)
                    link.close()
                elif silent > self.heartbeat_s and link.authenticated:
                    link.ping()

    def _start_heartbeat(self) -> None:
        with self.lock:
            if self.heartbeat_thread is None and not self.closed.is_set():
                self.heartbeat_thread = threading.Thread(target=self._watch_links, name="kvreg-heartbeat", daemon=True)
                self.heartbeat_thread.start()

    def listen(self, host: str, port: int) -> str:
        try:
            self.server = _Server((host, port), _ControlHandler)
        except OSError as exc:
            raise _error(LLMStatusCode.LLM_FAILED, f"cannot listen on {host}:{port}: {exc}") from None
        self.server.engine = self
        bound_host, bound_port = self.server.server_address[:2]  # (str, int): an AF_INET server
        self.listen_address = f"{bound_host!s}:{bound_port}"
        threading.Thread(target=self.server.serve_forever, name="kvreg-control", daemon=True).start()
        self._start_heartbeat()
        return self.listen_address

    def stop_listening(self) -> None:
        """Closes the control server (a role switch to decoder); links stay up."""
        with self.lock:
            server, self.server = self.server, None
            self.listen_address = None
        if server is not None:
            server.shutdown()
            server.server_close()

    def close(self) -> None:
        # Transfers in flight and peers' leases first (bounded), then links and the server.
        with self.lock:
            if not self.lock.wait_for(lambda: not any(self.in_flight.values()), timeout=self.wait_s):
                log.warning("finalize: transfers still in flight after %.0f ms", self.wait_s * 1000)
        self.stop_progress()
        self.closed.set()
        if self.heartbeat_thread is not None:
            self.heartbeat_thread.join(timeout=self.heartbeat_s + 1)
        for cluster_id in list(self.links):
            self.unlink(cluster_id, force=False)
        self.stop_listening()
        with self.lock:
            # Peers that still hold leases lose them and their connections: the registry is
            # about to be emptied.
            connections = list(self.connections)
        for connection in connections:
            connection.close()
        with self.lock:
            for lease in list(self.leases):
                cache_id = self.leases.pop(lease)
                self._count_out(cache_id)
                _C.unhold(cache_id)
            regs, self.nixl_regs = self.nixl_regs, {}
            preps, self.local_preps = self.local_preps, {}
        for prep in preps.values():
            with contextlib.suppress(Exception):
                self.agent.release_dlist_handle(prep)
        for reg in regs.values():
            with contextlib.suppress(Exception):
                self.agent.deregister_memory(reg)

    # --- NIXL registration of local caches --------------------------------------------
    def register(self, cache: Cache) -> None:
        if cache.cache_id in self.nixl_regs:  # ids are never reused while the engine lives
            return
        self._drop_stale_registrations()
        desc = cache.cache_desc
        rows = [(addr, desc.tensor_nbytes, plan.device_id(desc), "") for addr in cache.tensor_addrs]
        with self.lock:  # held across the NIXL call: two threads must not register one cache twice
            if cache.cache_id in self.nixl_regs:
                return
            try:
                self.nixl_regs[cache.cache_id] = self.agent.register_memory(rows, plan.mem_type(desc))
            except Exception as exc:  # NIXL raises its own types
                raise _error(
                    LLMStatusCode.LLM_FAILED, f"NIXL could not register cache {cache.cache_id}: {exc}"
                ) from None

    def _drop_stale_registrations(self) -> None:
        """Deregisters from NIXL the caches that left the registry without this engine
        (through the raw torch.ops.llm.unregister_kv_cache op, say)."""
        live = set(_C.cache_ids())
        with self.lock:
            stale = [i for i in self.nixl_regs if i not in live and i not in self.closing]
            dropped = [(self.nixl_regs.pop(i), self.local_preps.pop(i, None)) for i in stale]
        for reg, prep in dropped:
            with contextlib.suppress(Exception):
                if prep is not None:
                    self.agent.release_dlist_handle(prep)
                self.agent.deregister_memory(reg)

    def unregister(self, cache_id: int) -> None:
        """Waits (bounded) for transfers and remote leases on the cache, then deregisters."""
        with self.lock:
            self.closing.add(cache_id)
            done = self.lock.wait_for(lambda: self.in_flight.get(cache_id, 0) == 0, timeout=self.wait_s)
            if not done:
                self.closing.discard(cache_id)
                raise _error(
                    LLMStatusCode.LLM_TIMEOUT,
                    f"cache {cache_id} still has a transfer in flight after {self.wait_s * 1000:.0f} ms",
                )
            reg = self.nixl_regs.pop(cache_id, None)
            prep = self.local_preps.pop(cache_id, None)
            self.closing.discard(cache_id)
        if prep is not None:
            with contextlib.suppress(Exception):
                self.agent.release_dlist_handle(prep)
        if reg is not None:
            with contextlib.suppress(Exception):
                self.agent.deregister_memory(reg)

    def _count_in(self, cache_id: int) -> None:
        """One more transfer or lease using a local cache (caller holds self.lock)."""
        self.in_flight[cache_id] = self.in_flight.get(cache_id, 0) + 1

    def _count_out(self, cache_id: int) -> None:
        """One fewer (caller holds self.lock); a cache nothing uses leaves the table, which
        would otherwise keep one entry per cache ever transferred."""
        left = self.in_flight.get(cache_id, 0) - 1
        if left:
            # Below zero: one release too many, which a failed NIXL transfer has caused once
            # (in vLLM's test, cause not found yet); counted as the table always did, and
            # said, until the double release is found.
            if left < 0:
                log.warning("cache %d released more often than it was held", cache_id)
            self.in_flight[cache_id] = left
        else:
            del self.in_flight[cache_id]

    def hold_local(self, cache_id: int) -> None:
        """Counts a transfer in flight on a local cache, here and in the native registry, so
        that unregister (from Python or from the raw op) waits for it."""
        with self.lock:
            if cache_id in self.closing:
                raise _error(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, f"cache id {cache_id} is being unregistered")
            _C.hold(cache_id)
            self._count_in(cache_id)

    def unhold_local(self, cache_id: int) -> None:
        with self.lock:
            self._count_out(cache_id)
            _C.unhold(cache_id)
            self.lock.notify_all()

    @contextlib.contextmanager
    def using(self, cache_id: int) -> Iterator[None]:
        self.hold_local(cache_id)
        try:
            yield
        finally:
            self.unhold_local(cache_id)

    # --- serving peers -----------------------------------------------------------------
    def serve(self, op: str, fields: dict, link: Link) -> dict:
        if op == "hello":
            return self.greet(fields, link)
        if op == "challenge":
            return self.answer_challenge(fields, link)
        if op == "ping":
            return {"ok": True}
        if op == "acquire":
            return self.acquire_for_peer(fields.get("cache_id"), fields.get("key"), link.leases)
        if op == "same_host":
            return self.show_nonce(fields, link)
        if op == "release":
            if fields["lease"] in link.leases:
                link.leases.discard(fields["lease"])
                self.release_lease(fields["lease"])
            return {"ok": True}
        raise _error(LLMStatusCode.LLM_PARAM_INVALID, f"unknown op {op}")

    def show_nonce(self, fields: dict, link: Link) -> dict:
        """A linker on this host asks to copy our memory directly: we put its nonce at an
        address of ours and say where. Reading it there proves that the pid we name is ours,
        and that the kernel lets the linker copy from it."""
        if self.host is None:
            raise _error(LLMStatusCode.LLM_FEATURE_NOT_ENABLED, "same-host copies are off here")
        link.same_host_nonce = np.frombuffer(fields["nonce"], dtype=np.uint8).copy()
        return {"ok": True, "pid": os.getpid(), "address": int(link.same_host_nonce.ctypes.data)}

    def _same_host_pid(self, link: Link, response: dict, timeout_s: float) -> int | None:
        """The peer's pid when it is on this host and lets us copy its memory, else None
        (its transfers then go through NIXL)."""
        if self.host is None or protocol.parse_host(response) != self.host:
            return None
        nonce = secrets.token_bytes(protocol.NONCE_BYTES)
        try:
            pid, address = protocol.parse_same_host_response(
                link.request({"op": "same_host", "nonce": protocol.b64(nonce)}, timeout_s)
            )
        except (LLMException, protocol.ProtocolError) as exc:
            log.info(
                "cluster %s is on this host, direct copies refused (%s): NIXL moves its bytes", link.cluster_id, exc
            )
            return None
        status, shown = _C.peer_copy_peek(pid, address, len(nonce))
        if status != 0 or shown != nonce:
            reason = os.strerror(-status) if status < 0 else "the nonce was not where it said"
            log.info("cluster %s is on this host, no direct copies (%s): NIXL moves its bytes", link.cluster_id, reason)
            return None
        log.info("cluster %s is on this host (pid %d): transfers copy directly", link.cluster_id, pid)
        return pid

    def answer_challenge(self, fields: dict, link: Link) -> dict:
        """A linker's nonce: our nonce and our proof of the secret (none without a secret:
        the linker, which has one, must not link to a cluster that cannot prove it)."""
        if self.secret is None:
            raise _error(LLMStatusCode.LLM_LINK_FAILED, "this cluster has no link secret")
        if link.challenge is not None:
            raise _error(LLMStatusCode.LLM_LINK_FAILED, "one challenge per connection")
        ours = new_nonce()
        link.challenge = (fields["cluster_id"], fields["nonce"], ours)
        proof = self.secret.proof(b"accept", fields["nonce"], ours, fields["cluster_id"], self.cluster_id)
        return {"ok": True, "nonce": protocol.b64(ours), "proof": protocol.b64(proof)}

    def _check_hello_proof(self, fields: dict, link: Link) -> None:
        if self.secret is None:
            return
        challenge, link.challenge = link.challenge, None  # one try per challenge
        if challenge is None or "proof" not in fields or challenge[0] != fields["cluster_id"]:
            raise _error(LLMStatusCode.LLM_LINK_FAILED, "this cluster requires a link secret")
        cluster_id, theirs, ours = challenge
        if not self.secret.check(fields["proof"], b"connect", theirs, ours, cluster_id, self.cluster_id):
            log.warning("a peer claiming cluster %d failed the link secret check", cluster_id)
            raise _error(LLMStatusCode.LLM_LINK_FAILED, "the link secret check failed")
        link.authenticated = True

    def greet(self, fields: dict, link: Link) -> dict:
        """A hello from the peer that opened ``link``. With its agent metadata, the link also
        carries our requests to it: the peer's cluster counts as linked here too. With a
        link secret, only after the peer answered our challenge."""
        self._check_hello_proof(fields, link)
        md = fields.get("md")
        if md is not None and link.info is None:
            try:
                loaded = self.agent.add_remote_agent(md)
            except Exception as exc:  # NIXL refusing the metadata
                raise _error(LLMStatusCode.LLM_LINK_FAILED, f"NIXL refused the peer's metadata: {exc}") from None
            peer_host, peer_port = link.sock.getpeername()[:2]
            link.agent_name = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
            link.info = ClusterInfo(fields["cluster_id"], peer_host, peer_port)
            with self.lock:
                self._remember_sender(link.agent_name, fields["cluster_id"])
                current = self.links.get(fields["cluster_id"])
                if current is None or not current.alive:
                    self.links[fields["cluster_id"]] = link
            log.info("cluster %d linked to us from %s:%d", fields["cluster_id"], peer_host, peer_port)
        greeting = {
            "ok": True,
            "cluster_id": self.cluster_id,
            "agent": self.name,
            "md": protocol.b64(self.agent.get_agent_metadata()),
        }
        if self.host is not None:
            greeting["host"] = self.host
        return greeting

    def connection_closed(self, link: Link) -> None:
        """A link's reader loop ended. A peer that said bye is unlinked here; one that
        vanished stays listed, dead, so that transfers to it fail at once (LLM_LINK_FAILED)
        until it is unlinked or linked again."""
        with self.lock:
            self.connections.discard(link)
            cluster_id = link.cluster_id
            drop = False
            if link.said_bye and cluster_id is not None and self.links.get(cluster_id) is link:
                del self.links[cluster_id]
                drop = True
        if drop:
            self._forget(link, keep_agent=True)
        elif cluster_id is not None and self.links.get(cluster_id) is link:
            log.warning("the link to cluster %d closed", cluster_id)
            self._prune_dead_links()

    def _prune_dead_links(self) -> None:
        """Peers that vanish stay listed, dead; bounded: beyond MAX_DEAD_LINKS the oldest
        are forgotten outright (NIXL agent and all), as if unlinked. Decoders that restart
        with a new cluster id each time (vLLM's connector does) would otherwise leave one
        entry each in the prefill, for as long as it runs."""
        with self.lock:
            dead = [(cid, link) for cid, link in self.links.items() if not link.alive]
            if len(dead) <= MAX_DEAD_LINKS:
                return
            dead.sort(key=lambda entry: entry[1].closed_at)
            pruned = dead[: len(dead) - MAX_DEAD_LINKS]
            for cluster_id, _ in pruned:
                del self.links[cluster_id]
        for _, link in pruned:
            self._forget(link)

    def _remember_sender(self, agent_name: str, cluster_id: int) -> None:
        """Caller holds self.lock."""
        self.senders[agent_name] = cluster_id
        self.senders.move_to_end(agent_name)
        while len(self.senders) > MAX_REMEMBERED_SENDERS:
            self.senders.popitem(last=False)

    def _forget(self, link: Link, keep_agent: bool = False) -> None:
        """Releases what ``link`` opened. ``keep_agent`` (a peer that unlinked in good order,
        and may link again): its NIXL agent stays loaded, and a relink loads it again over
        the same connection. NIXL's remove_remote_agent leaves the UCX connection between
        the two processes open, so removing it on every unlink left one more open socket in
        each process per link/unlink cycle; a vanished peer's agent is removed."""
        with self.lock:
            # Routes and unused shared leases over the link (the peer gives back what we
            # leased when the connection ends); busy ones let go when their copies end.
            self._drop_routes(lambda route: route.link is link)
            for key, shared in list(self.shared_leases.items()):
                if shared.link is link and shared.refs == 0:
                    del self.shared_leases[key]
                    self.lingering -= 1
        for prep in link.remote_preps.values():
            with contextlib.suppress(Exception):
                self.agent.release_dlist_handle(prep)
        link.remote_preps.clear()
        if link.agent_name and not keep_agent:
            with contextlib.suppress(Exception):
                self.agent.remove_remote_agent(link.agent_name)
        link.close()

    def acquire_for_peer(self, cache_id: int | None, key: str | None, leases: set[int]) -> dict:
        index = 0
        if key is not None:
            try:
                cache_id, index = _C.find_key(key)
            except RuntimeError:
                raise _error(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, f"no cache is registered with key {key!r}") from None
        if cache_id is None:  # protocol.parse_request gives one or the other; a direct caller may not
            raise _error(LLMStatusCode.LLM_PARAM_INVALID, "a lease request names a cache id or a key")
        try:
            values = _C.get_cache(cache_id)
        except RuntimeError:
            raise _error(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, f"cache id {cache_id} is not registered") from None
        from ..registry import cache_from_native

        cache, remote_accessible = cache_from_native(values), bool(values[7])
        if not remote_accessible:
            raise _error(
                LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, f"cache id {cache_id} is registered with remote_accessible=False"
            )
        self.register(cache)
        with self.lock:
            if cache_id in self.closing or cache_id not in self.nixl_regs:
                raise _error(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, f"cache id {cache_id} is being unregistered")
            try:
                _C.hold(cache_id)  # unregister, from any path, now waits for this peer
            except RuntimeError:
                raise _error(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, f"cache id {cache_id} is not registered") from None
            lease = next(self.lease_ids)
            self.leases[lease] = cache_id
            self._count_in(cache_id)
            reg = self.nixl_regs[cache_id]
        leases.add(lease)
        md = self.agent.get_partial_agent_metadata(reg, False)
        reply = {
            "ok": True,
            "lease": lease,
            "md": protocol.b64(md),
            "cache": protocol.cache_entry(cache_id, cache.cache_desc, cache.tensor_addrs),
        }
        if key is not None:
            reply["index"] = index
        return reply

    def release_lease(self, lease: int) -> None:
        with self.lock:
            cache_id = self.leases.pop(lease, None)
            if cache_id is not None:
                self._count_out(cache_id)
                _C.unhold(cache_id)
                self.lock.notify_all()

    # --- links -------------------------------------------------------------------------
    def link(self, info: ClusterInfo, timeout_ms: int) -> LLMStatusCode:
        with self.lock:
            current = self.links.get(info.remote_cluster_id)
        if current is not None:
            if current.alive:
                return LLMStatusCode.LLM_ALREADY_LINK
            self.unlink(info.remote_cluster_id, force=True)  # a dead link is replaced
        timeout_s = timeout_ms / 1000.0
        try:
            sock = socket.create_connection((info.remote_ip, info.remote_port), timeout=timeout_s)
        except TimeoutError:
            return LLMStatusCode.LLM_TIMEOUT
        except OSError:
            return LLMStatusCode.LLM_LINK_FAILED
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)  # the reader blocks; requests time out on their own
        link = Link(self, sock, info, self.wait_s)
        link.start()
        try:
            hello = {
                "op": "hello",
                "cluster_id": self.cluster_id,
                "agent": self.name,
                "md": protocol.b64(self.agent.get_agent_metadata()),
            }
            if self.secret is not None:
                hello["proof"] = protocol.b64(self._prove(self.secret, link, info, timeout_s))
            response = link.request(hello, timeout_s)
            cluster_id, agent_name, md = protocol.parse_hello_response(response)
            if cluster_id != info.remote_cluster_id:
                raise _error(
                    LLMStatusCode.LLM_LINK_FAILED,
                    f"{info.remote_ip}:{info.remote_port} is cluster {cluster_id}, not {info.remote_cluster_id}",
                )
            loaded = self.agent.add_remote_agent(md)
            link.agent_name = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
            # Connect now, so that the first transfer does not pay for it.
            with contextlib.suppress(Exception):
                self.agent.make_connection(link.agent_name)
            link.peer_pid = self._same_host_pid(link, response, timeout_s)
        except LLMException as exc:
            link.close()
            return exc.status_code
        except Exception as exc:  # malformed hello or NIXL refusing the metadata
            log.warning("link to %s failed: %s", info, exc)
            link.close()
            return LLMStatusCode.LLM_LINK_FAILED
        with self.lock:
            self.links[info.remote_cluster_id] = link
            self._remember_sender(link.agent_name, info.remote_cluster_id)
        self._start_heartbeat()
        log.info("linked to cluster %d at %s:%d", info.remote_cluster_id, info.remote_ip, info.remote_port)
        return LLMStatusCode.LLM_SUCCESS

    def _prove(self, secret: LinkSecret, link: Link, info: ClusterInfo, timeout_s: float) -> bytes:
        """The linker's half of the handshake: checks the peer's proof of the secret, then
        returns ours (sent with the hello). The peer learns nothing about the secret."""
        ours = new_nonce()
        try:
            response = link.request(
                {"op": "challenge", "cluster_id": self.cluster_id, "nonce": protocol.b64(ours)}, timeout_s
            )
            theirs, proof = protocol.parse_challenge_response(response)
        except LLMException as exc:
            if exc.status_code == LLMStatusCode.LLM_TIMEOUT:
                raise
            raise _error(
                LLMStatusCode.LLM_LINK_FAILED,
                f"cluster {info.remote_cluster_id} did not take part in the link secret check",
            ) from None
        except protocol.ProtocolError:
            raise _error(LLMStatusCode.LLM_LINK_FAILED, "malformed challenge response") from None
        if not secret.check(proof, b"accept", ours, theirs, self.cluster_id, info.remote_cluster_id):
            log.warning(
                "cluster %d at %s:%d failed the link secret check",
                info.remote_cluster_id,
                info.remote_ip,
                info.remote_port,
            )
            raise _error(
                LLMStatusCode.LLM_LINK_FAILED, f"cluster {info.remote_cluster_id} failed the link secret check"
            )
        link.authenticated = True
        return secret.proof(b"connect", ours, theirs, self.cluster_id, info.remote_cluster_id)

    def unlink(self, cluster_id: int, force: bool) -> LLMStatusCode:
        with self.lock:
            link = self.links.pop(cluster_id, None)
        if link is None:
            return LLMStatusCode.LLM_NOT_YET_LINK
        said_bye = False
        if not force and link.alive:
            with contextlib.suppress(LLMException):
                link.request({"op": "bye"})
                said_bye = True
        self._forget(link, keep_agent=said_bye)
        return LLMStatusCode.LLM_SUCCESS

    def link_for(self, cluster_id: int) -> Link:
        with self.lock:
            link = self.links.get(cluster_id)
        if link is None:
            raise _error(
                LLMStatusCode.LLM_NOT_YET_LINK, f"cluster {cluster_id} is not linked; call link_clusters first"
            )
        return link

    # --- transfers ---------------------------------------------------------------------
    def start_transfer(
        self,
        operation: str,
        local: Cache,
        cluster_id: int,
        remote_ref: int | str,
        make_segments: plan.MakeSegments,
        tensors: plan.TensorSelection | None = None,
        notify: bytes = b"",
        dst_blocks: Sequence[int] = (),
        background: bool = False,
        route_key: tuple | None = None,
    ) -> Transfer:
        """Starts moving bytes between a local cache and a remote one; returns its Transfer.

        ``remote_ref`` is the remote cache id, or a cache key the peer registered.
        ``make_segments(remote_desc, remote_index)`` validates and returns (source offsets,
        destination offsets, lengths) before any byte moves (``remote_index``: the slice a
        key names, else 0); READ moves remote -> local, WRITE local -> remote.
        ``tensors(remote_desc)`` gives the (local, remote) tensor indices that take part;
        None: all, pairwise. ``notify`` reaches the peer once the data has landed.
        ``route_key`` (block transfers by remote cache id): a same-host copy remembers its
        route under it, for start_routed.
        Everything is checked, the peer's cache leased and the request prepared before this
        returns. The request is posted here, or with ``background`` by the engine's progress
        thread in the order started: NIXL's post may itself move the bytes (UCX does between
        processes of one host), which would make an "asynchronous" transfer block its caller.
        The progress thread completes it either way.
        """
        link = self.link_for(cluster_id)
        self.hold_local(local.cache_id)
        lease = None
        try:
            self.register(local)
            lease = self._lease(link, remote_ref, cluster_id)
            remote, md, index = lease.remote, lease.md, lease.index
            if tensors is None:
                local_tensors = remote_tensors = list(range(local.cache_desc.num_tensors))
            else:
                local_tensors, remote_tensors = tensors(remote.desc)
            src_offsets, dst_offsets, lengths = make_segments(remote.desc, index)
            local_offsets, remote_offsets = (
                (dst_offsets, src_offsets) if operation == "READ" else (src_offsets, dst_offsets)
            )
            nbytes = int(lengths.sum()) * len(local_tensors)
            transfer = Transfer(
                nbytes,
                dst_blocks,
                f"{operation.lower()} with cluster {cluster_id}",
                "pull" if operation == "READ" else "push",
            )
            if nbytes == 0:
                self._settle(link, lease, local.cache_id, None)
                transfer.succeed()
                return transfer
            if link.peer_pid is not None and local.cache_desc.placement == remote.desc.placement == Placement.HOST:
                flight = _Flight(transfer, link, lease, local.cache_id, None, time.monotonic() + self.wait_s, notify)
                flight.job = _C.peer_copy_submit_segments(
                    link.peer_pid,
                    operation == "READ",
                    [local.tensor_addrs[i] for i in local_tensors],
                    [remote.addrs[i] for i in remote_tensors],
                    local_offsets,
                    remote_offsets,
                    lengths,
                    bool(notify),  # a notice must go out when the copy ends, waited for or not
                )
                transfer.assist = functools.partial(self._assist, flight)
                flight.posted = True
                state: str | None = "PROC"
                self.routes["same_host"] += 1
                if route_key is not None and isinstance(remote_ref, int):
                    self._remember_route(route_key, operation, link, lease, local, local_tensors, remote_tensors)
            else:
                self.routes["nixl"] += 1
                if link.loaded_md.get(remote.cache_id) != md:
                    self.agent.add_remote_agent(md)
                    link.loaded_md[remote.cache_id] = md
                block_nbytes = local.cache_desc.block_nbytes
                local_sel = np.asarray(local_tensors, dtype=np.int64)
                remote_sel = np.asarray(remote_tensors, dtype=np.int64)
                if (
                    not background
                    and lengths.size >= PREPPED_MIN_SEGMENTS
                    and bool(np.all(lengths == block_nbytes))
                    and _preppable(local.cache_desc)
                    and _preppable(remote.desc)
                ):
                    # Scattered single blocks: index into per-block lists prepared once per
                    # cache, as NIXL recommends, instead of preparing every descriptor again.
                    # (Background requests keep their rows: the progress thread posts a burst of
                    # them as one request, joining the blocks that turn out adjacent.)
                    request = self._prepped_request(
                        operation,
                        local,
                        remote,
                        link,
                        local_offsets,
                        remote_offsets,
                        block_nbytes,
                        local_sel,
                        remote_sel,
                    )
                else:
                    request = self._request(
                        operation, local, remote, link, local_offsets, remote_offsets, lengths, local_sel, remote_sel
                    )
                flight = _Flight(transfer, link, lease, local.cache_id, request, time.monotonic() + self.wait_s, notify)
                if background:
                    state = None
                else:
                    try:
                        flight.handle = _Request.handle_of([request])
                    except Exception as exc:
                        raise _error(
                            LLMStatusCode.LLM_LINK_FAILED, f"NIXL could not prepare the transfer: {exc}"
                        ) from None
                    state = self._post(flight)
        except BaseException:
            self._settle(link, lease, local.cache_id, None)
            raise
        self._track(flight, state)
        return transfer

    def _remember_route(
        self,
        key: tuple,
        operation: str,
        link: Link,
        lease: _SharedLease,
        local: Cache,
        local_tensors: list[int],
        remote_tensors: list[int],
    ) -> None:
        """Keeps what a same-host block transfer worked out (tensors, descs, addresses,
        peer) as a native route, so that the next ones with the same caches and layers start
        in one native call (start_routed). It lives as long as the shared lease it uses."""
        remote, pid = lease.remote, link.peer_pid
        if pid is None:
            return
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
        with self.lock:
            if self.shared_leases.get(lease.key) is not lease:
                return  # a private lease (another thread's won the race): nothing to share
            if len(self.fast_routes) >= MAX_ROUTES:
                self.fast_routes.clear()
            self.fast_routes[key] = _Route(
                native, link, lease, local.cache_id, f"{operation.lower()} with cluster {link.cluster_id}"
            )

    def start_routed(
        self, key: tuple, src_blocks: object, dst_blocks: object, notify: bytes, path: str
    ) -> Transfer | None:
        """start_transfer for a block transfer on a route a same-host copy left (key: as
        start_blocks makes it): one native call validates the block lists and submits the
        copy. None, with nothing held or moved, when there is no such route, it is stale
        (lease gone, link down or replaced, local cache closing) or the native start does not
        take the lists (not lists of ints, or failing a check): the general path then starts
        the transfer or raises the precise error."""
        route = self.fast_routes.get(key)
        if route is None:
            return None
        first = False
        with self.lock_raw:  # (self.lock's) a route lets go only under it, with nothing pending
            if not (route.holding and route.link.alive and route.local_id not in self.closing):
                if not self._hold_route(route, key):
                    return None
                first = True
            job = route.native.start(src_blocks, dst_blocks, bool(notify))
            if job:
                transfer = Transfer(len(dst_blocks) * route.block_bytes, dst_blocks, route.description, path)  # type: ignore[arg-type]
                transfer.assist = functools.partial(self._assist_routed, route, job)
                route.pending[job] = (transfer, time.monotonic() + self.wait_s, notify)
                self.routes["same_host"] += 1
                self.route_starts += 1
        if not job:
            self._route_idle(route)
            return None
        if first:
            # The progress thread watches the route's copies (deadlines, notices, copies
            # nobody waits for). It looks at them JOB_SWEEP_S from now: woken at once, it
            # would take the GIL from this thread, which is likely starting more.
            if self.progress_thread is None:
                self._wake_progress()
            else:
                _C.peer_copy_watch(max(1, int(JOB_SWEEP_S * 1000)))
        return transfer

    def _drop_routes(self, stale: Callable[[_Route], bool]) -> None:
        """Forgets the idle routes ``stale`` picks (caller holds self.lock); a busy one is
        dropped by its next start, which finds it stale."""
        for key, route in list(self.fast_routes.items()):
            if not route.holding and stale(route):
                del self.fast_routes[key]

    def _hold_route(self, route: _Route, key: tuple) -> bool:
        """Under the lock: whether the route may start copies (its lease still the shared
        one, its link up and current, its local cache not closing; else it is dropped), and
        its hold on the cache and the lease, taken once for all of its copies."""
        link, lease = route.link, route.lease
        if (
            self.shared_leases.get(lease.key) is not lease
            or not link.alive
            or self.links.get(key[1]) is not link  # key: (operation, cluster id, ...)
            or route.local_id in self.closing
        ):
            self.fast_routes.pop(key, None)
            return False
        if route.holding:
            return True
        try:
            _C.hold(route.local_id)
        except RuntimeError:
            return False  # no longer registered: the general path says so
        self._count_in(route.local_id)
        if lease.refs == 0:
            self.lingering -= 1
        lease.refs += 1
        route.holding = True
        self.busy_routes.add(route)
        return True

    def _assist_routed(self, route: _Route, job: int, timeout_ms: int) -> None:
        """Transfer.wait's help with a routed copy: moves queued bytes, then completes the
        transfer itself unless the progress thread got there first."""
        code = _C.peer_copy_help(job, timeout_ms)
        if code == _JOB_RUNNING:
            return
        entry = route.pending.pop(job, None)  # one thread gets it (the GIL makes pop atomic)
        if entry is None:
            return  # the progress thread completes it
        self.job_completions["waiter"] += 1
        self._complete_routed(route, job, entry, code)

    def _complete_routed(self, route: _Route, job: int, entry: tuple[Transfer, float, bytes], code: int) -> None:
        """Completes a routed copy whose entry this thread popped; ``code``: its job's state
        (running: past its deadline or its peer gone, so cancelled here). Its notice goes
        out once every byte has landed; what it held is let go before anyone waiting wakes."""
        transfer, _deadline, notify = entry
        transfer.assist = None
        peer, state, failure = route.link.cluster_id, "DONE", ""
        if code == _JOB_RUNNING:
            _C.peer_copy_cancel(job)  # its memory stays held until its threads stop
            route.draining.add(job)
            state = "PROC" if route.link.alive else "ERR"
        else:
            _C.peer_copy_release(job)
            if code != _JOB_DONE:
                state, failure = "ERR", f"same-host copy ({os.strerror(-code)})"
            elif notify:
                try:
                    self.agent.send_notif(route.link.agent_name, notify)
                except Exception as exc:
                    state, failure = "ERR", f"the notice after a same-host copy ({exc})"
        if not route.pending and not route.draining:
            self._route_idle(route)
        if state == "DONE":
            transfer.succeed()
        else:
            transfer.fail(self._failure(peer, state, failure or "same-host copy (the peer is gone)"))

    def _route_idle(self, route: _Route) -> None:
        """Lets go of what a route held, if it has nothing under way any more."""
        with self.lock:
            if route.pending or route.draining or not route.holding:
                return
            route.holding = False
            self.busy_routes.discard(route)
        self._settle(route.link, route.lease, route.local_id, None)

    def _sweep_routes(self) -> tuple[int, float | None]:
        """The progress thread's look at routed copies: completes those that ended (nobody
        waited) or are past their deadline or peer, lets go of drained jobs. Returns how many
        it completed and the first deadline still ahead (None if none)."""
        completed, first_deadline = 0, None
        now = time.monotonic()
        for route in list(self.busy_routes):
            for job in list(route.draining):
                try:
                    code = _C.peer_copy_state(job)
                except ValueError:
                    code = _JOB_DONE  # (not expected: draining jobs are released only here)
                if code != _JOB_RUNNING:
                    with contextlib.suppress(ValueError):
                        _C.peer_copy_release(job)
                    route.draining.discard(job)
            for job, entry in list(route.pending.items()):
                try:
                    code = _C.peer_copy_state(job)
                except ValueError:
                    continue  # its waiter completed and released it just now
                if code == _JOB_RUNNING and route.link.alive and now <= entry[1]:
                    first_deadline = entry[1] if first_deadline is None else min(first_deadline, entry[1])
                    continue
                if route.pending.pop(job, None) is None:
                    continue  # its waiter completes it
                self.job_completions["progress"] += 1
                completed += 1
                self._complete_routed(route, job, entry, code)
            if not route.pending and not route.draining:
                self._route_idle(route)
        return completed, first_deadline

    def _fail_routes(self) -> None:
        """finalize: routed copies still under way fail, their jobs stopped and let go."""
        for route in list(self.busy_routes):
            for job in list(route.pending):
                entry = route.pending.pop(job, None)
                if entry is None:
                    continue
                log.warning("finalize: a transfer with cluster %s was still in flight", route.link.cluster_id)
                route.draining.add(job)
                entry[0].assist = None
                entry[0].fail(_error(LLMStatusCode.LLM_FAILED, "finalized with the transfer in flight"))
            for job in list(route.draining):
                with contextlib.suppress(ValueError):  # stops at its threads' next call
                    _C.peer_copy_cancel(job)
                    _C.peer_copy_wait(job, int(1000 * self.wait_s) + 1000)
                    _C.peer_copy_release(job)
                route.draining.discard(job)
            self._route_idle(route)

    def _lease(self, link: Link, remote_ref: int | str, cluster_id: int) -> _SharedLease:
        """A lease on the peer's cache. Transfers in flight at the same time on the same
        remote cache share one (acquired by the first, released by the last), so that a
        burst of requests costs one round trip, not two per request."""
        key = (id(link), remote_ref)
        with self.lock:
            shared = self.shared_leases.get(key)
            if shared is not None and shared.link is link and link.alive:
                if shared.refs == 0:
                    self.lingering -= 1
                shared.refs += 1
                return shared
        request = (
            {"op": "acquire", "key": remote_ref}
            if isinstance(remote_ref, str)
            else {"op": "acquire", "cache_id": remote_ref}
        )
        response = link.request(request)
        try:
            lease, remote, md = protocol.parse_acquire_response(response)
            index = protocol.parse_acquire_index(response)
        except protocol.ProtocolError as exc:
            if isinstance(response.get("lease"), int):
                with contextlib.suppress(LLMException):
                    link.request({"op": "release", "lease": response["lease"]})
            raise _error(
                LLMStatusCode.LLM_FAILED, f"cluster {cluster_id} sent a malformed cache entry: {exc}"
            ) from None
        shared = _SharedLease(key, link, lease, remote, md, index)
        with self.lock:
            if key not in self.shared_leases:  # else another thread won the race: ours stays private
                self.shared_leases[key] = shared
        return shared

    def _unlease(self, shared: _SharedLease) -> None:
        with self.lock:
            shared.refs -= 1
            if shared.refs > 0:
                return
            linger = self.shared_leases.get(shared.key) is shared and shared.link.alive and not self.stopping
            if linger:
                shared.idle_since = time.monotonic()
                self.lingering += 1
            elif self.shared_leases.get(shared.key) is shared:
                del self.shared_leases[shared.key]
        if linger:
            self._wake_progress()  # it gives the lease back once it has lingered
        elif shared.link.alive:
            with contextlib.suppress(LLMException):
                shared.link.request({"op": "release", "lease": shared.lease})

    def _expire_leases(self, everything: bool = False) -> float | None:
        """Gives back the leases that have lingered LEASE_LINGER_S unused (``everything``:
        all unused ones); returns the seconds until the next one is due, None if none."""
        if not self.lingering:
            return None
        now, due, expired = time.monotonic(), None, []
        with self.lock:
            for key, shared in list(self.shared_leases.items()):
                if shared.refs or shared.idle_since is None:
                    continue
                left = shared.idle_since + LEASE_LINGER_S - now
                if everything or left <= 0 or not shared.link.alive:
                    del self.shared_leases[key]
                    self.lingering -= 1
                    expired.append(shared)
                else:
                    due = left if due is None else min(due, left)
            if expired:
                gone = {id(shared) for shared in expired}
                self._drop_routes(lambda route: id(route.lease) in gone)
        for shared in expired:
            if shared.link.alive:
                with contextlib.suppress(LLMException):
                    shared.link.request({"op": "release", "lease": shared.lease})
        return due

    def _wake_progress(self) -> None:
        with self.progress:
            if self.progress_thread is None:
                self.progress_thread = threading.Thread(target=self._progress, name="kvreg-progress", daemon=True)
                self.progress_thread.start()
            self.progress.notify()
        _C.peer_copy_wake()  # it may be waiting on same-host copies: it has a new flight to see

    def _settle(self, link: Link, lease: _SharedLease | None, local_id: int, handle: NixlHandle) -> bool:
        """Releases what a transfer held; False (holding on) while NIXL still owns the handle."""
        if handle is not None:
            try:
                self.agent.release_xfer_handle(handle)
            except Exception:
                return False
        if lease is not None:
            self._unlease(lease)
        self.unhold_local(local_id)
        return True

    def _post(self, flight: _Flight) -> str:
        """Hands a flight's NIXL request to NIXL; its state ("PROC", "DONE" or "ERR")."""
        flight.posted = True
        try:
            return self.agent.transfer(flight.handle, flight.notify)
        except Exception as exc:
            log.warning("NIXL refused to post a transfer: %s", exc)
            return "ERR"

    def _post_waiting(self, waiting: list[_Flight]) -> set[int]:
        """Posts the flights started in the background, in the order started. Consecutive
        requests of one kind to one peer become one NIXL request (the first flight leads, the
        others ride along and land with it): a burst of small transfers costs one post,
        not one each. A flight with a notice ends its group, so the notice still follows
        all of its data. Returns the ids of the flights that ride along."""
        riders: set[int] = set()
        requests = [flight.nixl_request for flight in waiting]
        i = 0
        while i < len(waiting):
            group = [waiting[i]]
            descriptors = len(requests[i])
            i += 1
            while (
                not group[-1].notify
                and i < len(waiting)
                and requests[i].key == requests[i - len(group)].key
                and descriptors + len(requests[i]) <= MAX_GROUP_DESCRIPTORS
            ):
                group.append(waiting[i])
                descriptors += len(requests[i])
                i += 1
            leader = group[0]
            leader.riders = group[1:]
            riders.update(id(flight) for flight in leader.riders)
            leader.notify = group[-1].notify
            leader.deadline = min(flight.deadline for flight in group)
            try:
                leader.handle = _Request.handle_of([flight.nixl_request for flight in group])
            except Exception as exc:
                log.warning("NIXL could not prepare a transfer: %s", exc)
                leader.posted, leader.state = True, "ERR"
                continue
            nbytes = sum(flight.transfer.nbytes for flight in group)
            self.posting_since, self.posting_expected_s = time.monotonic(), nbytes / self.post_rate
            leader.state = self._post(leader)
            took = time.monotonic() - self.posting_since
            self.posting_since = None
            if took > 0 and nbytes >= 1 << 16:  # a running estimate of how fast posts move bytes
                self.post_rate = 0.7 * self.post_rate + 0.3 * (nbytes / took)
        return riders

    def _track(self, flight: _Flight, state: str | None) -> None:
        """Hands a flight to the progress thread (``state`` None: not posted yet)."""
        if state not in (None, "PROC") and self._land(flight, state):
            return
        with self.progress:
            idle = self.progress_idle
            hand_over = state is None and idle
            self.flights.append(flight)
        if flight.job is None or idle or self.progress_thread is None:
            self._wake_progress()  # a busy progress thread sees a same-host copy when any copy ends
        posting_since = self.posting_since
        if (
            state is None
            and posting_since is not None
            and posting_since != self.handed_over_at
            and time.monotonic() - posting_since > self.posting_expected_s
        ):
            self.handed_over_at = posting_since  # once per post: each hand-over costs this thread
            hand_over = True
        if hand_over:
            # The first of a burst, or the progress thread's post has most likely finished
            # and it now waits for the GIL: let it take the GIL and post what waits. Otherwise
            # it waits for the interpreter's switch interval (5 ms) while this thread starts
            # more, and the burst's bytes move only after the last start.
            time.sleep(HAND_OVER_S)

    def _release(self, flight: _Flight) -> bool:
        """Releases what a flight and its riders held; False (holding on) while NIXL still
        owns the handle."""
        if flight.handle is not None:
            try:
                self.agent.release_xfer_handle(flight.handle)
            except Exception:
                return False
            flight.handle = None
        if flight.job is not None:
            if _C.peer_copy_state(flight.job) == _JOB_RUNNING:
                return False  # cancelled, or timed out: its threads stop at their next call
            _C.peer_copy_release(flight.job)
            flight.job = None
            flight.transfer.assist = None
        for member in flight.members():
            self._settle(member.link, member.lease, member.local_id, None)
        return True

    def _land(self, flight: _Flight, state: str) -> bool:
        """Completes a flight (and its riders) whose state is known; True once everything
        is released."""
        peer = flight.link.cluster_id
        # Released before the waiter wakes, so that what it does next (unregister, ask the
        # peer) finds nothing held. A transfer NIXL still runs keeps its local cache and the
        # peer's lease held (neither side may free memory under it) until NIXL lets go.
        settled = self._release(flight)
        for member in flight.members():
            if state == "DONE":
                member.transfer.succeed()
            else:
                member.transfer.fail(self._failure(peer, state, flight.failure or "NIXL transfer"))
        return settled

    def _failure(self, peer: int | None, state: str, reason: str) -> LLMException:
        """The error of a transfer that ended in ``state`` ("PROC": still running at its
        deadline; "ERR": failed, for ``reason``)."""
        if state == "PROC":
            return _error(
                LLMStatusCode.LLM_TIMEOUT, f"transfer with cluster {peer} not done within {self.wait_s * 1000:.0f} ms"
            )
        return _error(LLMStatusCode.LLM_LINK_FAILED, f"{reason} with cluster {peer} failed")

    def _progress(self) -> None:
        """Posts the transfers started in the background, drives NIXL and completes
        transfers: polls without sleeping while any is in flight (each status check drives
        UCX progress; sleeping cost 5-10% of throughput on scattered blocks), handing the
        GIL on between polls; waits when there is none."""
        idle = 0  # polls since a transfer last landed
        while True:
            # Read before looking at the flights: a copy that ends, or a wake, after the look
            # is not missed.
            ends, wakes = _C.peer_copy_ends(), _C.peer_copy_wakes()
            due = self._expire_leases()
            with self.progress:
                resting = not self.flights and not self.busy_routes
                if resting:
                    if self.stopping:
                        return
                    self.progress_idle = True
                    if due is None and self.lingering:
                        due = LEASE_LINGER_S  # (a lease that began to linger since it looked)
                flights = list(self.flights)
            if resting:
                # Natively, without the GIL, until a new flight or stop (_wake_progress), a
                # lingering lease is due, or a route's copies want a look (peer_copy_watch).
                _C.peer_copy_wait_ends(ends, wakes, -1 if due is None else max(1, int(due * 1000)))
                with self.progress:
                    self.progress_idle = False
                continue
            waiting = [flight for flight in flights if not flight.posted]
            if waiting:
                riders = self._post_waiting(waiting)
                if riders:
                    with self.progress:
                        self.flights = [flight for flight in self.flights if id(flight) not in riders]
                    flights = [flight for flight in flights if id(flight) not in riders]
            landed = [flight for flight in flights if self._poll(flight)]
            routed, route_deadline = self._sweep_routes() if self.busy_routes else (0, None)
            if landed or routed:
                idle = 0
                with self.progress:
                    for flight in landed:
                        if flight in self.flights:  # (a waiter may have taken a same-host copy)
                            self.flights.remove(flight)
            else:
                idle += 1
            if not landed and all(flight.job is not None and not flight.settled_late for flight in flights):
                # nothing to drive: copies need no polling
                self._wait_for_jobs(flights, due, ends, wakes, route_deadline)
            elif all(flight.settled_late for flight in flights):
                time.sleep(0.01)  # only handles NIXL has not let go of: no hurry
            elif idle > 2048:
                # A long transfer: back off so that the threads computing beside it (which
                # need the GIL between their torch ops) are not starved.
                time.sleep(0.0001)
            else:
                # Lets a thread that wants the GIL back (a compute thread between its torch
                # ops, a caller starting transfers) take it now rather than after the
                # interpreter's 5 ms switch interval.
                time.sleep(0)

    def _poll(self, flight: _Flight) -> bool:
        """One look at a posted flight; True once it has landed and released what it held."""
        if flight.settled_late:  # completed earlier; retry releasing what it held
            return self._release(flight)
        if flight.job is not None:
            return self._poll_job(flight)
        if flight.state is not None:  # known when it was posted
            state, flight.state = flight.state, None
        else:
            try:
                state = self.agent.check_xfer_state(flight.handle)
            except Exception:
                state = "ERR"
        if state == "PROC" and not flight.link.alive:
            state = "ERR"  # the peer is gone (closed, or silenced past the heartbeat)
        if state == "PROC" and time.monotonic() <= flight.deadline:
            return False
        if self._land(flight, state):
            return True
        flight.settled_late = True
        return False

    def _poll_job(self, flight: _Flight) -> bool:
        """_poll for a same-host copy (True also when its waiter completed it)."""
        job = flight.job
        if job is None or flight.claimed:
            return True  # its waiter completed it (or is completing it)
        try:
            code = _C.peer_copy_state(job)
        except ValueError:
            return True  # its waiter completed and released it just now
        if code == _JOB_RUNNING and flight.link.alive and time.monotonic() <= flight.deadline:
            return False
        if not self._claim(flight):
            return True  # its waiter completes it
        if code == _JOB_RUNNING:
            _C.peer_copy_cancel(job)  # its memory stays held until its threads stop
        self.job_completions["progress"] += 1
        return self._finish_job(flight, code)

    def _claim(self, flight: _Flight) -> bool:
        """True for the one thread (progress thread or waiter) that completes a flight."""
        with self.progress:
            if flight.claimed:
                return False
            flight.claimed = True
            return True

    def _assist(self, flight: _Flight, timeout_ms: int) -> None:
        """Transfer.wait's help with a same-host copy: the waiting thread moves queued bytes
        itself, and completes the transfer once they have landed (no hand-over to the
        progress thread and back per transfer)."""
        job = flight.job
        if job is None:
            return
        code = _C.peer_copy_help(job, timeout_ms)  # moves bytes, then waits for the rest
        if code == _JOB_RUNNING:
            return
        with self.progress:  # claimed (see _claim) and taken from the progress thread at once
            if flight.claimed:
                return
            flight.claimed = True
            if flight in self.flights:
                self.flights.remove(flight)
        self.job_completions["waiter"] += 1
        if not self._finish_job(flight, code):
            with self.progress:
                self.flights.append(flight)  # the progress thread lets go of it later
            self._wake_progress()

    def _finish_job(self, flight: _Flight, code: int) -> bool:
        """Completes a claimed same-host copy whose state is ``code``; its notice goes out
        once every byte has landed. True once everything is released."""
        if code == _JOB_RUNNING:  # past its deadline, or the peer is gone
            state = "PROC" if flight.link.alive else "ERR"
            flight.failure = "" if flight.link.alive else "same-host copy (the peer is gone)"
        elif code == _JOB_DONE:
            state = "DONE"
        else:
            state, flight.failure = "ERR", f"same-host copy ({os.strerror(-code)})"
        if state == "DONE" and flight.notify:
            try:
                self.agent.send_notif(flight.link.agent_name, flight.notify)
            except Exception as exc:
                state, flight.failure = "ERR", f"the notice after a same-host copy ({exc})"
        if self._land(flight, state):
            return True
        flight.settled_late = True
        return False

    def _wait_for_jobs(
        self, flights: list[_Flight], due: float | None, ends: int, wakes: int, deadline: float | None = None
    ) -> None:
        """Blocks without the GIL until a same-host copy with a notice ends (one started
        since too: a start need not wake this thread), a NIXL flight arrives, JOB_SWEEP_S
        has passed (copies nobody waits for), or the first deadline or lease expiry is due.
        Waking on every copy's end would take the GIL from the thread starting them."""
        now = time.monotonic()
        until = min(
            [flight.deadline for flight in flights]
            + [now + JOB_SWEEP_S]
            + ([] if due is None else [now + due])
            + ([] if deadline is None else [deadline])
        )
        _C.peer_copy_wait_ends(ends, wakes, max(1, int((until - now) * 1000)))

    def stop_progress(self) -> None:
        """Stops the progress thread (finalize). Transfers NIXL still holds then fail and
        give up their holds, so that finalize cannot hang on a peer that never answers."""
        with self.progress:
            self.stopping = True
            self.progress.notify()
            thread = self.progress_thread
        _C.peer_copy_wake()  # it waits natively when idle
        if thread is not None:
            thread.join(timeout=self.wait_s + 1)
        with self.progress:
            leftovers, self.flights = self.flights, []
        for flight in leftovers:
            log.warning("finalize: a transfer with cluster %s was still in flight", flight.link.cluster_id)
            if flight.handle is not None:
                with contextlib.suppress(Exception):
                    self.agent.release_xfer_handle(flight.handle)
            job = flight.job
            if job is not None:  # stops at its threads' next call; memory stays until then
                with contextlib.suppress(ValueError):  # unless a waiter released it just now
                    _C.peer_copy_cancel(job)
                    _C.peer_copy_wait(job, int(1000 * self.wait_s) + 1000)
                    _C.peer_copy_release(job)
            for member in flight.members():
                member.transfer.fail(_error(LLMStatusCode.LLM_FAILED, "finalized with the transfer in flight"))
                self.unhold_local(member.local_id)
        self._fail_routes()
        self._expire_leases(everything=True)

    def notifications(self) -> list[tuple[int | None, bytes]]:
        """Completion notices peers sent since the last call, oldest first, with the
        sending cluster id (None for an agent this process has no link with)."""
        try:
            received = self.agent.get_new_notifs()
        except Exception as exc:
            log.warning("NIXL notifications unavailable: %s", exc)
            return []
        with self.lock:
            clusters = dict(self.senders)
        out: list[tuple[int | None, bytes]] = []
        for agent_name, messages in received.items():
            name = agent_name.decode() if isinstance(agent_name, bytes) else str(agent_name)
            out.extend((clusters.get(name), bytes(message)) for message in messages)
        return out

    def _request(
        self,
        operation: str,
        local: Cache,
        remote: RemoteCache,
        link: Link,
        local_offsets: np.ndarray,
        remote_offsets: np.ndarray,
        lengths: np.ndarray,
        local_sel: np.ndarray,
        remote_sel: np.ndarray,
    ) -> _Request:
        local_addrs = np.asarray(local.tensor_addrs, dtype=np.uint64)[local_sel]
        remote_addrs = np.asarray(remote.addrs, dtype=np.uint64)[remote_sel]
        local_rows = plan.descriptors(local_addrs, plan.device_id(local.cache_desc), local_offsets, lengths)
        remote_rows = plan.descriptors(remote_addrs, plan.device_id(remote.desc), remote_offsets, lengths)

        agent, local_mem, remote_mem = self.agent, plan.mem_type(local.cache_desc), plan.mem_type(remote.desc)

        def make_handle(local_rows: np.ndarray, remote_rows: np.ndarray) -> NixlHandle:
            return agent.initialize_xfer(
                operation,
                agent.get_xfer_descs(local_rows, local_mem),
                agent.get_xfer_descs(remote_rows, remote_mem),
                link.agent_name,
            )

        return _Request(("rows", operation, id(link), local_mem, remote_mem), local_rows, remote_rows, make_handle)

    def _per_block_rows(self, addrs: Sequence[int], desc: CacheDesc) -> np.ndarray:
        offsets = np.arange(desc.shape[0], dtype=np.uint64) * np.uint64(desc.block_nbytes)
        lengths = np.full(desc.shape[0], desc.block_nbytes, dtype=np.uint64)
        return plan.descriptors(addrs, plan.device_id(desc), offsets, lengths)

    def _prepped_request(
        self,
        operation: str,
        local: Cache,
        remote: RemoteCache,
        link: Link,
        local_offsets: np.ndarray,
        remote_offsets: np.ndarray,
        block_nbytes: int,
        local_sel: np.ndarray,
        remote_sel: np.ndarray,
    ) -> _Request:
        agent = self.agent
        with self.lock:
            local_prep = self.local_preps.get(local.cache_id)
        if local_prep is None:
            local_prep = agent.prep_xfer_dlist(
                "NIXL_INIT_AGENT",
                self._per_block_rows(local.tensor_addrs, local.cache_desc),
                plan.mem_type(local.cache_desc),
            )
            with self.lock:
                self.local_preps[local.cache_id] = local_prep
        remote_prep = link.remote_preps.get(remote.cache_id)
        if remote_prep is None:
            remote_prep = agent.prep_xfer_dlist(
                link.agent_name, self._per_block_rows(remote.addrs, remote.desc), plan.mem_type(remote.desc)
            )
            link.remote_preps[remote.cache_id] = remote_prep

        def indices(offsets: np.ndarray, num_blocks: int, selected: np.ndarray) -> np.ndarray:
            blocks = (offsets // np.uint64(block_nbytes)).astype(np.int64)
            tensors = selected[:, None] * num_blocks
            return (tensors + blocks[None, :]).reshape(-1).astype(np.int32)

        local_idx = indices(local_offsets, local.cache_desc.shape[0], local_sel)
        remote_idx = indices(remote_offsets, remote.desc.shape[0], remote_sel)

        def make_handle(local_idx: np.ndarray, remote_idx: np.ndarray) -> NixlHandle:
            return agent.make_prepped_xfer(operation, local_prep, local_idx, remote_prep, remote_idx)

        return _Request(
            ("prepped", operation, id(link), id(local_prep), id(remote_prep)), local_idx, remote_idx, make_handle
        )


class _Request:
    """A NIXL request not made yet: each side's descriptor rows (or indices into prepared
    lists) and how to make a handle of them. Requests with equal keys (one peer, operation
    and kind of memory, or the same prepared lists) can be made into one handle."""

    def __init__(
        self,
        key: tuple,
        local_part: np.ndarray,
        remote_part: np.ndarray,
        make_handle: Callable[[np.ndarray, np.ndarray], NixlHandle],
    ):
        self.key, self.local_part, self.remote_part, self.make_handle = key, local_part, remote_part, make_handle

    def __len__(self) -> int:
        return len(self.local_part)

    @staticmethod
    def handle_of(requests: list[_Request]) -> NixlHandle:
        """One NIXL handle moving every request's descriptors (all of one key)."""
        if len(requests) == 1:
            return requests[0].make_handle(requests[0].local_part, requests[0].remote_part)
        local_part = np.concatenate([request.local_part for request in requests])
        remote_part = np.concatenate([request.remote_part for request in requests])
        if local_part.ndim == 2:
            local_part, remote_part = _joined_rows(local_part, remote_part)
        return requests[0].make_handle(local_part, remote_part)


def _joined_rows(local_rows: np.ndarray, remote_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(address, length, device) rows of both sides in local address order, each run of
    rows adjacent on both sides joined into one: what one request for all those blocks
    would have had (the planner joins runs within a request; this joins across them)."""
    order = np.argsort(local_rows[:, 0], kind="stable")
    local_rows, remote_rows = local_rows[order], remote_rows[order]
    lengths = local_rows[:, 1]
    joins = (
        (local_rows[1:, 0] == local_rows[:-1, 0] + lengths[:-1])
        & (remote_rows[1:, 0] == remote_rows[:-1, 0] + lengths[:-1])
        & (local_rows[1:, 2] == local_rows[:-1, 2])
        & (remote_rows[1:, 2] == remote_rows[:-1, 2])
    )
    if not joins.any():
        return local_rows, remote_rows
    starts = np.flatnonzero(np.concatenate(([True], ~joins)))
    joined = np.add.reduceat(lengths, starts)
    local_rows, remote_rows = local_rows[starts], remote_rows[starts]
    local_rows[:, 1] = joined
    remote_rows[:, 1] = joined
    return local_rows, remote_rows


class _Flight:
    """One transfer handed to NIXL (or waiting for the progress thread to hand it over) and
    what it holds until it lands. A flight posted with others in one request leads them:
    they ride along and land with it."""

    def __init__(
        self,
        transfer: Transfer,
        link: Link,
        lease: _SharedLease | None,
        local_id: int,
        request: _Request | None,
        deadline: float,
        notify: bytes = b"",
    ):
        self.transfer, self.link, self.lease, self.local_id = transfer, link, lease, local_id
        self.request, self.deadline, self.notify = request, deadline, notify
        self.handle = None
        self.riders: list[_Flight] = []
        self.posted = False  # a background request waits for the progress thread to post it
        self.state: str | None = None  # the state its post returned, until polled
        self.settled_late = False
        self.job: int | None = None  # a same-host copy job instead of a NIXL request
        self.claimed = False  # a thread completes it (same-host copies: progress or waiter)
        self.failure = ""  # why it failed, when NIXL does not say

    @property
    def nixl_request(self) -> _Request:
        """The NIXL request of a flight that has one (every flight but a same-host copy)."""
        assert self.request is not None, "a same-host copy has no NIXL request"
        return self.request

    def members(self) -> list[_Flight]:
        return [self, *self.riders]


class _Route:
    """A same-host block route (Engine.start_routed): the native route, what it uses, and
    its copies under way. While it has any (pending or draining) it holds the local cache
    and one reference to the shared lease, for all of them together."""

    __slots__ = ("native", "link", "lease", "local_id", "description", "pending", "draining", "holding", "block_bytes")

    def __init__(self, native: _C.PeerRoute, link: Link, lease: _SharedLease, local_id: int, description: str):
        self.native, self.link, self.lease, self.local_id = native, link, lease, local_id
        self.description = description
        self.block_bytes = native.block_bytes
        # Copies not completed yet: job -> (transfer, deadline, notice). Whoever pops a job's
        # entry (its waiter, or the progress thread) completes it.
        self.pending: dict[int, tuple[Transfer, float, bytes]] = {}
        # Jobs completed as failed while their threads may still move bytes (cancelled):
        # their memory stays held until the threads stop.
        self.draining: set[int] = set()
        self.holding = False


class _SharedLease:
    """A lease on a peer's cache and its entry, shared by the transfers using it now."""

    def __init__(self, key: tuple, link: Link, lease: int, remote: RemoteCache, md: bytes, index: int):
        self.key, self.link, self.lease = key, link, lease
        self.remote, self.md, self.index = remote, md, index
        self.refs = 1
        self.idle_since: float | None = None  # when its last transfer let go of it
