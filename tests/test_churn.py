"""Links that come and go leave nothing behind: open file descriptors, sockets and threads of
BOTH processes stay flat across link / pull / unlink cycles."""

import os
import time

import pytest
import torch

import torch_kvreg as kv

from remote_peer import Peer, usage

pytestmark = pytest.mark.skipif(not kv.remote.nixl_available(), reason="needs the nixl extra")


def open_files(pid):
    """(file descriptors, of which sockets, threads) of process ``pid``, from /proc."""
    return usage(pid)[1:]


@pytest.mark.parametrize("path", ["same_host", "nixl"])
def test_link_unlink_cycles_leave_no_socket_fd_or_thread(path, monkeypatch):
    if path == "nixl":
        monkeypatch.setenv("TORCH_KVREG_SAME_HOST_COPY", "0")
    peer = Peer(1, env={"TORCH_KVREG_SAME_HOST_COPY": "0"} if path == "nixl" else None)
    try:
        source = peer.call("register", (2, 8, (4, 16), 0, True))
        want = peer.call("read", source)
        kv.initialize(2, options={"llm.SyncKvCacheWaitTime": "3000"})

        def cycle(mine):
            assert kv.link_clusters([peer.info])[0] == kv.LLMStatusCode.LLM_SUCCESS
            kv.pull_kv_blocks(kv.CacheIndex(1, source), mine, [0, 5], [1, 2], notify="pulled")
            kv.pull_kv_blocks_async(kv.CacheIndex(1, source), mine, [3], [4]).wait()
            assert kv.unlink_clusters([peer.info])[0] == kv.LLMStatusCode.LLM_SUCCESS
            engine = kv.remote.current_engine()  # nothing of the link is left: routes, leases, links
            assert not engine.routes.table and not engine.peer_leases.shared and not engine.links
            assert torch.equal(mine_tensors[0][1], want[0][0]) and torch.equal(mine_tensors[1][4], want[1][3])

        mine_tensors = [torch.zeros(8, 4, 16, dtype=torch.float16) for _ in range(2)]
        mine = kv.register_kv_cache(mine_tensors)
        for _ in range(3):  # warm-up: connections, threads and pools that live once per process
            cycle(mine)
        before = open_files(os.getpid()), open_files(peer.process.pid)
        cycles = 15
        for _ in range(cycles):
            cycle(mine)
        deadline = time.monotonic() + 3  # the last unlink's control connection closes meanwhile
        while True:
            after = open_files(os.getpid()), open_files(peer.process.pid)
            if all(a[1] <= b[1] for a, b in zip(after, before)) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for who, (fds0, sockets0, threads0), (fds1, sockets1, threads1) in zip(("decoder", "peer"), before, after):
            # every cycle used to leave one more UCX connection open in each process
            assert sockets1 <= sockets0, f"{who}: {sockets1 - sockets0} more sockets after {cycles} cycles"
            assert fds1 <= fds0 + 1, f"{who}: {fds1 - fds0} more fds after {cycles} cycles"
            assert threads1 <= threads0 + 1, f"{who}: {threads1 - threads0} more threads after {cycles} cycles"
        assert len(peer.call("notifications")) == 3 + cycles  # every notice arrived, once
    finally:
        kv.finalize()
        peer.close()


def test_a_notice_read_after_its_sender_unlinked_or_died_still_names_it():
    """Found by the chaos test: a decoder's notice read by the prefill after the decoder
    unlinked (or was killed) came with sender None: the sender was looked up among the
    links alive when notices were read."""
    peer = Peer(1)
    decoder = Peer(3, wait=True)
    try:
        source = peer.call("register", (2, 8, (4, 16), 0, True))
        kv.initialize(2, options={"llm.SyncKvCacheWaitTime": "3000"})
        mine = kv.register_kv_cache([torch.zeros(8, 4, 16, dtype=torch.float16) for _ in range(2)])
        assert kv.link_clusters([peer.info])[0] == kv.LLMStatusCode.LLM_SUCCESS
        kv.pull_kv_blocks(kv.CacheIndex(1, source), mine, [0], [1], notify="before unlink")
        assert kv.unlink_clusters([peer.info])[0] == kv.LLMStatusCode.LLM_SUCCESS
        # a second decoder process, killed right after its pull
        decoder.call("kv", ("link_clusters", ([peer.info],), {}))
        dst = decoder.call("register_zeros", (2, 8, (4, 16)))
        decoder.call("kv", ("pull_kv_blocks", (kv.CacheIndex(1, source), dst, [0], [1]), {"notify": "before kill"}))
        decoder.kill()
        time.sleep(0.5)  # the prefill notices the closed connections
        assert sorted(peer.call("notifications")) == [(2, b"before unlink"), (3, b"before kill")]
    finally:
        kv.finalize()
        decoder.kill()
        peer.close()


def test_vanished_peers_stay_listed_dead_but_bounded(monkeypatch):
    """Decoders that restart with a new cluster id each time (vLLM's connector does) leave a
    dead link each in the prefill; beyond MAX_DEAD_LINKS the oldest are forgotten, their NIXL
    agents removed, while the newest still fail at once with LLM_LINK_FAILED."""
    from torch_kvreg.remote import engine as engine_module

    monkeypatch.setattr(engine_module, "MAX_DEAD_LINKS", 2)
    kv.initialize(1, options={"llm.ListenIpInfo": "127.0.0.1:0", "llm.SyncKvCacheWaitTime": "2000"})
    decoders = [Peer(10 + i, wait=False) for i in range(4)]
    try:
        host, port = kv.listen_address().split(":")
        me = kv.ClusterInfo(1, host, int(port))
        shared = kv.RegisterCfg(remote_accessible=True)
        source = kv.register_kv_cache([torch.ones(8, 4, 16, dtype=torch.float16)], shared)
        engine = kv.remote.current_engine()
        agents = []
        for decoder in decoders:
            decoder.ready()
            assert decoder.call("kv", ("link_clusters", ([me],), {}))[0] == kv.LLMStatusCode.LLM_SUCCESS
            dst = decoder.call("register_zeros", (1, 8, (4, 16)))
            decoder.call("kv", ("pull_kv_blocks", (kv.CacheIndex(1, source.cache_id), dst, [0], [0]), {}))
            agents.append(engine.links[decoder.cluster_id].agent_name)
        for decoder in decoders:  # oldest first
            decoder.kill()
            time.sleep(0.2)
        deadline = time.monotonic() + 5
        while len(engine.links) > 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(engine.links) == [12, 13] and not any(link.alive for link in engine.links.values())
        assert [engine.agent.check_remote_metadata(name) for name in agents] == [False, False, True, True]
        mine = kv.register_kv_cache([torch.ones(8, 4, 16, dtype=torch.float16)], shared)
        with pytest.raises(kv.LLMException) as dead:
            kv.push_kv_blocks(mine, kv.CacheIndex(13, 1), [0], [0])
        assert dead.value.status_code == kv.LLMStatusCode.LLM_LINK_FAILED
        with pytest.raises(kv.LLMException) as forgotten:
            kv.push_kv_blocks(mine, kv.CacheIndex(10, 1), [0], [0])
        assert forgotten.value.status_code == kv.LLMStatusCode.LLM_NOT_YET_LINK
    finally:
        kv.finalize()
        for decoder in decoders:
            decoder.kill()
