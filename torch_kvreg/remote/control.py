"""Links: the control connections between torch_kvreg processes, the server that accepts
them, and the heartbeat that finds the silent ones.

A link carries typed requests (protocol.py) both ways: whichever side opened it, each side
sends requests and serves the other's (a prompt that linked to a decoder can be pushed to
by that decoder). A reader thread per link serves requests and hands replies to waiters.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np

from ..errors import LLMException, LLMStatusCode, make_error
from ..types import ClusterInfo
from . import protocol

if TYPE_CHECKING:
    from .agent import MetadataLoad

log = logging.getLogger("torch_kvreg.remote")


class LinkOwner(Protocol):
    """What a link needs of the engine it belongs to."""

    def serve(self, request: protocol.Request, link: Link) -> protocol.Reply: ...

    def connection_closed(self, link: Link) -> None: ...

    def end_lease(self, lease: int) -> None: ...

    def notice(self, link: Link, message: bytes) -> None: ...


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


class Link:
    """One control connection to a peer cluster, whichever side opened it."""

    def __init__(
        self, owner: LinkOwner, sock: socket.socket, info: ClusterInfo | None, wait_s: float, authenticated: bool
    ):
        self.owner = owner
        self.sock = sock
        self.info = info  # None until a hello names the peer (inbound connections)
        self.agent_name = ""
        # The load of the peer's NIXL agent metadata into ours, once begun (it may still run:
        # whatever needs the peer's agent waits for it).
        self.nixl: MetadataLoad | None = None
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
        self.remote_preps: dict[int, object] = {}  # remote cache id -> prepared per-block list
        # Requests from the peer are served only once it has proved the link secret (or the
        # engine has none). An inbound link remembers the challenge it answered.
        self.authenticated = authenticated
        self.challenge: tuple[int, bytes, bytes] | None = None  # (cluster id, its nonce, ours)
        self.last_heard = time.monotonic()
        # A peer on this host whose memory this process may copy directly: its pid.
        self.peer_pid: int | None = None
        self.same_host_nonce: np.ndarray | None = None  # what we showed a linker, kept alive
        # Work a served request left for after its reply has gone out (the engine loading a
        # linker's agent metadata while the linker loads ours); an LLMException drops the link.
        self.after_reply: Callable[[], None] | None = None

    @property
    def cluster_id(self) -> int | None:
        return None if self.info is None else self.info.remote_cluster_id

    def _send(self, message: dict) -> None:
        with self.send_lock:
            self.sock.sendall(protocol.encode(message))

    def request(self, request: protocol.Request, timeout_s: float | None = None) -> dict:
        """One request and its reply (checked to be no failure; the caller parses the rest
        with its reply record); LLM_TIMEOUT or LLM_LINK_FAILED when the peer fails, the
        peer's own status when it refused."""
        timeout_s = self.wait_s if timeout_s is None else timeout_s
        peer = self.cluster_id if self.cluster_id is not None else "peer"
        if not self.alive:
            raise make_error(LLMStatusCode.LLM_LINK_FAILED, f"the link to cluster {peer} is down")
        request_id = next(self.request_ids)
        slot: list = [threading.Event(), None]
        with self.pending_lock:
            self.pending[request_id] = slot
        try:
            self._send({**request.to_wire(), "id": request_id})
        except (OSError, protocol.ProtocolError) as exc:
            with self.pending_lock:
                self.pending.pop(request_id, None)
            raise make_error(LLMStatusCode.LLM_LINK_FAILED, f"link to cluster {peer} failed: {exc}") from None
        if not slot[0].wait(timeout_s):
            with self.pending_lock:
                self.pending.pop(request_id, None)
            raise make_error(
                LLMStatusCode.LLM_TIMEOUT, f"cluster {peer} did not answer within {timeout_s * 1000:.0f} ms"
            )
        response = slot[1]
        if response is None:
            raise make_error(LLMStatusCode.LLM_LINK_FAILED, f"the link to cluster {peer} closed")
        try:
            failure = protocol.Failure.of(response)
        except protocol.ProtocolError as exc:
            raise make_error(LLMStatusCode.LLM_FAILED, f"malformed response: {exc}") from None
        if failure is not None:
            raise make_error(failure.status, f"cluster {peer}: {failure.message}")
        return response

    def notice(self, message: bytes) -> None:
        """Sends a transfer's completion notice (one way: the peer answers nothing). Raises
        OSError or ProtocolError when the link cannot send."""
        if not self.alive:
            raise ConnectionError("the link is down")
        self._send(protocol.Notice(message).to_wire())

    def ping(self) -> None:
        """Asks the peer for a sign of life without waiting; its answer (any frame, in
        fact) refreshes ``last_heard``. A link that cannot even send is closed."""
        request_id = next(self.request_ids)
        with self.pending_lock:
            self.pending[request_id] = [threading.Event(), None]  # the answer lands here, unread
        try:
            self._send({**protocol.Ping().to_wire(), "id": request_id})
        except (OSError, protocol.ProtocolError):
            self.close()

    def _reply(self, reply: protocol.Reply, request_id: object) -> None:
        message = reply.to_wire()
        if request_id is not None:
            message["id"] = request_id
        with contextlib.suppress(OSError, protocol.ProtocolError):
            self._send(message)

    def _deliver(self, message: dict) -> bool:
        """Hands a reply to its waiter; False if the frame is no awaited reply."""
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
            self._serve()
        finally:
            if self.alive:
                self.closed_at = time.monotonic()
            self.alive = False
            with self.pending_lock:
                waiting, self.pending = list(self.pending.values()), {}
            for slot in waiting:
                slot[0].set()  # response None: the link closed
            for lease in list(self.leases):
                self.owner.end_lease(lease)
            self.leases.clear()
            self.owner.connection_closed(self)

    def _serve(self) -> None:
        malformed = LLMStatusCode.LLM_PARAM_INVALID
        while True:
            try:
                message = read_message(self.sock)
            except (ConnectionError, OSError):
                return
            except protocol.ProtocolError as exc:
                self._reply(protocol.Failure(malformed, f"malformed request: {exc}"), None)
                return  # a peer that sends garbage loses its connection
            self.last_heard = time.monotonic()
            if self._deliver(message):
                continue
            request_id = message.get("id")
            if request_id is not None and (type(request_id) is not int or not 0 < request_id < 2**63):
                request_id = None
            try:
                request = protocol.parse_request(message)
                if request_id is None and message.get("id") is not None:
                    raise protocol.ProtocolError("field 'id' must be a positive int")
            except protocol.ProtocolError as exc:
                self._reply(protocol.Failure(malformed, f"malformed request: {exc}"), request_id)
                return
            handshake = isinstance(request, (protocol.Challenge, protocol.Hello))
            if not self.authenticated and (not handshake or self.info is not None):
                # Before the peer proved the secret: only the handshake, and only on a link
                # it opened. Nothing else is answered, and the link is dropped.
                text = "this cluster requires a link secret; the handshake did not prove it"
                self._reply(protocol.Failure(LLMStatusCode.LLM_LINK_FAILED, text), request_id)
                return
            if isinstance(request, protocol.Notice):
                self.owner.notice(self, request.message)  # one way: nothing is answered
                continue
            if isinstance(request, protocol.Bye):
                self.said_bye = True
                self._reply(protocol.Ok(), request_id)
                return
            reply: protocol.Reply
            try:
                reply = self.owner.serve(request, self)
            except LLMException as exc:
                reply = protocol.Failure(exc.status_code, exc.detail)
            self._reply(reply, request_id)
            if handshake and isinstance(reply, protocol.Failure):
                return  # a failed handshake ends the connection
            then, self.after_reply = self.after_reply, None
            if then is not None:
                try:
                    then()
                except LLMException as exc:
                    log.warning("dropping a link a peer opened: %s", exc.detail)
                    return  # the peer's next request finds the link closed

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


def connect(address: tuple[str, int], timeout_s: float) -> socket.socket | LLMStatusCode:
    """A connected control socket, or the status of the failure (LLM_TIMEOUT, LLM_LINK_FAILED)."""
    try:
        sock = socket.create_connection(address, timeout=timeout_s)
    except TimeoutError:
        return LLMStatusCode.LLM_TIMEOUT
    except OSError:
        return LLMStatusCode.LLM_LINK_FAILED
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)  # the reader blocks; requests time out on their own
    return sock


class _Handler(socketserver.BaseRequestHandler):
    """Serves one connection a peer opened to us, in this thread, until it closes."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = cast(_Server, self.server).accept(sock)
        if link is not None:
            link.serve()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    accept: Callable[[socket.socket], Link | None]  # set right after construction


class ControlServer:
    """Accepts peers' connections; ``accept(sock)`` makes each one's link (None: refused)."""

    def __init__(self, host: str, port: int, accept: Callable[[socket.socket], Link | None]) -> None:
        try:
            self.server = _Server((host, port), _Handler)
        except OSError as exc:
            raise make_error(LLMStatusCode.LLM_FAILED, f"cannot listen on {host}:{port}: {exc}") from None
        self.server.accept = accept
        bound_host, bound_port = self.server.server_address[:2]  # (str, int): an AF_INET server
        self.address = f"{bound_host!s}:{bound_port}"
        threading.Thread(target=self.server.serve_forever, name="kvreg-control", daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Heartbeat:
    """Pings links that went quiet and closes those silent for ``dead_after_s`` (a cut
    cable sends no FIN), so that what the peer held is released and transfers to it fail
    at once with LLM_LINK_FAILED."""

    def __init__(self, wait_s: float, links: Callable[[], Iterable[Link]]) -> None:
        self.interval_s = min(max(wait_s / 4, 0.05), 2.0)
        self.dead_after_s = max(wait_s, 3 * self.interval_s)
        self.links = links
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        with self.lock:
            if self.thread is None and not self.stopped.is_set():
                self.thread = threading.Thread(target=self._watch, name="kvreg-heartbeat", daemon=True)
                self.thread.start()

    def _watch(self) -> None:
        while not self.stopped.wait(self.interval_s):
            now = time.monotonic()
            for link in self.links():
                if not link.alive or link.info is None:  # only linked peers (which answer pings)
                    continue
                silent = now - link.last_heard
                if silent > self.dead_after_s:
                    log.warning("cluster %s silent for %.1f s: closing its link", link.cluster_id, silent)
                    link.close()
                elif silent > self.interval_s and link.authenticated:
                    link.ping()

    def stop(self) -> None:
        self.stopped.set()
        with self.lock:
            thread = self.thread
        if thread is not None:
            thread.join(timeout=self.interval_s + 1)
