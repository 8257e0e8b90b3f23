"""Two processes on 127.0.0.1: link, pull and push KV blocks over NIXL, and every failure."""

import os
import random
import socket
import time

import pytest
import torch

import torch_kvreg as kv
from torch_kvreg import CacheIndex, ClusterInfo, LLMStatusCode

from remote_peer import Peer, paged

pytestmark = pytest.mark.skipif(not kv.remote.nixl_available(), reason="needs the nixl extra")
BLOCK_SHAPE = (16, 2, 32)  # 2 KiB fp16 blocks


@pytest.fixture(scope="module")
def peer():
    p = Peer(cluster_id=7)
    yield p
    p.close()


@pytest.fixture
def decoder():
    kv.initialize(cluster_id=2, role=kv.LlmRole.DECODER, options={"llm.SyncKvCacheWaitTime": "2000"})
    yield kv
    kv.finalize()


def test_pull_verify_push_unlink(through_nixl, peer, decoder):
    remote_id = peer.call("register", (8, 64, BLOCK_SHAPE, 1, True))
    expected = paged(8, 64, BLOCK_SHAPE, 1)
    assert kv.link_clusters([peer.info]) == (LLMStatusCode.LLM_SUCCESS, [LLMStatusCode.LLM_SUCCESS])
    mine = [torch.zeros(32, *BLOCK_SHAPE, dtype=torch.float16) for _ in range(8)]
    local = kv.register_kv_cache(mine)
    rng = random.Random(0)
    src_blocks = list(range(0, 60, 3))  # no two consecutive: nothing to coalesce
    dst_blocks = rng.sample(range(32), 20)
    moved = kv.pull_kv_blocks(CacheIndex(peer.cluster_id, remote_id), local, src_blocks, dst_blocks)
    assert moved == 20 * 8 * local.cache_desc.block_nbytes
    assert local.cache_id in kv.remote.current_engine().registrations.preps  # scattered blocks: prepared lists
    for t in range(8):
        assert torch.equal(mine[t][dst_blocks], expected[t][src_blocks])
    # consecutive runs, as a tensor
    kv.pull_kv_blocks(CacheIndex(peer.cluster_id, remote_id), local, torch.arange(40, 50), torch.arange(0, 10))
    assert all(torch.equal(mine[t][:10], expected[t][40:50]) for t in range(8))
    # push back: decoder-written blocks land in the prompt's cache
    for t in range(8):
        mine[t][31].fill_(float(t + 1))
    kv.push_kv_blocks(local, CacheIndex(peer.cluster_id, remote_id), [31], [5])
    remote_now = peer.call("read", remote_id)
    assert all(torch.all(remote_now[t][5] == t + 1) for t in range(8))
    assert torch.equal(remote_now[0][6], expected[0][6])  # nothing else touched
    # pull_kv_cache: one slice
    kv.pull_kv_cache(CacheIndex(peer.cluster_id, remote_id, batch_index=9), local, batch_index=3)
    assert torch.equal(mine[4][3], expected[4][9])
    assert kv.unlink_clusters([peer.info]) == (LLMStatusCode.LLM_SUCCESS, [LLMStatusCode.LLM_SUCCESS])
    with pytest.raises(kv.LLMException) as info:
        kv.pull_kv_blocks(CacheIndex(peer.cluster_id, remote_id), local, [0], [0])
    assert info.value.status_code == LLMStatusCode.LLM_NOT_YET_LINK
    peer.call("unregister", remote_id)


def test_caches_over_the_prepared_list_cap_use_request_descriptors(peer, decoder, monkeypatch):
    """Past MAX_PREPPED_DESCRIPTORS (tensors x blocks) no per-block list is prepared: the
    request's own descriptors carry scattered blocks, with the same bytes landing."""
    monkeypatch.setattr(kv.remote.agent, "MAX_PREPPED_DESCRIPTORS", 8 * 32 - 1)
    remote_id = peer.call("register", (8, 64, BLOCK_SHAPE, 4, True))
    expected = paged(8, 64, BLOCK_SHAPE, 4)
    kv.link_clusters([peer.info])
    mine = [torch.zeros(32, *BLOCK_SHAPE, dtype=torch.float16) for _ in range(8)]
    local = kv.register_kv_cache(mine)
    src_blocks, dst_blocks = list(range(1, 61, 3)), random.Random(3).sample(range(32), 20)
    kv.pull_kv_blocks(CacheIndex(peer.cluster_id, remote_id), local, src_blocks, dst_blocks)
    assert local.cache_id not in kv.remote.current_engine().registrations.preps
    assert all(torch.equal(mine[t][dst_blocks], expected[t][src_blocks]) for t in range(8))
    peer.call("unregister", remote_id)


def test_link_twice_and_unknown_caches(peer, decoder):
    assert kv.link_clusters([peer.info])[0] == LLMStatusCode.LLM_SUCCESS
    assert kv.link_clusters([peer.info]) == (LLMStatusCode.LLM_ALREADY_LINK, [LLMStatusCode.LLM_ALREADY_LINK])
    local = kv.register_kv_cache([torch.zeros(4, *BLOCK_SHAPE, dtype=torch.float16) for _ in range(2)])
    remote_id = peer.call("register", (2, 8, BLOCK_SHAPE, 3, True))
    peer.call("unregister", remote_id)
    with pytest.raises(kv.LLMKVCacheNotExistError):
        kv.pull_kv_blocks(CacheIndex(peer.cluster_id, remote_id), local, [0], [0])
    private_id = peer.call("register", (2, 8, BLOCK_SHAPE, 4, False))  # remote_accessible=False
    with pytest.raises(kv.LLMKVCacheNotExistError):
        kv.pull_kv_blocks(CacheIndex(peer.cluster_id, private_id), local, [0], [0])
    peer.call("unregister", private_id)


@pytest.mark.parametrize("remote", [None, False], ids=["default host cache", "remote_accessible=False"])
def test_private_peer_caches_cannot_be_pulled_or_pushed(peer, decoder, remote):
    """A HOST cache registered with default settings, or any cache registered with
    remote_accessible=False, is out of reach: no pull, no push, no lease left behind."""
    kv.link_clusters([peer.info])
    private_id = peer.call("register", (2, 8, BLOCK_SHAPE, 13, remote))
    mine = [torch.full((8, *BLOCK_SHAPE), 3.0, dtype=torch.float16) for _ in range(2)]
    local = kv.register_kv_cache(mine)
    for call in (
        lambda: kv.pull_kv_blocks(CacheIndex(7, private_id), local, [0, 1], [2, 3]),
        lambda: kv.push_kv_blocks(local, CacheIndex(7, private_id), [0, 1], [2, 3]),
        lambda: kv.pull_kv_cache(CacheIndex(7, private_id, 1), local),
    ):
        with pytest.raises(kv.LLMKVCacheNotExistError) as info:
            call()
        assert "remote_accessible=False" in str(info.value)
    assert all(torch.all(t == 3.0) for t in mine)
    remote_now = peer.call("read", private_id)
    assert all(torch.equal(a, b) for a, b in zip(remote_now, paged(2, 8, BLOCK_SHAPE, 13)))
    assert peer.settled_leases() == {}
    peer.call("unregister", private_id)


@pytest.mark.parametrize("failure", ["error", "never_done"])
def test_nixl_failure_releases_everything(through_nixl, peer, failure, monkeypatch):
    """NIXL reporting an error, or a transfer that never completes: the right status within
    llm.SyncKvCacheWaitTime, the peer's lease released, the local cache still unregistrable."""
    kv.initialize(cluster_id=2, options={"llm.SyncKvCacheWaitTime": "300"})
    kv.link_clusters([peer.info])
    remote_id = peer.call("register", (2, 8, BLOCK_SHAPE, 14, True))
    local = kv.register_kv_cache([torch.zeros(8, *BLOCK_SHAPE, dtype=torch.float16) for _ in range(2)])
    agent = kv.remote.current_engine().agent
    polls = {"count": 0}
    if failure == "error":
        monkeypatch.setattr(agent, "transfer", lambda handle, *args, **kwargs: "ERR")
        expected = LLMStatusCode.LLM_LINK_FAILED
    else:

        def still_running(handle):
            polls["count"] += 1
            return "PROC"

        monkeypatch.setattr(agent, "transfer", lambda handle, *args, **kwargs: "PROC")
        monkeypatch.setattr(agent, "check_xfer_state", still_running)
        expected = LLMStatusCode.LLM_TIMEOUT
    start = time.monotonic()
    for call in (
        lambda: kv.pull_kv_blocks(CacheIndex(7, remote_id), local, [0, 1], [2, 3]),
        lambda: kv.push_kv_blocks(local, CacheIndex(7, remote_id), [0], [5]),
    ):
        with pytest.raises(kv.LLMException) as info:
            call()
        assert info.value.status_code == expected, info.value
    assert time.monotonic() - start < 2 * 0.3 + 2
    assert (polls["count"] > 0) == (failure == "never_done")
    assert peer.settled_leases() == {}
    assert kv.remote.current_engine().holds.in_flight.get(local.cache_id, 0) == 0
    kv.unregister_kv_cache(local)
    assert kv.registered_caches() == []
    monkeypatch.undo()
    peer.call("unregister", remote_id)
    kv.finalize()


def test_validated_against_remote_desc_before_bytes_move(peer, decoder):
    kv.link_clusters([peer.info])
    remote_id = peer.call("register", (2, 8, BLOCK_SHAPE, 5, True))
    mine = [torch.zeros(8, *BLOCK_SHAPE, dtype=torch.float16) for _ in range(2)]
    local = kv.register_kv_cache(mine)
    wrong_shape = kv.register_kv_cache([torch.zeros(8, 4, dtype=torch.float16) for _ in range(2)])
    cases = [
        (lambda: kv.pull_kv_blocks(CacheIndex(7, remote_id), local, [8], [0]), kv.LLMIndexError),
        (lambda: kv.pull_kv_blocks(CacheIndex(7, remote_id), local, [0, 1], [2, 2]), kv.LLMParamInvalidError),
        (lambda: kv.pull_kv_blocks(CacheIndex(7, remote_id), local, [0, 1], [2]), kv.LLMParamInvalidError),
        (lambda: kv.pull_kv_blocks(CacheIndex(7, remote_id), wrong_shape, [0], [0]), kv.LLMParamInvalidError),
        (lambda: kv.push_kv_blocks(local, CacheIndex(7, remote_id), [0], [99]), kv.LLMIndexError),
        (lambda: kv.pull_kv_cache(CacheIndex(7, remote_id, 8), local), kv.LLMIndexError),
        (lambda: kv.pull_kv_cache(CacheIndex(7, remote_id, 0), local, batch_index=-1), kv.LLMIndexError),
        (lambda: kv.pull_kv_cache(CacheIndex(7, remote_id, 0), local, size=1 << 40), kv.LLMParamInvalidError),
        (lambda: kv.pull_kv_cache(CacheIndex(7, remote_id, 0), wrong_shape), kv.LLMParamInvalidError),
        (lambda: kv.pull_kv_blocks(CacheIndex(7, remote_id), local, torch.tensor([0.5]), [0]), kv.LLMTypeError),
        (lambda: kv.pull_kv_blocks("7:1", local, [0], [0]), kv.LLMTypeError),
    ]
    for call, error in cases:
        with pytest.raises(error):
            call()
    assert all(not t.any() for t in mine)
    assert torch.equal(peer.call("read", remote_id)[0], paged(2, 8, BLOCK_SHAPE, 5)[0])
    peer.call("unregister", remote_id)


def test_pull_before_link_and_cluster_limit(decoder):
    local = kv.register_kv_cache(torch.zeros(4, 4))
    with pytest.raises(kv.LLMException) as info:
        kv.pull_kv_blocks(CacheIndex(3, 1), local, [0], [0])
    assert info.value.status_code == LLMStatusCode.LLM_NOT_YET_LINK
    many = [ClusterInfo(i, "127.0.0.1", 1) for i in range(17)]
    status, statuses = kv.link_clusters(many)
    assert status == LLMStatusCode.LLM_CLUSTER_NUM_EXCEED_LIMIT and len(statuses) == 17
    assert kv.unlink_clusters([ClusterInfo(3, "127.0.0.1", 1)])[0] == LLMStatusCode.LLM_NOT_YET_LINK


def test_link_failures(peer, decoder):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    status, _ = kv.link_clusters([ClusterInfo(9, "127.0.0.1", free_port)], timeout_ms=500)
    assert status == LLMStatusCode.LLM_LINK_FAILED
    wrong_id = ClusterInfo(99, peer.info.remote_ip, peer.info.remote_port)  # peer is cluster 7
    assert kv.link_clusters([wrong_id])[0] == LLMStatusCode.LLM_LINK_FAILED


def test_dead_peer_times_out_and_registry_stays(decoder):
    doomed = Peer(cluster_id=11, wait_ms=500)
    remote_id = doomed.call("register", (2, 8, BLOCK_SHAPE, 6, True))
    kv.finalize()
    kv.initialize(cluster_id=2, options={"llm.SyncKvCacheWaitTime": "500"})
    assert kv.link_clusters([doomed.info])[0] == LLMStatusCode.LLM_SUCCESS
    local = kv.register_kv_cache([torch.zeros(8, *BLOCK_SHAPE, dtype=torch.float16) for _ in range(2)])
    before = (kv.usage(), kv.registered_caches())
    doomed.process.kill()
    doomed.process.join(timeout=30)
    start = time.monotonic()
    with pytest.raises(kv.LLMException) as info:
        kv.pull_kv_blocks(CacheIndex(11, remote_id), local, [0], [0])
    assert info.value.status_code in (LLMStatusCode.LLM_TIMEOUT, LLMStatusCode.LLM_LINK_FAILED)
    assert time.monotonic() - start < 5
    assert (kv.usage(), kv.registered_caches()) == before
    kv.unregister_kv_cache(local)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_remote_ops_in_compiled_graph(peer, decoder, backend):
    torch._dynamo.reset()
    kv.link_clusters([peer.info])
    remote_id = peer.call("register", (2, 16, BLOCK_SHAPE, 9, True))
    expected = paged(2, 16, BLOCK_SHAPE, 9)
    mine = [torch.zeros(16, *BLOCK_SHAPE, dtype=torch.float16) for _ in range(2)]
    local = kv.register_kv_cache(mine)

    @torch.compile(fullgraph=True, backend=backend)
    def step(src_blocks, dst_blocks, probe):
        torch.ops.llm.pull_kv_blocks(7, remote_id, local.cache_id, src_blocks, dst_blocks)
        first = mine[0].index_select(0, dst_blocks[:1])[0]  # read after the pull, inside the graph
        torch.ops.llm.push_kv_blocks(local.cache_id, 7, remote_id, dst_blocks, src_blocks + 8)
        return first, probe + 1

    first, _ = step(torch.tensor([3, 4]), torch.tensor([0, 1]), torch.zeros(1))
    assert torch.equal(first, expected[0][3])
    remote_now = peer.call("read", remote_id)
    assert torch.equal(remote_now[1][11], expected[1][3]) and torch.equal(remote_now[1][12], expected[1][4])
    peer.call("unregister", remote_id)


def test_without_nixl_remote_calls_name_the_extra(monkeypatch, decoder):
    monkeypatch.setattr(kv.remote.api, "nixl_available", lambda: False)
    with pytest.raises(kv.LLMException) as info:
        kv.link_clusters([ClusterInfo(1, "127.0.0.1", 1)])
    assert info.value.status_code == LLMStatusCode.LLM_FEATURE_NOT_ENABLED
    assert "torch_kvreg[nixl]" in str(info.value)
    kv.register_kv_cache(torch.zeros(4))  # nothing else changes


def test_disaggregated_example_matches_single_process():
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parent.parent / "examples" / "disaggregated_prefill_decode.py"
    result = subprocess.run(
        [sys.executable, str(script), "--new-tokens", "12"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK: disaggregated tokens equal the single-process run" in result.stdout
    assert "pulled" in result.stdout and "GB/s" in result.stdout


def test_unregister_waits_for_transfers_in_flight():
    import threading

    kv.initialize(cluster_id=4, options={"llm.ListenIpInfo": "127.0.0.1:0", "llm.SyncKvCacheWaitTime": "2000"})
    engine = kv.remote.current_engine()
    cache = kv.register_kv_cache(torch.zeros(8, 8), kv.RegisterCfg(remote_accessible=True))
    assert cache.cache_id in engine.registrations.regs
    released = threading.Event()

    def transfer_in_flight():
        engine.holds.hold(cache.cache_id)
        time.sleep(0.3)
        released.set()
        engine.holds.unhold(cache.cache_id)

    thread = threading.Thread(target=transfer_in_flight)
    thread.start()
    time.sleep(0.05)
    kv.unregister_kv_cache(cache)  # waits for the transfer, then deregisters from NIXL
    assert released.is_set()
    assert cache.cache_id not in engine.registrations.regs
    thread.join()
    kv.finalize()


def test_unregister_times_out_and_changes_nothing():
    import threading

    kv.initialize(cluster_id=4, options={"llm.ListenIpInfo": "127.0.0.1:0", "llm.SyncKvCacheWaitTime": "200"})
    engine = kv.remote.current_engine()
    cache = kv.register_kv_cache(torch.zeros(8, 8), kv.RegisterCfg(remote_accessible=True))
    holding, done = threading.Event(), threading.Event()

    def stuck_transfer():
        engine.holds.hold(cache.cache_id)
        holding.set()
        done.wait(5)
        engine.holds.unhold(cache.cache_id)

    thread = threading.Thread(target=stuck_transfer)
    thread.start()
    holding.wait(5)
    with pytest.raises(kv.LLMException) as info:
        kv.unregister_kv_cache(cache)
    assert info.value.status_code == LLMStatusCode.LLM_TIMEOUT
    assert kv.registered_caches() == [cache] and cache.cache_id in engine.registrations.regs
    done.set()
    thread.join()
    kv.unregister_kv_cache(cache)
    kv.finalize()


def test_silent_peer_link_times_out(decoder):
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        start = time.monotonic()
        status, statuses = kv.link_clusters([ClusterInfo(5, "127.0.0.1", port)], timeout_ms=300)
        assert status == LLMStatusCode.LLM_TIMEOUT and statuses == [LLMStatusCode.LLM_TIMEOUT]
        assert time.monotonic() - start < 3
    with pytest.raises(kv.LLMException) as info:
        kv.pull_kv_blocks(CacheIndex(5, 1), kv.register_kv_cache(torch.zeros(2, 2)), [0], [0])
    assert info.value.status_code == LLMStatusCode.LLM_NOT_YET_LINK


def test_opcheck_remote_ops(peer, decoder):
    kv.link_clusters([peer.info])
    remote_id = peer.call("register", (2, 8, BLOCK_SHAPE, 12, True))
    local = kv.register_kv_cache([torch.zeros(8, *BLOCK_SHAPE, dtype=torch.float16) for _ in range(2)])
    blocks = (torch.tensor([1, 5]), torch.tensor([0, 3]))
    for op, args in (
        (torch.ops.llm.pull_kv_blocks.default, (7, remote_id, local.cache_id, *blocks)),
        (torch.ops.llm.push_kv_blocks.default, (local.cache_id, 7, remote_id, blocks[1], blocks[0])),
        (torch.ops.llm.pull_kv_cache.default, (7, remote_id, 2, local.cache_id, 4, -1)),
    ):
        result = torch.library.opcheck(op, args)  # transfers repeat identically, so all utils apply
        assert set(result.values()) == {"SUCCESS"}, (op, result)
    peer.call("unregister", remote_id)


def test_raw_op_unregister_drops_the_nixl_registration():
    kv.initialize(cluster_id=4, options={"llm.ListenIpInfo": "127.0.0.1:0"})
    engine = kv.remote.current_engine()
    first = kv.register_kv_cache(torch.zeros(8, 8), kv.RegisterCfg(remote_accessible=True))
    assert first.cache_id in engine.registrations.regs
    torch.ops.llm.unregister_kv_cache(first.cache_id)  # bypasses the Python layer
    second = kv.register_kv_cache(torch.zeros(8, 8), kv.RegisterCfg(remote_accessible=True))
    assert first.cache_id not in engine.registrations.regs and second.cache_id in engine.registrations.regs
    kv.finalize()


@pytest.mark.parametrize("value", ["ten", "-1", "1.5", "2000000"])
def test_a_bad_progress_delay_is_a_clear_error(monkeypatch, value):
    from torch_kvreg.remote.agent import make_agent

    monkeypatch.setenv("TORCH_KVREG_NIXL_PROGRESS_DELAY_US", value)
    with pytest.raises(kv.LLMParamInvalidError) as info:
        make_agent("never-made")
    assert "TORCH_KVREG_NIXL_PROGRESS_DELAY_US" in str(info.value)


def test_agents_pause_between_progress_polls():
    """nixl-cu12's own default polls without pause (a core per process); ours must not."""
    from torch_kvreg.remote.agent import make_agent

    agent = make_agent("pausing-probe")
    start_cpu, start_wall = time.process_time(), time.monotonic()
    time.sleep(1.0)
    used = (time.process_time() - start_cpu) / (time.monotonic() - start_wall)
    del agent
    assert used < 0.5, f"{used:.2f} CPU-seconds per second while idle"


def test_a_lease_outlives_its_transfer_briefly_and_is_shared_by_the_next(peer, decoder):
    """Consecutive transfers to one remote cache share one lease (no acquire, no release
    round trip each); the lease goes back LEASE_LINGER_S after the last transfer; the peer
    can unregister the cache right after a transfer (its unregister waits that long at most);
    finalize leaves no lease behind."""
    from torch_kvreg.remote import leases

    remote_id = peer.call("register", (2, 16, BLOCK_SHAPE, 5, True))
    kv.link_clusters([peer.info])
    mine = [torch.zeros(16, *BLOCK_SHAPE, dtype=torch.float16) for _ in range(2)]
    local = kv.register_kv_cache(mine)
    engine = kv.remote.current_engine()
    acquires = []
    request = engine.link_for(peer.cluster_id).request

    def counting(message, *args, **kwargs):
        if message.op in ("acquire", "release"):
            acquires.append(message.op)
        return request(message, *args, **kwargs)

    engine.link_for(peer.cluster_id).request = counting
    for block in range(6):  # one after another, each done before the next starts
        kv.pull_kv_blocks(CacheIndex(peer.cluster_id, remote_id), local, [block], [block])
    kv.push_kv_blocks_async(local, CacheIndex(peer.cluster_id, remote_id), [0], [9]).wait()
    assert acquires == ["acquire"]  # one lease for all seven
    held = peer.call("leases")
    assert list(held.values()) == [remote_id]
    start = time.monotonic()
    assert peer.settled_leases() == {}
    assert time.monotonic() - start < 1.0
    assert acquires == ["acquire", "release"]
    expected = paged(2, 16, BLOCK_SHAPE, 5)
    assert all(torch.equal(mine[t][:6], expected[t][:6]) for t in range(2))
    # Right after a transfer the peer unregisters: it waits for the lingering lease, briefly.
    kv.pull_kv_blocks(CacheIndex(peer.cluster_id, remote_id), local, [7], [7])
    assert len(peer.call("leases")) == 1
    start = time.monotonic()
    peer.call("unregister", remote_id)
    assert time.monotonic() - start < leases.LEASE_LINGER_S + 1.0
    with pytest.raises(kv.LLMKVCacheNotExistError):
        kv.pull_kv_blocks(CacheIndex(peer.cluster_id, remote_id), local, [0], [0])
    # finalize with a lease still lingering
    other_id = peer.call("register", (2, 16, BLOCK_SHAPE, 6, True))
    kv.pull_kv_blocks(CacheIndex(peer.cluster_id, other_id), local, [1], [1])
    assert len(peer.call("leases")) == 1
    kv.finalize()
    assert peer.settled_leases(within_s=0.5) == {}
    kv.initialize(cluster_id=2, role=kv.LlmRole.DECODER, options={"llm.SyncKvCacheWaitTime": "2000"})
    peer.call("unregister", other_id)


def test_agents_start_without_ucx_memory_events_unless_the_user_says(monkeypatch):
    """UCX's memory events cost ~0.4 s of every process's first link (bench_remote's
    link_clusters: 530-556 ms with them, 131-139 ms without); a user's own setting wins."""
    if not kv.remote.nixl_available():
        pytest.skip("needs the nixl extra")
    from torch_kvreg.remote.agent import make_agent

    monkeypatch.delenv("UCX_MEM_EVENTS", raising=False)
    make_agent("events-default")
    assert os.environ["UCX_MEM_EVENTS"] == "no"
    monkeypatch.setenv("UCX_MEM_EVENTS", "yes")
    make_agent("events-user")
    assert os.environ["UCX_MEM_EVENTS"] == "yes"
