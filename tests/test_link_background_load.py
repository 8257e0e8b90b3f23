"""A link to a peer on this host is made once the same-host proof is done, before either
side has loaded the other's NIXL metadata (UCX's tens of ms of CPU): both loads run on a
thread of their own (agent.MetadataLoad). Same-host transfers need neither; a transfer that
needs NIXL on such a link waits for its side's load, and fails with LLM_LINK_FAILED, naming
NIXL's refusal, when the load failed. Unlinks and finalize during a load leave nothing
loaded or running.

These tests hold this process's loads at a gate (the ``held`` fixture), so that "before the
load is done" is a state the test controls, not a race it hopes to win."""

import threading
import time

import pytest
import torch

import torch_kvreg as kv
from torch_kvreg import LLMStatusCode
from torch_kvreg.remote import agent

from remote_peer import Peer

pytestmark = pytest.mark.skipif(not kv.remote.nixl_available(), reason="needs the nixl extra")

SAME_HOST_PHASES = ["agent", "connect", "handshake", "same_host", "total"]
SHAPE = (8, 4, 16)


class Gate:
    """Holds every NIXL metadata load of this process until opened; counts those begun."""

    def __init__(self) -> None:
        self.open_event = threading.Event()
        self.begun: list[agent.MetadataLoad] = []
        self.garbage = False  # set: each load is handed metadata NIXL refuses

    def open(self) -> None:
        self.open_event.set()


@pytest.fixture
def held(monkeypatch):
    gate = Gate()
    load = agent.MetadataLoad.load

    def held_load(self):
        gate.begun.append(self)
        assert gate.open_event.wait(30), "the test never opened the gate"
        if gate.garbage:
            self.md = b"not NIXL metadata"
        load(self)

    monkeypatch.setattr(agent.MetadataLoad, "load", held_load)
    yield gate
    gate.open()
    kv.finalize()


def zeros_cache():
    tensors = [torch.zeros(SHAPE, dtype=torch.float16) for _ in range(2)]
    return kv.register_kv_cache(tensors, kv.RegisterCfg(remote_accessible=True)), tensors


def start(fn, *args):
    """Runs fn(*args) on a thread; returns (thread, outcome): outcome["value"] or ["error"]."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = fn(*args)
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def linked_to(peer, wait_ms=5000):
    kv.initialize(2, options={"llm.SyncKvCacheWaitTime": str(wait_ms)})
    assert kv.link_clusters([peer.info]) == (LLMStatusCode.LLM_SUCCESS, [LLMStatusCode.LLM_SUCCESS])
    engine = kv.remote.current_engine()
    return engine, engine.links[peer.cluster_id]


def test_a_same_host_link_returns_before_the_load_and_a_nixl_transfer_waits_for_it(held):
    peer = Peer(1)
    try:
        source = peer.call("register", (2, SHAPE[0], SHAPE[1:], 0, True))
        want = peer.call("read", source)
        engine, link = linked_to(peer)
        # Made with the load held: it had not even begun loading when link_clusters returned.
        assert link.peer_pid == peer.process.pid
        assert held.begun == [link.nixl] and not link.nixl.finished.is_set()
        assert list(engine.link_phases[1]) == SAME_HOST_PHASES
        assert not engine.agent.check_remote_metadata(link.agent_name)
        # A same-host pull needs no NIXL: it runs while the load is held.
        mine, mine_tensors = zeros_cache()
        kv.pull_kv_blocks(kv.CacheIndex(1, source), mine, [0, 5], [1, 2], notify="direct")
        assert engine.paths["same_host"] == 1 and engine.paths["nixl"] == 0
        assert torch.equal(mine_tensors[0][1], want[0][0]) and torch.equal(mine_tensors[1][2], want[1][5])
        # A transfer through NIXL on the link (a DEVICE cache's; on this CPU host, the link's
        # proof is set aside to take that path) waits for the load, then moves the bytes.
        link.peer_pid = None
        other, other_tensors = zeros_cache()  # (a cache of its own: no same-host route for it)
        thread, outcome = start(kv.pull_kv_blocks, kv.CacheIndex(1, source), other, [3, 7], [4, 0])
        thread.join(0.3)
        assert thread.is_alive() and not outcome, outcome  # waiting for the load
        held.open()
        thread.join(10)
        assert not thread.is_alive() and "error" not in outcome, outcome
        assert link.nixl.finished.is_set() and link.nixl.error is None
        assert engine.agent.check_remote_metadata(link.agent_name)
        assert engine.paths["nixl"] == 1
        assert torch.equal(other_tensors[0][4], want[0][3]) and torch.equal(other_tensors[1][0], want[1][7])
        assert sorted(peer.call("notifications")) == [(2, b"direct")]
    finally:
        held.open()
        peer.close()


def test_the_peer_answers_the_linker_before_its_own_load_and_its_nixl_transfers_wait_for_it(held):
    """Here this process is the peer a same-host linker links to: the linker's link returns
    while this side's load of its metadata is held, and its pull from us runs meanwhile;
    our own transfers to it go through NIXL (we never proved where it is) and wait."""
    kv.initialize(5, kv.LlmRole.PROMPT, options={"llm.ListenIpInfo": "127.0.0.1:0", "llm.SyncKvCacheWaitTime": "5000"})
    host, port = kv.listen_address().split(":")
    ours = kv.register_kv_cache(
        [torch.full(SHAPE, float(i + 1), dtype=torch.float16) for i in range(2)], kv.RegisterCfg(remote_accessible=True)
    )
    linker = Peer(6)
    try:
        theirs = linker.call("register", (2, SHAPE[0], SHAPE[1:], 3, True))
        want = linker.call("read", theirs)
        status = linker.call("kv", ("link_clusters", ([kv.ClusterInfo(5, host, int(port))],), {}))
        assert status == (LLMStatusCode.LLM_SUCCESS, [LLMStatusCode.LLM_SUCCESS])
        engine = kv.remote.current_engine()
        link = engine.links[6]
        assert held.begun == [link.nixl] and not link.nixl.finished.is_set()
        # The linker pulls from us at once (same-host), while our load is held.
        landing = linker.call("register_zeros", (2, SHAPE[0], SHAPE[1:]))
        linker.call("kv", ("pull_kv_blocks", (kv.CacheIndex(5, ours.cache_id), landing, [2], [6]), {}))
        assert linker.call("read_blocks", (landing, [6])) == [
            torch.full(SHAPE[1:], float(i + 1), dtype=torch.float16).numpy().tobytes() for i in range(2)
        ]
        # Our pull from the linker waits for our load, then moves the bytes through NIXL.
        mine, mine_tensors = zeros_cache()
        thread, outcome = start(kv.pull_kv_blocks, kv.CacheIndex(6, theirs), mine, [1], [3])
        thread.join(0.3)
        assert thread.is_alive() and not outcome, outcome
        held.open()
        thread.join(10)
        assert not thread.is_alive() and "error" not in outcome, outcome
        assert engine.paths["nixl"] == 1 and link.nixl.error is None
        assert torch.equal(mine_tensors[0][3], want[0][1]) and torch.equal(mine_tensors[1][3], want[1][1])
        assert linker.call("linked") == [5]
    finally:
        held.open()
        linker.close()


@pytest.mark.parametrize("force", [True, False])
def test_an_unlink_during_the_load_leaves_the_agent_as_an_unlink_after_it_would(held, force):
    """A forced unlink (as for a vanished peer) removes the peer's agent: the load, still
    running, removes what it loaded once done. An unlink in good order keeps it loaded (a
    relink finds it), as it does after a finished load. A relink while the first link's
    load still runs loads after it."""
    peer = Peer(1)
    try:
        engine, link = linked_to(peer)
        assert kv.unlink_clusters([peer.info], force=force)[0] == LLMStatusCode.LLM_SUCCESS
        assert not link.nixl.finished.is_set() and not engine.links
        assert kv.link_clusters([peer.info])[0] == LLMStatusCode.LLM_SUCCESS  # relinked meanwhile
        again = engine.links[peer.cluster_id]
        assert again.nixl.after is link.nixl  # runs once the first is done
        held.open()
        assert again.nixl.finished.wait(10) and link.nixl.finished.is_set()
        assert again.nixl.error is None and link.nixl.error is None
        assert engine.agent.check_remote_metadata(again.agent_name)  # the relink's load stands
        assert kv.unlink_clusters([peer.info], force=True)[0] == LLMStatusCode.LLM_SUCCESS
        assert not engine.agent.check_remote_metadata(again.agent_name)  # removed, load done
        # Unlinked during its load, never relinked: removed when forced, else kept.
        assert kv.link_clusters([peer.info])[0] == LLMStatusCode.LLM_SUCCESS
        third = engine.links[peer.cluster_id]
        assert kv.unlink_clusters([peer.info], force=force)[0] == LLMStatusCode.LLM_SUCCESS
        assert third.nixl.finished.wait(10) and third.nixl.error is None
        assert engine.agent.check_remote_metadata(third.agent_name) is not force
        assert len(held.begun) == 3
    finally:
        held.open()
        peer.close()


def test_finalize_during_a_load_waits_for_it_and_leaves_no_load_running(held):
    peer = Peer(1)
    try:
        engine, link = linked_to(peer)
        timer = threading.Timer(0.5, held.open)
        timer.start()
        started = time.monotonic()
        kv.finalize()
        waited = time.monotonic() - started
        timer.join()
        assert waited >= 0.4, waited  # finalize waited for the load held at the gate
        assert link.nixl.finished.is_set() and not engine.loads.running
        assert not [t for t in threading.enumerate() if t.name == "kvreg-nixl-load"]
        assert kv.remote.current_engine() is None
    finally:
        held.open()
        peer.close()


def test_a_failed_load_fails_the_first_nixl_transfer_with_its_reason_and_nothing_else(held):
    """Both sides' loads refused (this process's own, held, then handed garbage): the link
    stands, same-host transfers run, and the first transfer through NIXL is LLM_LINK_FAILED
    naming NIXL's refusal, in this process as linker and as the peer linked to."""
    held.garbage = True
    peer = Peer(1)
    try:
        source = peer.call("register", (2, SHAPE[0], SHAPE[1:], 0, True))
        want = peer.call("read", source)
        engine, link = linked_to(peer)
        held.open()
        assert link.nixl.finished.wait(10) and "NIXL refused" in link.nixl.error
        mine, mine_tensors = zeros_cache()
        kv.pull_kv_blocks(kv.CacheIndex(1, source), mine, [2], [2])  # same-host: no NIXL needed
        assert torch.equal(mine_tensors[1][2], want[1][2])
        link.peer_pid = None  # (the path a DEVICE cache takes)
        other, other_tensors = zeros_cache()
        with pytest.raises(kv.LLMException) as failed:
            kv.pull_kv_blocks(kv.CacheIndex(1, source), other, [3], [3])
        assert failed.value.status_code == LLMStatusCode.LLM_LINK_FAILED
        assert "cluster 1 cannot take NIXL transfers" in str(failed.value) and "NIXL refused" in str(failed.value)
        assert engine.paths["nixl"] == 0 and not other_tensors[0].any()  # nothing moved
        assert other.cache_id not in engine.holds.in_flight  # nor held: it unregisters at once
        kv.unregister_kv_cache(other)
        assert kv.unlink_clusters([peer.info])[0] == LLMStatusCode.LLM_SUCCESS
    finally:
        held.open()
        peer.close()


def test_a_link_that_needs_nixl_at_once_fails_at_link_time_when_its_load_fails(held, monkeypatch):
    """Without same-host copies every byte moves through NIXL: a refused load fails the
    link itself (LLM_LINK_FAILED), as before, and nothing is linked or left loaded."""
    monkeypatch.setenv("TORCH_KVREG_SAME_HOST_COPY", "0")
    held.garbage = True
    held.open()
    peer = Peer(1)
    try:
        kv.initialize(2, options={"llm.SyncKvCacheWaitTime": "5000"})
        assert kv.link_clusters([peer.info]) == (LLMStatusCode.LLM_LINK_FAILED, [LLMStatusCode.LLM_LINK_FAILED])
        engine = kv.remote.current_engine()
        assert not engine.links and 1 not in engine.link_phases
    finally:
        peer.close()
