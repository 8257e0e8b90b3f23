"""Making a link: the linker's steps after the control connection, the peer's load of the
linker's agent metadata, and where a link's time goes (LinkPhases).

A link's cost is mostly UCX's: loading a peer's NIXL metadata makes a UCX endpoint, and the
first endpoint to a new kind of peer (this host, another host) has UCX pick its protocols,
tens of ms. Each side loads the other's; the peer does it right after its hello reply has
gone out, so the two loads overlap, and the linker's next request (a ping) is answered only
once the peer's is done.
"""

from __future__ import annotations

import contextlib
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
    round trip), "nixl_metadata" (NIXL loads the peer's metadata: UCX makes its endpoint),
    "ucx_wireup" (make_connection), "peer_metadata" (waiting for the peer to have loaded
    ours), "same_host" (the pid proof; nothing to do for a peer on another host); "total":
    from the start, "agent" included.

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


class Linker(Protocol):
    """What the linker's steps need of the engine."""

    cluster_id: int
    name: str
    secret: auth.LinkSecret | None
    host: str | None
    agent: agent.NixlAgent


def handshake(engine: Linker, link: Link, info: ClusterInfo, timeout_s: float, phases: LinkPhases) -> None:
    """The linker's steps on a started link: the secret's proof, the hello, both sides'
    agent metadata, and the same-host pid proof. Raises LLMException (or, for a malformed
    reply or NIXL refusing the metadata, whatever was raised); the caller closes the link."""
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
    link.agent_name = agent.agent_name(engine.agent.add_remote_agent(reply.md))  # the peer loads ours meanwhile
    phases.lap("nixl_metadata")
    # Connect now, so that the first transfer does not pay for it.
    with contextlib.suppress(Exception):
        engine.agent.make_connection(link.agent_name)
    phases.lap("ucx_wireup")
    # Read by the peer once it has loaded ours; it drops the link if it could not.
    link.request(protocol.Ping(), timeout_s)
    phases.lap("peer_metadata")
    link.peer_pid = same_host.peer_pid(engine.host, link, reply, timeout_s)
    phases.lap("same_host")


def load_linker(nixl: agent.NixlAgent, hello: protocol.Hello, link: Link) -> ClusterInfo:
    """The peer's side, after its hello reply has gone out: loads the agent metadata the
    linker's hello carried (LLM_LINK_FAILED if NIXL refuses it) and names the linker."""
    try:
        link.agent_name = agent.agent_name(nixl.add_remote_agent(hello.md))
    except Exception as exc:  # NIXL refusing the metadata
        raise make_error(LLMStatusCode.LLM_LINK_FAILED, f"NIXL refused the peer's metadata: {exc}") from None
    peer_host, peer_port = link.sock.getpeername()[:2]
    return ClusterInfo(hello.cluster_id, peer_host, peer_port)


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
