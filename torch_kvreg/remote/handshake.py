"""Making a link: the linker's steps after the control connection, the peer's side of a
linker's hello, and where a link's time goes (LinkPhases).

A link's cost is mostly UCX's: loading a peer's NIXL metadata makes a UCX endpoint, and the
first endpoint to a new kind of peer (this host, another host) has UCX pick its protocols,
tens of ms of CPU. Each side loads the other's, the peer on a thread of its own right after
its hello reply has gone out. A linker whose peer proved it is on this host copies to and
from it directly, needing no NIXL at first: its link is made once the proof is done, and it
loads the peer's metadata on a thread too (transfers that need NIXL wait for that load). To
a peer elsewhere, the linker loads in line and then asks the peer whether its load is done
(a ping with ``loaded``), so that a refused load fails the link, as it must where every
byte moves through NIXL.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence
from typing import Protocol

from ..errors import LLMStatusCode, make_error, param_invalid, wrong_type
from ..types import ClusterInfo, as_int
from . import agent, auth, protocol, same_host
from .control import Link


class LinkPhases:
    """Where a link's time goes, in ms, each phase timed from the end of the one before:
    "agent" (waiting for this process's NIXL agent: 0 once it exists), "connect" (the
    control connection), "handshake" (the link secret's challenge, if any, and the hello
    round trip), "same_host" (the pid proof; nothing to do for a peer on another host),
    "nixl_metadata" (NIXL loads the peer's metadata: UCX makes its endpoint), "ucx_wireup"
    (make_connection), "peer_metadata" (waiting for the peer to have loaded ours); "total":
    from the start, "agent" included. A link to a peer on this host has no nixl_metadata,
    ucx_wireup nor peer_metadata: both loads run after it is made (Link.nixl.ms says what
    this side's took).

    >>> phases = LinkPhases(waited_ms=2.0)
    >>> phases.lap("connect")
    >>> sorted(phases.done())
    ['agent', 'connect', 'total']
    """

    def __init__(self, waited_ms: float) -> None:
        self.ms: dict[str, float] = {"agent": waited_ms}
        self.start = self.mark = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.ms[phase] = (now - self.mark) * 1000.0
        self.mark = now

    def done(self) -> dict[str, float]:
        self.ms["total"] = self.ms["agent"] + (time.perf_counter() - self.start) * 1000.0
        return self.ms


# Senders of notices remembered after their links end (Senders).
MAX_REMEMBERED_SENDERS = 4096


class Senders(collections.OrderedDict[str, int]):
    """Agent name -> cluster id of every peer linked lately, kept after its link ends: a
    notice sent just before an unlink (or a crash) is read after it, and still names its
    sender. Bounded, oldest forgotten first; the engine's lock guards it."""

    def remember(self, agent_name: str, cluster_id: int) -> None:
        self[agent_name] = cluster_id
        self.move_to_end(agent_name)
        while len(self) > MAX_REMEMBERED_SENDERS:
            self.popitem(last=False)


class Linker(Protocol):
    """What the linker's steps need of the engine."""

    cluster_id: int
    name: str
    secret: auth.LinkSecret | None
    host: str | None
    agent: agent.NixlAgent
    loads: agent.MetadataLoads


def handshake(
    engine: Linker, link: Link, info: ClusterInfo, timeout_s: float, phases: LinkPhases
) -> agent.MetadataLoad | None:
    """The linker's steps on a started link: the secret's proof, the hello, the same-host
    pid proof, and both sides' agent metadata. For a proven same-host peer, returns the load
    of its metadata, for the caller to start on a thread once the link is made (so that it
    takes no CPU from the link's last steps); else None, everything loaded. Raises
    LLMException (or, for a malformed reply, whatever was raised); the caller closes the
    link."""
    secret = engine.secret
    proof = None if secret is None else auth.prove(secret, engine.cluster_id, link, info, timeout_s)
    hello = protocol.Hello(engine.cluster_id, engine.name, engine.agent.get_agent_metadata(), proof)
    reply = protocol.HelloReply.parse(link.request(hello, timeout_s))
    if reply.cluster_id != info.remote_cluster_id:
        raise make_error(
            LLMStatusCode.LLM_LINK_FAILED,
            f"{info.remote_ip}:{info.remote_port} is cluster {reply.cluster_id}, not {info.remote_cluster_id}",
        )
    phases.lap("handshake")
    link.agent_name = reply.agent
    link.peer_pid = same_host.peer_pid(engine.host, link, reply, timeout_s)
    phases.lap("same_host")
    load = link.nixl = engine.loads.new(reply.md, reply.agent)
    if link.peer_pid is not None:
        return load  # the peer loads ours meanwhile, as it does for every linker
    load.load()  # the peer loads ours meanwhile
    phases.lap("nixl_metadata")
    load.connect()
    load.finish()
    phases.lap("ucx_wireup")
    if load.error is not None:
        raise make_error(LLMStatusCode.LLM_LINK_FAILED, f"cluster {reply.cluster_id}: {load.error}")
    link.request(protocol.Ping(loaded=True), timeout_s)  # answered once the peer loaded ours
    phases.lap("peer_metadata")
    return None


def accept_linker(engine: Linker, hello: protocol.Hello, link: Link) -> None:
    """The peer's side, after its hello reply has gone out: names the linker (the link counts
    as linked from now on) and starts loading its agent metadata on a thread."""
    peer_host, peer_port = link.sock.getpeername()[:2]
    link.agent_name = hello.agent
    link.nixl = engine.loads.new(hello.md or b"", hello.agent)
    link.info = ClusterInfo(hello.cluster_id, peer_host, peer_port)
    link.nixl.start()


def linker_loaded(link: Link) -> protocol.Reply:
    """The reply to a linker's ping with ``loaded``: once its metadata is loaded here, ok;
    LLM_LINK_FAILED with NIXL's reason if it could not be, and the link is then dropped."""
    load = link.nixl
    if load is None:
        return protocol.Ok()
    load.finished.wait()  # (as long as NIXL takes: the linker times its request out)
    if load.error is None:
        return protocol.Ok()

    def then() -> None:
        link.said_bye = True  # an orderly end: the link is unlisted, not kept as a dead one
        raise make_error(LLMStatusCode.LLM_LINK_FAILED, f"cluster {link.cluster_id}: {load.error}")

    link.after_reply = then
    return protocol.Failure(LLMStatusCode.LLM_LINK_FAILED, f"this cluster could not load yours: {load.error}")


def cluster_list(clusters: object) -> list[ClusterInfo]:
    """link_clusters' and unlink_clusters' ``clusters``, checked."""
    if isinstance(clusters, ClusterInfo):
        clusters = [clusters]
    if isinstance(clusters, (str, bytes)) or not isinstance(clusters, Sequence):
        raise wrong_type(f"clusters must be a sequence of ClusterInfo, got {type(clusters).__name__}")
    out = list(clusters)
    for i, info in enumerate(out):
        if not isinstance(info, ClusterInfo):
            raise wrong_type(f"clusters[{i}] is a {type(info).__name__}, not a ClusterInfo")
    return out


def link_timeout(timeout_ms: int) -> int:
    timeout_ms = as_int(timeout_ms, "timeout_ms")
    if timeout_ms <= 0:
        raise param_invalid(f"timeout_ms must be positive, got {timeout_ms}")
    return timeout_ms
