"""Asynchronous transfers: Transfer handles for local copies and remote pulls and pushes,
many in flight from one thread, waits that release the GIL and time out without stopping
the transfer, failures reported with the blocks to recompute, caches kept registered while
a transfer needs them, and completion notices delivered to the peer after the data."""

import threading
import time

import numpy as np
import pytest
import torch

import torch_kvreg as kv
from torch_kvreg import CacheIndex, LLMStatusCode
from torch_kvreg.transfer import _copy_worker

from remote_peer import linked_to, paged, running_peer


@pytest.fixture
def local():
    kv.initialize(options={"llm.SyncKvCacheWaitTime": "200"})
    src = [torch.arange(64.0).reshape(8, 8) + 100 * t for t in range(2)]
    dst = [torch.zeros(8, 8) for _ in range(2)]
    yield src, dst, kv.register_kv_cache(src), kv.register_kv_cache(dst)
    kv.finalize()


def blocked_worker():
    """Holds the local copy worker until the returned event is set."""
    gate = threading.Event()
    _copy_worker().submit(gate.wait, 30)
    return gate


def test_local_async_copy_lands(local):
    src, dst, a, b = local
    transfer = kv.copy_kv_blocks_async(a, b, [1, 6], [0, 7])
    assert isinstance(transfer, kv.Transfer)
    assert transfer.wait(5000) == 2 * 8 * 4 * 2 == transfer.nbytes
    assert transfer.done() and transfer.status == LLMStatusCode.LLM_SUCCESS and transfer.failed_blocks == []
    assert all(torch.equal(d[[0, 7]], s[[1, 6]]) for d, s in zip(dst, src)) and not dst[0][1:7].any()
    assert transfer.elapsed_s >= 0 and "local copy" in repr(transfer)


def test_local_async_copy_checks_before_it_queues(local):
    src, dst, a, b = local
    before = (kv.usage(), kv.registered_caches())
    for call, error in (
        (lambda: kv.copy_kv_blocks_async(a, b, [8], [0]), kv.LLMIndexError),
        (lambda: kv.copy_kv_blocks_async(a, b, [0, 1], [2, 2]), kv.LLMParamInvalidError),
        (lambda: kv.copy_kv_blocks_async(a, a, [0, 1], [1, 2]), kv.LLMParamInvalidError),
        (lambda: kv.copy_kv_blocks_async(a, 10**6, [0], [0]), kv.LLMKVCacheNotExistError),
        (lambda: kv.copy_kv_blocks_async(a, b, "0", [0]), kv.LLMTypeError),
    ):
        with pytest.raises(error):
            call()
    assert (kv.usage(), kv.registered_caches()) == before
    kv.unregister_kv_cache(a)  # nothing was left holding it


def test_many_local_copies_in_flight_from_one_thread(local):
    src, dst, a, b = local
    gate = blocked_worker()
    transfers = [kv.copy_kv_blocks_async(a, b, [i % 8], [(i + 3) % 8]) for i in range(64)]
    assert not any(t.done() for t in transfers)  # all queued behind the gate
    gate.set()
    assert sum(t.wait(10_000) for t in transfers) == 64 * 8 * 4 * 2
    assert all(torch.equal(d[(i + 3) % 8], s[i % 8]) for i in range(8) for d, s in zip(dst, src))


def test_wait_times_out_without_stopping_and_releases_the_gil(local):
    src, dst, a, b = local
    gate = blocked_worker()
    transfer = kv.copy_kv_blocks_async(a, b, [2], [3])
    spins = {"n": 0}
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            spins["n"] += 1

    spinner = threading.Thread(target=spin)
    spinner.start()
    with pytest.raises(kv.LLMException) as info:
        transfer.wait(timeout_ms=300)
    stop.set()
    spinner.join()
    assert info.value.status_code == LLMStatusCode.LLM_TIMEOUT
    assert spins["n"] > 1000  # Python ran while we waited
    assert not transfer.done() and transfer.status is None and transfer.failed_blocks == [3]
    gate.set()
    transfer.wait(5000)
    assert torch.equal(dst[1][3], src[1][2])


def test_unregister_waits_for_a_queued_copy(local):
    src, dst, a, b = local
    gate = blocked_worker()
    transfer = kv.copy_kv_blocks_async(a, b, [0], [1])
    with pytest.raises(kv.LLMException) as info:
        kv.unregister_kv_cache(b)  # llm.SyncKvCacheWaitTime is 200 ms here
    assert info.value.status_code == LLMStatusCode.LLM_TIMEOUT and kv.get_cache(b.cache_id) == b
    gate.set()
    transfer.wait(5000)
    kv.unregister_kv_cache(b)
    assert torch.equal(dst[0][1], src[0][0])


def test_a_failed_copy_reports_its_blocks(local):
    src, dst, a, b = local
    gate = blocked_worker()
    transfer = kv.copy_kv_blocks_async(a, b, [0, 1], [4, 5])
    dst[0].resize_(64, 64)  # reallocates memory the registry holds: the copy must refuse
    gate.set()
    with pytest.raises(kv.LLMException) as info:
        transfer.wait(5000)
    assert info.value.status_code == LLMStatusCode.LLM_FAILED and "reallocated" in str(info.value)
    assert transfer.status == LLMStatusCode.LLM_FAILED and transfer.failed_blocks == [4, 5]
    with pytest.raises(kv.LLMException):  # every wait raises it again
        transfer.wait()


# --- remote ------------------------------------------------------------------------------------
BLOCK = (16, 2, 32)  # 2 KiB fp16 blocks


@pytest.fixture(scope="module")
def peer():
    with running_peer(9) as p:
        yield p


@pytest.fixture
def decoder(peer):
    with linked_to(peer):
        yield kv


@pytest.fixture(params=["same_host", "nixl"])
def routed_decoder(request, peer, monkeypatch):
    """A linked decoder whose transfers to the peer (on this host) take the given route:
    direct same-host copies, or NIXL as to another host."""
    monkeypatch.setenv("TORCH_KVREG_SAME_HOST_COPY", "1" if request.param == "same_host" else "0")
    with linked_to(peer):
        yield request.param


def took_route(route, transfers):
    """Every one of ``transfers`` went the route asked for, and none another."""
    routes = kv.remote.existing_engine().paths
    return routes[route] == transfers and sum(routes.values()) == transfers


def test_64_pulls_in_flight_from_one_thread(peer, routed_decoder):
    remote_id = peer.call("register", (2, 64, BLOCK, 41, True))
    theirs = paged(2, 64, BLOCK, 41)
    mine = [torch.zeros(64, *BLOCK, dtype=torch.float16) for _ in range(2)]
    local = kv.register_kv_cache(mine)
    start = time.monotonic()
    transfers = [kv.pull_kv_blocks_async(CacheIndex(9, remote_id), local, [i], [63 - i]) for i in range(64)]
    started = time.monotonic() - start
    assert all(isinstance(t, kv.Transfer) for t in transfers)
    assert sum(t.wait(10_000) for t in transfers) == 64 * 2 * local.cache_desc.block_nbytes
    assert all(t.status == LLMStatusCode.LLM_SUCCESS and t.failed_blocks == [] for t in transfers)
    assert all(torch.equal(m.flip(0), t) for m, t in zip(mine, theirs))
    assert started < 10
    assert took_route(routed_decoder, 64)
    assert peer.settled_leases() == {}
    peer.call("unregister", remote_id)


def test_notices_reach_the_peer_after_the_data(peer, routed_decoder):
    remote_id = peer.call("register", (2, 8, BLOCK, 42, True))
    peer.call("notifications")  # drain
    mine = [torch.full((8, *BLOCK), 5.0, dtype=torch.float16) for _ in range(2)]
    local = kv.register_kv_cache(mine)
    kv.push_kv_blocks_async(local, CacheIndex(9, remote_id), [0, 1], [6, 7], notify="req-17 pushed").wait(5000)
    kv.pull_kv_blocks(CacheIndex(9, remote_id), local, [2], [3], notify=b"req-18 pulled")
    kv.pull_kv_cache_async(CacheIndex(9, remote_id, 4), local, 5, notify="x" * 1024).wait(5000)
    deadline = time.monotonic() + 5
    received = []
    while len(received) < 3 and time.monotonic() < deadline:
        received += peer.call("notifications")
        time.sleep(0.05)
    assert received == [(2, b"req-17 pushed"), (2, b"req-18 pulled"), (2, b"x" * 1024)]
    assert torch.all(peer.call("read", remote_id)[1][7] == 5.0)  # the data was there by then
    assert kv.get_notifications() == []  # nothing was sent to us
    assert took_route(routed_decoder, 3)
    before = (kv.usage(), kv.registered_caches())
    with pytest.raises(kv.LLMParamInvalidError):
        kv.pull_kv_blocks_async(CacheIndex(9, remote_id), local, [0], [0], notify="x" * 1025)
    with pytest.raises(kv.LLMTypeError):
        kv.pull_kv_blocks_async(CacheIndex(9, remote_id), local, [0], [0], notify=17)
    assert (kv.usage(), kv.registered_caches()) == before and peer.settled_leases() == {}
    peer.call("unregister", remote_id)


@pytest.mark.parametrize("failure", ["never_done", "error"])
def test_transfers_in_flight_fail_with_their_blocks(through_nixl, peer, decoder, monkeypatch, failure):
    remote_id = peer.call("register", (2, 8, BLOCK, 43, True))
    local = kv.register_kv_cache([torch.zeros(8, *BLOCK, dtype=torch.float16) for _ in range(2)])
    agent = kv.remote.current_engine().agent
    state = "PROC" if failure == "never_done" else "ERR"
    monkeypatch.setattr(agent, "check_xfer_state", lambda handle: state)
    monkeypatch.setattr(agent, "transfer", lambda handle, notif_msg=b"": "PROC")
    start = time.monotonic()
    transfers = [kv.pull_kv_blocks_async(CacheIndex(9, remote_id), local, [i], [7 - i]) for i in range(4)]
    for i, transfer in enumerate(transfers):
        with pytest.raises(kv.LLMException) as info:
            transfer.wait(5000)
        expected = LLMStatusCode.LLM_TIMEOUT if failure == "never_done" else LLMStatusCode.LLM_LINK_FAILED
        assert info.value.status_code == expected and transfer.status == expected
        assert transfer.failed_blocks == [7 - i]
    assert time.monotonic() - start < 1.0 + 2  # llm.SyncKvCacheWaitTime is 1 s
    assert peer.settled_leases() == {}
    monkeypatch.undo()
    kv.unregister_kv_cache(local)  # nothing holds it any more
    peer.call("unregister", remote_id)


def gated_posts(monkeypatch):
    """Makes NIXL's post wait for the returned event the first time (as a post that moves
    the bytes itself does) and records, per post, the thread and the descriptors posted."""
    engine = kv.remote.current_engine()
    posts, gate, entered = [], threading.Event(), threading.Event()
    post, make = engine.agent.transfer, engine.agent.initialize_xfer

    def counting_make(operation, local_descs, remote_descs, agent_name, *args, **kwargs):
        posts.append({"descriptors": local_descs.descCount()})
        return make(operation, local_descs, remote_descs, agent_name, *args, **kwargs)

    def gated_post(handle, notif_msg=b""):
        if not gate.is_set():
            entered.set()
            gate.wait(30)
        posts[-1]["thread"] = threading.current_thread().name
        return post(handle, notif_msg)

    monkeypatch.setattr(engine.agent, "initialize_xfer", counting_make)
    monkeypatch.setattr(engine.agent, "transfer", gated_post)
    return posts, gate, entered


def test_async_starts_return_before_the_post_and_a_burst_goes_as_few_requests(through_nixl, peer, decoder, monkeypatch):
    remote_id = peer.call("register", (2, 64, BLOCK, 45, True))
    theirs = paged(2, 64, BLOCK, 45)
    mine = [torch.zeros(64, *BLOCK, dtype=torch.float16) for _ in range(2)]
    local = kv.register_kv_cache(mine)
    posts, gate, entered = gated_posts(monkeypatch)
    source = CacheIndex(9, remote_id)
    # The first post hangs in NIXL (as one that moves the bytes itself does): the caller
    # still gets every Transfer back at once, and what it starts meanwhile queues.
    transfers = [kv.pull_kv_blocks_async(source, local, [0], [0])]
    assert entered.wait(5)
    transfers += [
        kv.pull_kv_blocks_async(source, local, [i], [i], notify="first half" if i == 31 else None) for i in range(1, 64)
    ]
    assert not any(t.done() for t in transfers)
    gate.set()
    assert sum(t.wait(10_000) for t in transfers) == 64 * 2 * local.cache_desc.block_nbytes
    assert all(t.status == LLMStatusCode.LLM_SUCCESS for t in transfers)
    assert all(torch.equal(m, t) for m, t in zip(mine, theirs))
    # Posted by the progress thread: the first alone; the 63 that waited as two requests
    # (a notice ends a group), each run of adjacent blocks one descriptor per tensor.
    assert {post["thread"] for post in posts} == {"kvreg-progress"}
    assert [post["descriptors"] for post in posts] == [2, 2, 2]
    deadline = time.monotonic() + 5
    received = []
    while not received and time.monotonic() < deadline:
        received = peer.call("notifications")
    assert received == [(2, b"first half")]
    assert peer.settled_leases() == {}
    monkeypatch.undo()
    kv.unregister_kv_cache(local)
    peer.call("unregister", remote_id)


def test_a_failed_group_fails_every_transfer_in_it(through_nixl, peer, decoder, monkeypatch):
    remote_id = peer.call("register", (2, 8, BLOCK, 46, True))
    local = kv.register_kv_cache([torch.zeros(8, *BLOCK, dtype=torch.float16) for _ in range(2)])
    posts, gate, entered = gated_posts(monkeypatch)
    agent = kv.remote.current_engine().agent
    first = kv.pull_kv_blocks_async(CacheIndex(9, remote_id), local, [0], [0])
    assert entered.wait(5)  # the progress thread is posting the first
    riders = [kv.pull_kv_blocks_async(CacheIndex(9, remote_id), local, [i], [8 - i]) for i in range(1, 5)]
    gated = agent.transfer
    monkeypatch.setattr(agent, "transfer", lambda handle, notif_msg=b"": "ERR" if gate.is_set() else gated(handle))
    gate.set()
    assert first.wait(5000) == 2 * local.cache_desc.block_nbytes
    for i, transfer in enumerate(riders, start=1):
        with pytest.raises(kv.LLMException) as info:
            transfer.wait(5000)
        assert info.value.status_code == LLMStatusCode.LLM_LINK_FAILED and transfer.failed_blocks == [8 - i]
    assert len(posts) == 2  # the four failed as one request
    assert peer.settled_leases() == {}
    monkeypatch.undo()
    kv.unregister_kv_cache(local)  # nothing holds it any more
    peer.call("unregister", remote_id)


def test_joined_rows_join_only_what_is_adjacent_on_both_sides():
    from torch_kvreg.remote.agent import joined_rows as _joined_rows

    rows = lambda *r: np.array(r, dtype=np.uint64)  # noqa: E731
    local = rows((300, 100, 0), (100, 100, 0), (200, 100, 0), (500, 100, 0), (600, 100, 1))
    remote = rows((9300, 100, 0), (9100, 100, 0), (9200, 100, 0), (9900, 100, 0), (10000, 100, 0))
    joined_local, joined_remote = _joined_rows(local, remote)
    # 100-400 adjacent on both sides: one row; 500 not next to 400; 600 on another device.
    assert joined_local.tolist() == [[100, 300, 0], [500, 100, 0], [600, 100, 1]]
    assert joined_remote.tolist() == [[9100, 300, 0], [9900, 100, 0], [10000, 100, 0]]
    shuffled = rows((100, 100, 0), (200, 100, 0))
    apart = rows((9200, 100, 0), (9100, 100, 0))  # adjacent locally, reversed remotely
    assert _joined_rows(shuffled, apart)[0].tolist() == shuffled.tolist()


# --- compiled code: start the next layer's load, wait for one's own --------------------------
def test_start_and_wait_ops_in_eager(peer, decoder):
    remote_id = peer.call("register", (2, 8, BLOCK, 44, True))
    theirs = paged(2, 8, BLOCK, 44)
    mine = [torch.zeros(8, *BLOCK, dtype=torch.float16) for _ in range(2)]
    local = kv.register_kv_cache(mine)
    transfer_id = torch.ops.llm.start_pull_kv_blocks(9, remote_id, local.cache_id, torch.tensor([1]), torch.tensor([2]))
    assert int(transfer_id) > 0
    torch.ops.llm.wait_transfer(transfer_id)
    assert torch.equal(mine[1][2], theirs[1][1])
    with pytest.raises(ValueError, match="^LLM_PARAM_INVALID: transfer id .* already waited for"):
        torch.ops.llm.wait_transfer(transfer_id)  # exactly once
    with pytest.raises(ValueError, match="^LLM_PARAM_INVALID"):
        torch.ops.llm.wait_transfer(10**9)
    with pytest.raises(IndexError, match="^LLM_PARAM_INVALID: src_blocks"):
        torch.ops.llm.start_pull_kv_blocks(9, remote_id, local.cache_id, torch.tensor([8]), torch.tensor([0]))
    assert kv.inflight._table == {}
    peer.call("unregister", remote_id)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_layer_pipeline_in_a_compiled_graph(peer, decoder, backend):
    """Layer i+1's load starts before layer i is waited for and used, in one graph."""
    torch._dynamo.reset()
    remote0 = peer.call("register", (2, 8, BLOCK, 45, True))  # the prompt's layers 0 and 1 (K, V)
    remote1 = peer.call("register", (2, 8, BLOCK, 46, True))
    theirs0, theirs1 = paged(2, 8, BLOCK, 45), paged(2, 8, BLOCK, 46)
    mine = [torch.zeros(8, *BLOCK, dtype=torch.float16) for _ in range(2)]
    spare = [torch.zeros(8, *BLOCK, dtype=torch.float16) for _ in range(2)]
    layer0, layer1 = kv.register_kv_cache(mine).cache_id, kv.register_kv_cache(spare).cache_id

    @torch.compile(fullgraph=True, backend=backend)
    def step(blocks, slots, x):
        loading = torch.ops.llm.start_pull_kv_blocks(9, remote0, layer0, blocks, slots)
        upcoming = torch.ops.llm.start_pull_kv_blocks(9, remote1, layer1, blocks + 4, slots)
        torch.ops.llm.wait_transfer(loading)
        seen = mine[0].index_select(0, slots)  # read after the wait, inside the graph
        torch.ops.llm.wait_transfer(upcoming)
        return seen, x * 2

    seen, _ = step(torch.tensor([0, 3]), torch.tensor([5, 6]), torch.ones(1))
    assert torch.equal(seen, theirs0[0][[0, 3]])
    assert torch.equal(spare[1][[5, 6]], theirs1[1][[4, 7]])
    assert kv.inflight._table == {}  # every transfer waited for once
    peer.call("unregister", remote0)
    peer.call("unregister", remote1)


@pytest.mark.parametrize("util", ("test_schema", "test_faketensor", "test_autograd_registration"))
def test_opcheck_start_and_wait(peer, decoder, util):
    remote_id = peer.call("register", (2, 8, BLOCK, 46, True))
    local = kv.register_kv_cache([torch.zeros(8, *BLOCK, dtype=torch.float16) for _ in range(2)])
    args = (9, remote_id, local.cache_id, torch.tensor([1, 2]), torch.tensor([3, 4]))
    assert torch.library.opcheck(torch.ops.llm.start_pull_kv_blocks.default, args, test_utils=(util,)) == {
        util: "SUCCESS"
    }
    for transfer_id in list(kv.inflight._table):  # what the check ran for real, if anything
        kv.inflight.take(transfer_id).wait(5000)
    transfer_id = torch.ops.llm.start_pull_kv_blocks(*args)
    assert torch.library.opcheck(torch.ops.llm.wait_transfer.default, (transfer_id,), test_utils=(util,)) == {
        util: "SUCCESS"
    }
    for leftover in list(kv.inflight._table):  # the checks that ran only the fake kernel
        kv.inflight.take(leftover).wait(5000)
    with pytest.raises(ValueError, match="^LLM_PARAM_INVALID"):  # waited for once, by opcheck or above
        torch.ops.llm.wait_transfer(transfer_id)
    peer.call("unregister", remote_id)


def test_bad_remote_calls_change_nothing(peer, decoder):
    remote_id = peer.call("register", (4, 8, BLOCK, 47, True))  # 2 layers x (K, V)
    mine = [torch.zeros(8, *BLOCK, dtype=torch.float16) for _ in range(4)]
    local = kv.register_kv_cache(mine)
    index = CacheIndex(9, remote_id)
    before = (kv.usage(), kv.registered_caches())
    for call, error in (
        (lambda: kv.pull_kv_blocks_async(index, local, [0], [0], layers=range(0, 3)), kv.LLMParamInvalidError),
        (lambda: kv.pull_kv_blocks_async(index, local, [0], [0], layers=range(0, 2, 2)), kv.LLMParamInvalidError),
        (lambda: kv.pull_kv_blocks_async(index, local, [0], [0], layers=range(1, 1)), kv.LLMParamInvalidError),
        (lambda: kv.pull_kv_blocks_async(index, local, [0], [0], layers=[0, 1]), kv.LLMTypeError),
        (
            lambda: kv.pull_kv_blocks_async(index, local, [0], [0], layers=range(0, 1), tensors_per_layer=0),
            kv.LLMParamInvalidError,
        ),
        (lambda: kv.push_kv_blocks_async(local, index, [0], [9]), kv.LLMIndexError),
        (lambda: kv.pull_kv_cache_async(CacheIndex(9, remote_id, 8), local), kv.LLMIndexError),
        (lambda: kv.pull_kv_blocks_async(index, local, [0], [0], notify="x" * 2000), kv.LLMParamInvalidError),
        (lambda: kv.pull_kv_blocks_async(CacheIndex(9, 10**6), local, [0], [0]), kv.LLMKVCacheNotExistError),
    ):
        with pytest.raises(error):
            call()
    assert (kv.usage(), kv.registered_caches()) == before
    assert peer.settled_leases() == {} and all(not t.any() for t in mine)
    assert torch.equal(peer.call("read", remote_id)[0], paged(4, 8, BLOCK, 47)[0])
    # The same layers on both sides move just those tensors.
    kv.pull_kv_blocks(index, local, [3], [4], layers=range(1, 2))
    theirs = paged(4, 8, BLOCK, 47)
    assert torch.equal(mine[2][4], theirs[2][3]) and torch.equal(mine[3][4], theirs[3][3])
    assert not mine[0].any() and not mine[1].any()
    peer.call("unregister", remote_id)
