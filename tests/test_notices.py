"""wait_notices: a blocking wait for peers' completion notices. It wakes when a notice lands
(same-host copies and NIXL transfers alike, received in this process or in a peer), returns
at its timeout with nothing, lets other Python threads run meanwhile, ends at finalize, and
refuses a bad timeout with LLM_PARAM_INVALID."""

import threading
import time

import pytest
import torch

import torch_kvreg as kv
from torch_kvreg import CacheIndex, LLMStatusCode
from torch_kvreg.remote import notices, protocol

from remote_peer import linked_to, paged, running_peer

BLOCK = (16, 2, 32)  # 2 KiB fp16 blocks


class Spinner:
    """A Python thread counting while the test waits: proof that the wait let go of the GIL."""

    def __init__(self):
        self.count, self.stop = 0, threading.Event()
        self.thread = threading.Thread(target=self._spin)

    def _spin(self):
        while not self.stop.is_set():
            self.count += 1

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


@pytest.fixture
def alone():
    kv.initialize(options={"llm.SyncKvCacheWaitTime": "500"})
    yield
    kv.finalize()


def test_a_wait_with_nothing_coming_times_out_and_lets_python_run(alone):
    assert kv.wait_notices(timeout_ms=0) == []
    with Spinner() as spinner:
        time.sleep(0.05)
        start, before = time.monotonic(), spinner.count
        got = kv.wait_notices(timeout_ms=300)
        took, during = time.monotonic() - start, spinner.count - before
    assert got == []
    assert 0.29 <= took < 2.0, took
    assert during > 1000  # Python ran while we waited


@pytest.mark.parametrize("timeout", [-1, -(2**40), notices.MAX_WAIT_MS + 1, 2**63])
def test_a_timeout_out_of_range_is_param_invalid(alone, timeout):
    with pytest.raises(kv.LLMParamInvalidError) as info:
        kv.wait_notices(timeout_ms=timeout)
    assert info.value.status_code == LLMStatusCode.LLM_PARAM_INVALID and "timeout_ms" in str(info.value)


@pytest.mark.parametrize("timeout", [1.5, True, "10", [5]])
def test_a_timeout_of_the_wrong_type_is_param_invalid(alone, timeout):
    with pytest.raises(kv.LLMTypeError) as info:
        kv.wait_notices(timeout_ms=timeout)
    assert info.value.status_code == LLMStatusCode.LLM_PARAM_INVALID


def test_a_wait_before_initialize_is_llm_failed():
    assert not kv.is_initialized()
    with pytest.raises(kv.LLMException) as info:
        kv.wait_notices(timeout_ms=10)
    assert info.value.status_code == LLMStatusCode.LLM_FAILED


def test_finalize_ends_a_wait_without_limit():
    kv.initialize()
    result = {}

    def waiter():
        start = time.monotonic()
        result["got"] = kv.wait_notices()
        result["took"] = time.monotonic() - start

    thread = threading.Thread(target=waiter, daemon=True)  # (a wait that never ends must not hang pytest)
    thread.start()
    time.sleep(0.2)
    assert thread.is_alive()  # it waits (no notice, no timeout)
    kv.finalize()
    thread.join(timeout=5)
    assert not thread.is_alive() and result["got"] == [] and result["took"] >= 0.19


def test_the_box_wakes_waiters_and_keeps_order_and_bounds():
    """The native box on its own: put wakes a waiter at once, take keeps order, a full box
    drops (and counts) rather than grows."""
    _ = kv  # (the box needs no initialize)
    _C = kv._C
    _C.notices_clear()
    assert _C.notices_wait(0) == 0  # nothing queued: timed out at once

    def later():
        time.sleep(0.2)
        _C.notices_put(5, b"a")
        _C.notices_put(-1, b"b")

    thread = threading.Thread(target=later)
    start = time.monotonic()
    thread.start()
    assert _C.notices_wait(10_000) == 1
    assert time.monotonic() - start < 5
    thread.join()
    assert _C.notices_take() == [(5, b"a"), (-1, b"b")] and _C.notices_take() == []
    dropped = _C.notices_dropped()
    for _ in range(1 << 16):
        assert _C.notices_put(0, b"")
    assert not _C.notices_put(0, b"over") and _C.notices_dropped() == dropped + 1
    assert _C.notices_queued() == 1 << 16
    _C.notices_clear()
    assert _C.notices_queued() == 0


def test_a_notice_frame_is_checked():
    assert "notice" in protocol.HISTORY[3]
    message = protocol.Notice(b"x" * 1024).to_wire()
    assert protocol.parse_request({**message, "v": protocol.VERSION}) == protocol.Notice(b"x" * 1024)
    for bad in ({"op": "notice"}, {"op": "notice", "message": 5}, protocol.Notice(b"x" * 1025).to_wire()):
        with pytest.raises(protocol.ProtocolError):
            protocol.parse_request(bad)


# --- with a peer process ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def peer():
    with running_peer(9) as p:
        yield p


@pytest.fixture(params=["same_host", "nixl"])
def routed(request, peer, monkeypatch):
    """Linked to the peer; this process's transfers to it go the given route."""
    monkeypatch.setenv("TORCH_KVREG_SAME_HOST_COPY", "1" if request.param == "same_host" else "0")
    with linked_to(peer):
        yield request.param


def took_route(route, transfers):
    routes = kv.remote.existing_engine().paths
    return routes[route] == transfers and sum(routes.values()) == transfers


def in_thread(fn, *args):
    """Runs fn(*args) on a thread; returns (thread, result dict with "value" and "took")."""
    result = {}

    def run():
        start = time.monotonic()
        result["value"] = fn(*args)
        result["took"] = time.monotonic() - start

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def test_a_peer_waiting_wakes_when_our_push_lands(peer, routed):
    """The peer blocks in wait_notices; our push (same-host copy or NIXL) wakes it long
    before its timeout, with the notice, after the data."""
    remote_id = peer.call("register_zeros", (2, 8, BLOCK))
    peer.call("notifications")  # drain
    mine = paged(2, 8, BLOCK, 44)
    local = kv.register_kv_cache(mine)
    woken = 0
    for round_ in range(3):
        thread, result = in_thread(peer.call, "kv", ("wait_notices", (), {"timeout_ms": 30_000}))
        time.sleep(0.3)  # the peer is waiting by now
        push = kv.push_kv_blocks_async(
            local, CacheIndex(9, remote_id), [round_], [round_ + 4], notify=f"layer-{round_}"
        )
        thread.join(timeout=60)
        push.wait(10_000)
        assert result["value"] == [(2, f"layer-{round_}".encode())]
        assert 0.25 <= result["took"] < 10, result["took"]  # it waited, and woke long before 30 s
        woken += 1
        landed = peer.call("read", remote_id)
        assert all(torch.equal(theirs[round_ + 4], ours[round_]) for theirs, ours in zip(landed, mine))
    assert woken == 3 and took_route(routed, 3)
    assert peer.call("kv", ("wait_notices", (), {"timeout_ms": 50})) == []  # nothing more came
    peer.call("unregister", remote_id)


def test_a_pull_with_a_notice_wakes_the_peer_it_read(peer, routed):
    remote_id = peer.call("register", (2, 8, BLOCK, 45, True))
    mine = [torch.zeros(8, *BLOCK, dtype=torch.float16) for _ in range(2)]
    local = kv.register_kv_cache(mine)
    thread, result = in_thread(peer.call, "kv", ("wait_notices", (), {"timeout_ms": 30_000}))
    time.sleep(0.3)
    kv.pull_kv_blocks(CacheIndex(9, remote_id), local, [1], [2], notify=b"read it")
    thread.join(timeout=60)
    assert result["value"] == [(2, b"read it")] and 0.25 <= result["took"] < 10
    assert took_route(routed, 1)
    peer.call("unregister", remote_id)


def test_our_wait_wakes_when_the_peer_pushes_and_lets_python_run(peer, routed):
    """The other direction: the peer (which reaches us over NIXL: it did not prove our pid)
    pushes to this process while a thread here waits and another thread computes."""
    mine = [torch.zeros(8, *BLOCK, dtype=torch.float16) for _ in range(2)]
    local = kv.register_kv_cache(mine, kv.RegisterCfg(remote_accessible=True))
    theirs = peer.call("register", (2, 8, BLOCK, 46, True))
    assert kv.wait_notices(timeout_ms=0) == []

    def push_later():
        time.sleep(0.3)
        peer.call("kv", ("push_kv_blocks", (theirs, CacheIndex(2, local.cache_id), [3], [6]), {"notify": "pushed"}))

    pusher = threading.Thread(target=push_later)
    with Spinner() as spinner:
        pusher.start()
        start, before = time.monotonic(), spinner.count
        got = kv.wait_notices(timeout_ms=30_000)
        took, during = time.monotonic() - start, spinner.count - before
    pusher.join(timeout=60)
    assert got == [kv.Notification(9, b"pushed")]
    assert 0.25 <= took < 10, took
    assert during > 1000  # Python ran while we waited
    expected = peer.call("read", theirs)
    assert all(torch.equal(m[6], t[3]) for m, t in zip(mine, expected))  # the data came first
    peer.call("unregister", theirs)


@pytest.mark.parametrize("failure", ["ERR", "PROC"])
def test_a_failed_transfer_sends_no_notice(peer, monkeypatch, failure):
    """A transfer that fails (NIXL reports an error, or it is never done before its
    deadline) wakes nobody: its notice would say the data landed."""
    monkeypatch.setenv("TORCH_KVREG_SAME_HOST_COPY", "0")
    with linked_to(peer):
        remote_id = peer.call("register", (2, 8, BLOCK, 47, True))
        local = kv.register_kv_cache([torch.zeros(8, *BLOCK, dtype=torch.float16) for _ in range(2)])
        agent = kv.remote.current_engine().agent
        monkeypatch.setattr(agent, "check_xfer_state", lambda handle: failure)
        monkeypatch.setattr(agent, "transfer", lambda handle, notif_msg=b"": "PROC")
        transfer = kv.pull_kv_blocks_async(CacheIndex(9, remote_id), local, [1], [2], notify="must not arrive")
        with pytest.raises(kv.LLMException):
            transfer.wait(5000)
        assert peer.call("kv", ("wait_notices", (), {"timeout_ms": 300})) == []
        monkeypatch.undo()
        peer.call("unregister", remote_id)
