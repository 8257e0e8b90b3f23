"""The engine: this process as a NIXL peer. It owns the parts (agent.py, control.py,
leases.py, same_host.py, jobs.py, progress.py), keeps the links, serves peers' requests and
starts transfers as jobs."""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence

import numpy as np

from .. import _C, allocate
from ..errors import LLMException, LLMStatusCode, make_error
from ..inflight import Transfer
from ..registry import cache_from_native
from ..types import Cache, ClusterInfo, Placement
from . import agent, auth, handshake, plan, protocol, same_host, shared_memory, verify
from .control import ControlServer, Heartbeat, Link, connect
from .jobs import PROC, Completion, NixlJob, SameHostJob
from .leases import LEASE_LINGER_S, LocalHolds, PeerLeases, SharedLease, served_cache
from .progress import Progress
from .same_host import Route, Routes

log = logging.getLogger("torch_kvreg.remote")

# Links to vanished peers kept listed (their transfers fail with LLM_LINK_FAILED until the
# cluster is unlinked or linked again); the oldest beyond this are forgotten.
MAX_DEAD_LINKS = 64


class Engine:
    """Everything this process needs to be a NIXL peer."""

    def __init__(self, cluster_id: int, wait_ms: int, secret: auth.LinkSecret | None = None):
        # NIXL logs every agent and backend creation at INFO; keep a user's own setting.
        os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
        self.cluster_id = cluster_id
        self.wait_s = wait_ms / 1000.0
        self.secret = secret  # set: every peer proves it knows the secret before it links
        self.name = f"kvreg-{cluster_id}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.host = same_host.host_identity()
        started = time.perf_counter()
        self.agent = agent.make_agent(self.name)
        self.agent_ms = (time.perf_counter() - started) * 1000.0  # what making it took (benchmarks print it)
        # One lock for the tables below, which change together (a route is usable only while
        # its lease is the shared one, its link current and its cache not closing).
        self.lock_raw = threading.RLock()  # self.lock's own lock, entered directly on hot paths
        self.lock = threading.Condition(self.lock_raw)
        self.registrations = agent.Registrations(self.agent)
        self.holds = LocalHolds(self.lock, self.wait_s)
        self.peer_leases = PeerLeases(self.lock)
        self.routes = Routes(self.lock_raw)
        self.mappings = shared_memory.Mappings()  # peers' shared caches mapped here
        self.progress = Progress(Completion(self.agent, self.wait_s), self._housekeeping)
        self.heartbeat = Heartbeat(self.wait_s, self._all_links)
        self.links: dict[int, Link] = {}  # linked clusters, whichever side opened the link
        self.connections: set[Link] = set()  # connections peers opened to us
        self.senders = handshake.Senders()  # agent name -> cluster id of peers linked lately
        self.server: ControlServer | None = None
        # Transfers started, by path ("mapped", "same_host", "nixl"): read by tests and benchmarks.
        self.paths: collections.Counter[str] = collections.Counter()
        # Where the time of the latest successful link to each cluster went (LinkPhases.ms).
        self.link_phases: dict[int, dict[str, float]] = {}
        self.loads = agent.MetadataLoads(self.agent)  # peers' agent metadata being loaded

    # --- lifecycle -----------------------------------------------------------------------
    @property
    def listen_address(self) -> str | None:
        server = self.server
        return None if server is None else server.address

    def listen(self, host: str, port: int) -> str:
        self.server = ControlServer(host, port, self._accept)
        self.heartbeat.start()
        return self.server.address

    def _accept(self, sock: socket.socket) -> Link | None:
        link = Link(self, sock, None, self.wait_s, authenticated=self.secret is None)
        with self.lock:
            if self.server is None:  # closing
                return None
            self.connections.add(link)
        return link

    def stop_listening(self) -> None:
        """Closes the control server (a role switch to decoder); links stay up."""
        with self.lock:
            server, self.server = self.server, None
        if server is not None:
            server.close()

    def close(self) -> None:
        # Transfers in flight and peers' leases first (bounded), then links and the server.
        if not self.holds.wait_idle():
            log.warning("finalize: transfers still in flight after %.0f ms", self.wait_s * 1000)
        self.progress.stop(self.wait_s + 1)
        self.peer_leases.give_back(self.peer_leases.expire(everything=True)[1])
        self.mappings.clear()
        self.heartbeat.stop()
        for cluster_id in list(self.links):
            self.unlink(cluster_id, force=False)
        self.stop_listening()
        with self.lock:
            # Peers that still hold leases lose them and their connections: the registry is
            # about to be emptied.
            connections = list(self.connections)
        for connection in connections:
            connection.close()
        if not self.loads.wait_all(self.wait_s + 1):
            log.warning("finalize: NIXL metadata loads still running after %.0f ms", self.wait_s * 1000 + 1000)
        self.holds.end_all_leases()
        self.registrations.deregister(list(self.registrations.regs))

    def _all_links(self) -> list[Link]:
        with self.lock:
            return list(set(self.links.values()) | self.connections)

    # --- local caches ------------------------------------------------------------------
    def register(self, cache: Cache) -> None:
        if cache.cache_id in self.registrations:
            return
        with self.lock:
            closing = set(self.holds.closing)
        self.registrations.deregister(self.registrations.stale(closing))
        self.registrations.register(cache)

    def unregister(self, cache_id: int) -> None:
        """Waits (bounded) for transfers and peers' leases on the cache, then deregisters."""
        self.holds.close(cache_id)
        try:
            self.registrations.deregister([cache_id])
        finally:
            self.holds.closed(cache_id)

    # --- serving peers -----------------------------------------------------------------
    def serve(self, request: protocol.Request, link: Link) -> protocol.Reply:
        if isinstance(request, protocol.Hello):
            return self.greet(request, link)
        if isinstance(request, protocol.Challenge):
            return auth.answer_challenge(self.secret, self.cluster_id, request, link)
        if isinstance(request, protocol.Acquire):
            return self.grant(request, link.leases)
        if isinstance(request, protocol.SameHost):
            return same_host.show_nonce(self.host, request, link)
        if isinstance(request, protocol.Ping) and request.loaded:
            return handshake.linker_loaded(link)
        if isinstance(request, protocol.Checksums):
            return verify.serve(request)
        if isinstance(request, protocol.Release):
            if request.lease in link.leases:
                link.leases.discard(request.lease)
                self.end_lease(request.lease)
        return protocol.Ok()  # ping, release

    def greet(self, hello: protocol.Hello, link: Link) -> protocol.HelloReply:
        """A hello from the peer that opened ``link``. With its agent metadata, the link also
        carries our requests to it: the peer's cluster counts as linked here too, right after
        this reply has gone out, and its metadata loads on a thread (UCX's tens of ms of CPU)
        while we answer its next requests; our transfers to it wait for that load. With a
        link secret, only after the peer answered our challenge."""
        auth.check_hello(self.secret, self.cluster_id, hello, link)
        if hello.md is not None and link.info is None:
            link.after_reply = functools.partial(self._linked_by, hello, link)
        return protocol.HelloReply(self.cluster_id, self.name, self.agent.get_agent_metadata(), self.host)

    def _linked_by(self, hello: protocol.Hello, link: Link) -> None:
        handshake.accept_linker(self, hello, link)
        with self.lock:
            self.senders.remember(link.agent_name, hello.cluster_id)
            current = self.links.get(hello.cluster_id)
            if current is None or not current.alive:
                self.links[hello.cluster_id] = link
        log.info("cluster %d linked to us from %s", hello.cluster_id, link.info)

    def grant(self, request: protocol.Acquire, leases: set[int]) -> protocol.AcquireReply:
        """A lease for a peer on a remote-accessible local cache, named by id or key."""
        values, cache_id, index = served_cache(request.cache_id, request.key)
        cache = cache_from_native(values)
        self.register(cache)
        with self.lock:
            reg = self.registrations.regs.get(cache_id)
            lease = self.holds.grant(cache_id, reg is not None)
        leases.add(lease)
        region = allocate.shared_region(cache)
        shared = None if region is None else protocol.SharedMemory(*region)
        cache_entry = protocol.RemoteCache(cache_id, cache.cache_desc, tuple(cache.tensor_addrs), shared)
        md = self.agent.get_partial_agent_metadata(reg, False)
        return protocol.AcquireReply(lease, cache_entry, md, index, by_key=request.key is not None)

    def end_lease(self, lease: int) -> None:
        self.holds.end_lease(lease)

    def notice(self, link: Link, message: bytes) -> None:
        """A peer's completion notice, read from its link: queued natively, which wakes
        wait_notices() at once."""
        if not _C.notices_put(-1 if link.cluster_id is None else link.cluster_id, message):
            log.warning("a notice from cluster %s dropped: %d wait unread", link.cluster_id, _C.notices_queued())

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
        """Beyond MAX_DEAD_LINKS dead links, the oldest are forgotten outright (NIXL agent
        and all), as if unlinked: decoders that restart with a new cluster id each time
        (vLLM's connector does) would otherwise leave one entry each, for as long as the
        prefill runs."""
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

    def _forget(self, link: Link, keep_agent: bool = False) -> None:
        """Releases what ``link`` opened. ``keep_agent`` (a peer that unlinked in good order,
        and may link again): its NIXL agent stays loaded, and a relink loads it again over
        the same connection. NIXL's remove_remote_agent leaves the UCX connection between
        the two processes open, so removing it on every unlink would leave one more open
        socket in each process per link/unlink cycle; a vanished peer's agent is removed."""
        with self.lock:
            self.routes.drop(lambda route: route.link is link)
            self.peer_leases.forget_link(link)
        self.mappings.drop_link(link)
        for prep in link.remote_preps.values():
            with contextlib.suppress(Exception):
                self.agent.release_dlist_handle(prep)
        link.remote_preps.clear()
        load = link.nixl  # (a load still running removes what it loaded itself, once done)
        if load is not None and load.forget(keep_agent) and not keep_agent:
            with contextlib.suppress(Exception):
                self.agent.remove_remote_agent(link.agent_name)
        link.close()

    # --- links -------------------------------------------------------------------------
    def link(self, info: ClusterInfo, timeout_ms: int, waited_ms: float = 0.0) -> LLMStatusCode:
        """Links to ``info``'s cluster; a success records where the time went in
        ``link_phases`` (``waited_ms``: what the caller waited for this engine, its "agent")."""
        with self.lock:
            current = self.links.get(info.remote_cluster_id)
        if current is not None:
            if current.alive:
                return LLMStatusCode.LLM_ALREADY_LINK
            self.unlink(info.remote_cluster_id, force=True)  # a dead link is replaced
        phases = handshake.LinkPhases(waited_ms)
        timeout_s = timeout_ms / 1000.0
        sock = connect((info.remote_ip, info.remote_port), timeout_s)
        if isinstance(sock, LLMStatusCode):
            return sock
        link = Link(self, sock, info, self.wait_s, authenticated=self.secret is None)
        link.start()
        phases.lap("connect")
        try:
            load = handshake.handshake(self, link, info, timeout_s, phases)
        except LLMException as exc:
            self._forget(link)
            return exc.status_code
        except Exception as exc:  # a malformed hello reply
            log.warning("link to %s failed: %s", info, exc)
            self._forget(link)
            return LLMStatusCode.LLM_LINK_FAILED
        with self.lock:
            self.links[info.remote_cluster_id] = link
            self.senders.remember(link.agent_name, info.remote_cluster_id)
        self.heartbeat.start()
        self.link_phases[info.remote_cluster_id] = phases.done()
        if load is not None:
            load.start()  # (a transfer that needs NIXL on the link waits for it)
        log.info("linked to cluster %d at %s:%d", info.remote_cluster_id, info.remote_ip, info.remote_port)
        return LLMStatusCode.LLM_SUCCESS

    def unlink(self, cluster_id: int, force: bool) -> LLMStatusCode:
        with self.lock:
            link = self.links.pop(cluster_id, None)
        if link is None:
            return LLMStatusCode.LLM_NOT_YET_LINK
        said_bye = False
        if not force and link.alive:
            with contextlib.suppress(LLMException):
                link.request(protocol.Bye())
                said_bye = True
        self._forget(link, keep_agent=said_bye)
        return LLMStatusCode.LLM_SUCCESS

    def link_for(self, cluster_id: int) -> Link:
        with self.lock:
            link = self.links.get(cluster_id)
        if link is None:
            raise make_error(
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
        lane_shifts: plan.LaneShifts | None = None,
        lane_runs: plan.LaneRuns | None = None,
        mapped_boxes: plan.MappedBoxes | None = None,
    ) -> Transfer:
        """Starts moving bytes between a local cache and a remote one, as a job; returns its
        Transfer.

        ``remote_ref`` is the remote cache id, or a cache key the peer registered.
        ``make_segments(remote_desc, remote_index)`` validates and returns (source offsets,
        destination offsets, lengths) before any byte moves (``remote_index``: the slice a
        key names, else 0); READ moves remote -> local, WRITE local -> remote.
        ``tensors(remote_desc)`` gives the (local, remote) tensor indices that take part;
        None: all, pairwise. ``notify`` reaches the peer once the data has landed.
        ``route_key`` (block transfers by remote cache id): a same-host job keeps its route
        under it, for start_routed. ``lane_shifts()`` (transfers between geometries, called
        after ``tensors``): bytes added to each selected tensor's base address, local and
        remote, so that one tensor can be a lane twice (its K and its V half); ``lane_runs()``
        (after ``make_segments``): each lane's own segments, which then replace them.
        ``mapped_boxes`` (between geometries) starts the copy when the peer's cache is mapped.
        Everything is checked, the peer's cache leased and the request prepared before this
        returns. A NIXL job is posted here, or with ``background`` by the progress thread in
        the order started: NIXL's post may itself move the bytes (UCX does between
        processes of one host), which would make an "asynchronous" transfer block its caller.
        """
        link = self.link_for(cluster_id)
        self.holds.hold(local.cache_id)
        lease = None
        try:
            self.register(local)
            lease = self.peer_leases.take(link, remote_ref)
            remote = lease.remote
            # On a peer cache mapped here, a transfer between geometries plans no runs at all.
            boxed = None if mapped_boxes is None else self.mappings.start_boxes(link, lease, local, mapped_boxes)
            if boxed is not None:
                nbytes = boxed.nbytes
            else:
                if tensors is None:
                    local_tensors = remote_tensors = list(range(local.cache_desc.num_tensors))
                else:
                    local_tensors, remote_tensors = tensors(remote.desc)
                src_offsets, dst_offsets, lengths = make_segments(remote.desc, lease.index)
                local_offsets, remote_offsets = (
                    (dst_offsets, src_offsets) if operation == "READ" else (src_offsets, dst_offsets)
                )
                shifts = None if lane_shifts is None else lane_shifts()
                if lane_runs is not None:
                    (local_tensors, remote_tensors), shifts, (local_offsets, remote_offsets, lengths) = plan.one_lane(
                        (local.tensor_addrs, remote.addrs),
                        (local_tensors, remote_tensors),
                        shifts,
                        lane_runs(),
                        operation == "READ",
                    )
                nbytes = int(lengths.sum()) * len(local_tensors)
            transfer = Transfer(
                nbytes,
                dst_blocks,
                f"{operation.lower()} with cluster {cluster_id}",
                "pull" if operation == "READ" else "push",
            )
            let_go = functools.partial(self._let_go, lease, local.cache_id)
            if nbytes == 0:
                let_go()
                transfer.succeed()
                return transfer
            deadline = time.monotonic() + self.wait_s
            # (a boxed job implies both: start_boxes maps host caches of a same-host peer only)
            if link.peer_pid is not None and local.cache_desc.placement == remote.desc.placement == Placement.HOST:
                native = boxed
                if native is None:
                    local_addrs = [local.tensor_addrs[i] for i in local_tensors]
                    remote_addrs = [remote.addrs[i] for i in remote_tensors]
                    if shifts is not None:
                        local_addrs = [base + shift for base, shift in zip(local_addrs, shifts[0], strict=True)]
                        remote_addrs = [base + shift for base, shift in zip(remote_addrs, shifts[1], strict=True)]
                    segments = (local_offsets, remote_offsets, lengths)
                    # A notice must go out when the copy ends, waited for or not (``watched``).
                    native = self.mappings.start(
                        link, lease, operation == "READ", local_addrs, remote_addrs, segments, bool(notify)
                    )
                path = "same_host" if native is None else "mapped"
                if native is None:
                    native = _C.peer_copy_start_segments(
                        link.peer_pid, operation == "READ", local_addrs, remote_addrs, *segments, bool(notify)
                    )
                job: NixlJob | SameHostJob = SameHostJob(transfer, link, deadline, notify, let_go, native)
                self.paths[path] += 1
                state: str | None = PROC
                if path == "same_host" and route_key is not None and isinstance(remote_ref, int):
                    self._keep_route(route_key, operation, link, lease, local, (local_tensors, remote_tensors))
            else:
                if link.nixl is not None:  # (a same-host link's may still be loading)
                    link.nixl.wait(deadline - time.monotonic(), cluster_id)
                self.paths["nixl"] += 1
                request = self._nixl_request(
                    operation,
                    link,
                    local,
                    lease,
                    (local_offsets, remote_offsets, lengths),
                    (local_tensors, remote_tensors),
                    background,
                    shifts,
                )
                job = NixlJob(self.agent, transfer, link, deadline, notify, let_go, request)
                state = None
                if not background:
                    try:
                        job.handle = agent.Request.handle_of([request])
                    except Exception as exc:
                        raise make_error(
                            LLMStatusCode.LLM_LINK_FAILED, f"NIXL could not prepare the transfer: {exc}"
                        ) from None
                    state = job.post()
        except BaseException:
            self._let_go(lease, local.cache_id)
            raise
        self.progress.add(job, state)
        return transfer

    def _nixl_request(
        self,
        operation: str,
        link: Link,
        local: Cache,
        lease: SharedLease,
        offsets: tuple[np.ndarray, np.ndarray, np.ndarray],
        tensors: tuple[list[int], list[int]],
        background: bool,
        shifts: tuple[Sequence[int], Sequence[int]] | None = None,
    ) -> agent.Request:
        """The NIXL request of a transfer: scattered single blocks index per-block lists
        prepared once per cache, as NIXL recommends, instead of preparing every descriptor
        again; the rest (and background jobs, which the progress thread posts in bursts,
        joining blocks that turn out adjacent) carry descriptor rows."""
        remote = lease.remote
        if link.loaded_md.get(remote.cache_id) != lease.md:
            self.agent.add_remote_agent(lease.md)
            link.loaded_md[remote.cache_id] = lease.md
        local_offsets, remote_offsets, lengths = offsets
        selection = (np.asarray(tensors[0], dtype=np.int64), np.asarray(tensors[1], dtype=np.int64))
        if (
            not background
            and shifts is None
            and lengths.size >= agent.PREPPED_MIN_SEGMENTS
            and bool(np.all(lengths == local.cache_desc.block_nbytes))
            and agent.preppable(local.cache_desc)
            and agent.preppable(remote.desc)
        ):
            remote_prep = link.remote_preps.get(remote.cache_id)
            if remote_prep is None:
                rows = agent.per_block_rows(remote.addrs, remote.desc)
                remote_prep = self.agent.prep_xfer_dlist(link.agent_name, rows, plan.mem_type(remote.desc))
                link.remote_preps[remote.cache_id] = remote_prep
            prepared = (self.registrations.prepared(local), remote_prep)
            return agent.prepped_request(
                self.agent,
                operation,
                prepared,
                (local.cache_desc, remote.desc),
                (local_offsets, remote_offsets),
                selection,
            )
        return agent.row_request(self.agent, operation, local, remote, link.agent_name, offsets, selection, shifts)

    def _let_go(self, lease: SharedLease | None, local_id: int) -> None:
        """Gives back what a transfer held: its reference to the peer's lease (which then
        lingers, or is given back) and its hold on the local cache."""
        if lease is not None and self.peer_leases.put(lease, linger=not self.progress.stopping):
            self.progress.wake()  # it gives the lease back once it has lingered
        self.holds.unhold(local_id)

    def _housekeeping(self) -> float | None:
        """The progress thread's turn at the leases: gives back those that lingered (their
        routes are stale from then on, see start_routed); the seconds until the next is due."""
        due, expired = self.peer_leases.expire()
        self.peer_leases.give_back(expired)
        if due is None and self.peer_leases.lingering:
            due = LEASE_LINGER_S  # a lease that began to linger since it looked
        return self.mappings.expire(due)

    # --- same-host routes --------------------------------------------------------------
    def _keep_route(
        self,
        key: tuple,
        operation: str,
        link: Link,
        lease: SharedLease,
        local: Cache,
        tensors: tuple[list[int], list[int]],
    ) -> None:
        """Keeps what a same-host block transfer worked out as a route, so that the next ones
        with the same caches and layers start in one native call (start_routed). It lives
        as long as the shared lease it uses."""
        route = same_host.make_route(operation, link, lease, local, tensors)
        if route is None:
            return
        route.settle = self._route_settle
        with self.lock:
            if self.peer_leases.shared.get(lease.key) is lease:  # a private lease is not kept
                self.routes.drop(self._stale)  # (what keeps the table small; starts check too)
                self.routes.keep(key, route)

    def _stale(self, route: Route) -> bool:
        """Whether a route's lease is gone (caller holds the lock): the peer may have freed
        the cache since, and the route must not start another copy."""
        return self.peer_leases.shared.get(route.lease.key) is not route.lease

    def start_routed(self, route: Route, src_blocks: object, dst_blocks: object, notify: bytes) -> Transfer | None:
        """start_transfer for a block transfer on a route (api._routed finds it): one native
        call validates the block lists and starts the job. None, with nothing held or moved,
        when the route is stale (lease gone, link down or replaced, local cache closing) or
        the native start does not take the lists (not lists of ints, or failing a check):
        the general path then starts the transfer or raises the precise error."""
        with self.lock_raw:
            link = route.link
            if (
                self._stale(route)
                or not link.alive
                or self.links.get(route.key[1]) is not link  # key: (operation, cluster id, ...)
                or route.local_id in self.holds.closing
            ):
                self.routes.table.pop(route.key, None)
                return None
            if not route.holding and not self._hold_route(route):
                return None
            route.started += 1  # (before the native start, which runs outside the lock)
            self.routes.starts += 1
            self.paths["same_host"] += 1
        native = route.native.start_job(src_blocks, dst_blocks, bool(notify))
        if native is None:
            with self.lock_raw:
                self.routes.starts -= 1
                self.paths["same_host"] -= 1
            route.job_ended()  # (its start was counted)
            return None
        # (The native start took both as lists of ints.)
        transfer = Transfer(len(dst_blocks) * route.block_bytes, dst_blocks, route.description, route.path)  # type: ignore[arg-type]
        job = SameHostJob(transfer, link, time.monotonic() + self.wait_s, notify, route.job_ended, native)
        self.progress.add_copy(job)
        return transfer

    def _hold_route(self, route: Route) -> bool:
        """Under the lock, for a usable route that holds nothing: its hold on the cache and
        the lease, taken once for all of its jobs; False if the cache is no longer
        registered (the general path says so)."""
        if not self.holds.hold_again(route.local_id):
            return False
        self.peer_leases.use(route.lease)
        route.holding = True
        self.routes.busy.add(route)
        return True

    def _route_settle(self, route: Route) -> None:
        """A route's last job let go: the route gives back its hold on the cache and lease
        (unless a start came in between)."""
        if self.routes.settle(route):
            self._let_go(route.lease, route.local_id)

    # --- notices -----------------------------------------------------------------------
    def notifications(self) -> list[tuple[int | None, bytes]]:
        """Completion notices peers sent since the last call, oldest first, with the
        sending cluster id (None for an agent this process has no link with): those that
        came over links, then any a NIXL agent sent through NIXL itself."""
        out = [(None if cluster < 0 else cluster, message) for cluster, message in _C.notices_take()]
        try:
            received = self.agent.get_new_notifs()
        except Exception as exc:
            log.warning("NIXL notifications unavailable: %s", exc)
            return out
        with self.lock:
            clusters = dict(self.senders)
        for name, messages in received.items():
            out.extend((clusters.get(agent.agent_name(name)), bytes(message)) for message in messages)
        return out
