"""Soak: what a long-running server lives with, bounded to about a minute in CI.

- Two processes, 60 cycles of link, blocking and async pulls and pushes with notices, unlink,
  and the decoder's cache unregistered and registered again over fresh tensors; every byte
  checked. After a warm-up, the resident memory, open fds and threads of BOTH processes do
  not grow, and neither do the engine's tables.
- 200 register/unregister cycles of a 240-tensor cache with NIXL registration, a peer
  pulling from it now and then: the same bounds.

The bounds: fds, sockets and threads may not grow at all once warm (each cycle ends where it
began). Resident memory may grow by at most RSS_SLACK_MIB over the measured cycles: the
allocator's arenas and Python's free lists settle well within that (under 0.1 MiB measured), while what
a leak per cycle would cost is far more: every cycle here registers fresh tensors of
CACHE_MIB MiB or more, so a registration, lease or tensor kept alive per cycle shows as
tens of MiB.
"""

import os
import time

import pytest
import torch

import torch_kvreg as kv

from remote_peer import Peer, usage

pytestmark = pytest.mark.skipif(not kv.remote.nixl_available(), reason="needs the nixl extra")

RSS_SLACK_MIB = 4
SUCCESS = kv.LLMStatusCode.LLM_SUCCESS


def settled(pids, before, within_s=3.0):
    """Usage of ``pids`` once the last cycle's connections have closed (or after ``within_s``)."""
    deadline = time.monotonic() + within_s
    while True:
        after = [usage(pid) for pid in pids]
        if all(a[1] <= b[1] and a[3] <= b[3] for a, b in zip(after, before)) or time.monotonic() > deadline:
            return after
        time.sleep(0.1)


def check_growth(names, before, after, cycles):
    for who, (rss0, fds0, sockets0, threads0), (rss1, fds1, sockets1, threads1) in zip(names, before, after):
        grew = f"rss {rss1 - rss0:+.2f} MiB, fds {fds1 - fds0:+d}, threads {threads1 - threads0:+d}"
        print(f"{who}: {cycles} cycles: {grew}")
        assert sockets1 <= sockets0, f"{who}: {sockets1 - sockets0} more sockets after {cycles} cycles"
        assert fds1 <= fds0, f"{who}: {fds1 - fds0} more fds after {cycles} cycles"
        assert threads1 <= threads0, f"{who}: {threads1 - threads0} more threads after {cycles} cycles"
        assert rss1 - rss0 < RSS_SLACK_MIB, f"{who}: resident memory grew {rss1 - rss0:.1f} MiB in {cycles} cycles"


def soak(cycle, warm_up, cycles, pids, names):
    """Runs ``cycle(n)`` ``warm_up`` times, then ``cycles`` times more, measured: neither the
    processes ``pids`` nor the engine's tables may grow over the measured ones."""
    for n in range(warm_up):
        cycle(n)
    before = [usage(pid) for pid in pids]
    tables = engine_tables()
    for n in range(warm_up, warm_up + cycles):
        cycle(n)
    check_growth(names, before, settled(pids, before), cycles)
    assert engine_tables() == tables


def engine_tables():
    """Sizes of the engine's per-cache and per-peer tables (none may grow with cycles), once
    the last transfers' leases have lingered and been given back."""
    engine = kv.remote.current_engine()
    deadline = time.monotonic() + 2
    while engine.peer_leases.shared and time.monotonic() < deadline:
        time.sleep(0.01)
    return {
        "in_flight": len(engine.holds.in_flight),
        "nixl_regs": len(engine.registrations.regs),
        "local_preps": len(engine.registrations.preps),
        "leases": len(engine.holds.leases),
        "shared_leases": len(engine.peer_leases.shared),
        "links": len(engine.links),
        "connections": len(engine.connections),
        "routes": len(engine.routes.table),
        "senders": len(engine.senders),
    }


@pytest.mark.parametrize("path", ["same_host", "nixl"])
def test_soak_link_transfer_unlink_reregister(path, monkeypatch):
    env = {"TORCH_KVREG_SAME_HOST_COPY": "0"} if path == "nixl" else None
    if env:
        monkeypatch.setenv("TORCH_KVREG_SAME_HOST_COPY", "0")
    blocks, block_shape = 64, (16, 8, 64)  # 16 KiB blocks: 1 MiB per tensor, CACHE_MIB 2 per cache
    peer = Peer(1, env=env)
    try:
        source = peer.call("register", (2, blocks, block_shape, 0, True))
        inbox = peer.call("register_zeros", (2, blocks, block_shape))
        want = peer.call("read", source)
        kv.initialize(2, options={"llm.SyncKvCacheWaitTime": "3000"})
        gen = torch.Generator().manual_seed(5)
        counts = {"pulled": 0, "pushed": 0, "reregistered": 0}

        def cycle(n):
            mine = [torch.zeros(blocks, *block_shape, dtype=torch.float16) for _ in range(2)]
            cache = kv.register_kv_cache(mine)  # fresh tensors each cycle: a leaked cache shows
            counts["reregistered"] += 1
            assert kv.link_clusters([peer.info])[0] == SUCCESS
            src = torch.randperm(blocks, generator=gen)[:6].tolist()
            dst = torch.randperm(blocks, generator=gen)[:6].tolist()
            kv.pull_kv_blocks(kv.CacheIndex(1, source), cache, src[:3], dst[:3], notify=f"pull {n}")
            kv.pull_kv_blocks_async(kv.CacheIndex(1, source), cache, src[3:], dst[3:], notify=f"apull {n}").wait()
            for t, w in zip(mine, want):
                assert torch.equal(t[dst], w[src]), f"cycle {n}: pulled blocks differ"
            counts["pulled"] += 6
            for t in mine:  # something of this cycle's own to push back
                t[dst] = torch.randn(6, *block_shape, generator=gen).half()
            kv.push_kv_blocks(cache, kv.CacheIndex(1, inbox), dst[:3], src[:3], notify=f"push {n}")
            kv.push_kv_blocks_async(cache, kv.CacheIndex(1, inbox), dst[3:], src[3:], notify=f"apush {n}").wait()
            landed = peer.call("read_blocks", (inbox, src))
            for t, got in zip(mine, landed):
                assert got == t[dst].numpy().tobytes(), f"cycle {n}: pushed blocks differ"
            counts["pushed"] += 6
            assert kv.unlink_clusters([peer.info])[0] == SUCCESS
            kv.unregister_kv_cache(cache)

        warm_up, cycles = 8, 60
        soak(cycle, warm_up, cycles, (os.getpid(), peer.process.pid), ("decoder", "prefill"))
        assert counts == {"pulled": 6 * (warm_up + cycles), "pushed": 6 * (warm_up + cycles), "reregistered": 68}
        notices = peer.call("notifications")
        assert len(notices) == 4 * (warm_up + cycles) and {c for c, _ in notices} == {2}
        assert peer.settled_leases() == {}
    finally:
        kv.finalize()
        peer.close()


def test_soak_register_unregister_240_tensors_with_nixl():
    tensors_per_cache, blocks, block_shape = 240, 4, (8, 64)  # 4 KiB per tensor: ~1 MiB a cache
    peer = Peer(1)
    try:
        kv.initialize(2, options={"llm.ListenIpInfo": "127.0.0.1:0", "llm.SyncKvCacheWaitTime": "3000"})
        host, port = kv.listen_address().split(":")
        me = kv.ClusterInfo(2, host, int(port))
        assert peer.call("kv", ("link_clusters", ([me],), {}))[0] == SUCCESS
        inbox = peer.call("register_zeros", (tensors_per_cache, blocks, block_shape))
        engine = kv.remote.current_engine()
        pulls = 0

        def cycle(n):
            nonlocal pulls
            # every tensor and block of every cycle differs from the one before
            rows = torch.arange(blocks, dtype=torch.float16).view(blocks, 1, 1) * 8
            tensors = [torch.full((blocks, *block_shape), (n + i) % 7, dtype=torch.float16) + rows for i in range(240)]
            cache = kv.register_kv_cache(tensors, kv.RegisterCfg(remote_accessible=True))
            assert cache.cache_id in engine.registrations.regs  # registered with NIXL, not only here
            if n % 25 == 0:  # the peer reads it: the registration works end to end
                index = kv.CacheIndex(2, cache.cache_id)
                peer.call("kv", ("pull_kv_blocks", (index, inbox, [n % blocks], [0]), {}))
                got = peer.call("read_blocks", (inbox, [0]))
                assert all(g == t[n % blocks].numpy().tobytes() for g, t in zip(got, tensors))
                pulls += 1
            kv.unregister_kv_cache(cache)
            assert cache.cache_id not in engine.registrations.regs

        warm_up, cycles = 20, 200
        soak(cycle, warm_up, cycles, (os.getpid(), peer.process.pid), ("owner", "reader"))
        assert pulls == (warm_up + cycles) // 25 + 1
        assert peer.call("kv", ("unlink_clusters", ([me],), {}))[0] == SUCCESS
    finally:
        kv.finalize()
        peer.close()
