"""8 threads of random register / unregister / copy_kv_blocks; finalize during a transfer."""

import collections
import random
import threading
import time

import pytest
import torch

import torch_kvreg as kv

THREADS, OPS_PER_THREAD = 8, 2500


def test_stress_register_unregister_copy():
    kv.initialize(limits=kv.Limits(max_addrs=240, max_device_bytes=0, max_host_bytes=2**30))
    a_tensors = [torch.randn(32, 64) for _ in range(2)]
    b_tensors = [torch.zeros(32, 64) for _ in range(2)]
    shared_a, shared_b = kv.register_kv_cache(a_tensors), kv.register_kv_cache(b_tensors)
    shared_blocks = [set() for _ in range(THREADS)]
    counts = [collections.Counter() for _ in range(THREADS)]
    errors = []
    start = threading.Barrier(THREADS)

    def worker(index):
        rng = random.Random(index)
        pool = [[torch.randn(16, 64) for _ in range(2)] for _ in range(6)]
        live = {}  # slot -> cache id
        try:
            start.wait()
            for _ in range(OPS_PER_THREAD):
                roll = rng.random()
                free = [s for s in range(len(pool)) if s not in live]
                if roll < 0.3 and free:
                    slot = rng.choice(free)
                    live[slot] = int(torch.ops.llm.register_kv_cache(pool[slot]))
                    counts[index]["register"] += 1
                elif roll < 0.55 and live:
                    slot = rng.choice(list(live))
                    torch.ops.llm.unregister_kv_cache(live.pop(slot))
                    counts[index]["unregister"] += 1
                elif roll < 0.8 and len(live) >= 2:
                    s, d = rng.sample(list(live), 2)
                    src_blocks = rng.sample(range(16), 4)
                    dst_blocks = rng.sample(range(16), 4)
                    kv.copy_kv_blocks(live[s], live[d], src_blocks, dst_blocks)
                    for t in range(2):
                        assert torch.equal(pool[d][t][dst_blocks], pool[s][t][src_blocks])
                    counts[index]["own_copy"] += 1
                else:
                    blocks = rng.sample(range(32), 3)
                    shared_blocks[index].update(blocks)
                    kv.copy_kv_blocks(shared_a, shared_b, blocks, blocks)
                    counts[index]["shared_copy"] += 1
            for cache_id in live.values():
                torch.ops.llm.unregister_kv_cache(cache_id)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert errors == []
    # Every thread reached every kind of call, often: a change to the mix that starves one
    # (say, pools too small for two live caches) fails here.
    for per_thread in counts:
        assert all(per_thread[kind] >= 200 for kind in ("register", "unregister", "own_copy", "shared_copy")), (
            per_thread
        )
    assert sum(c["shared_copy"] for c in counts) >= 2_000
    copied = sorted(set().union(*shared_blocks))
    assert len(copied) > 16
    for a_tensor, b_tensor in zip(a_tensors, b_tensors):
        assert torch.equal(b_tensor[copied], a_tensor[copied])
        untouched = [i for i in range(32) if i not in copied]
        assert not b_tensor[untouched].any()
    usage = kv.usage()
    assert (usage.num_caches, usage.num_addrs) == (2, 4)
    assert usage.host_bytes == 4 * 32 * 64 * 4
    assert time.monotonic() - began < 300


def test_finalize_waits_for_a_transfer_and_refuses_new_ones():
    """Deterministic: a transfer in flight (held the way a copy or a remote peer holds its
    caches) makes finalize wait; a copy that arrives meanwhile is refused before any byte
    moves; finalize completes once the transfer ends."""
    kv.initialize()
    src = [torch.randn(8, 64) for _ in range(2)]
    dst = [torch.zeros(8, 64) for _ in range(2)]
    a, b = kv.register_kv_cache(src), kv.register_kv_cache(dst)
    kv._C.hold(a.cache_id)
    finisher = threading.Thread(target=kv.finalize)
    finisher.start()
    time.sleep(0.2)
    assert finisher.is_alive()  # waiting for the transfer
    assert not kv.is_initialized()  # but closed to new work
    with pytest.raises(kv.LLMException) as info:
        kv.copy_kv_blocks(a, b, [0, 1], [2, 3])
    assert info.value.status_code == kv.LLMStatusCode.LLM_FAILED
    assert all(not d.any() for d in dst)
    assert kv.usage().num_caches == 2  # nothing released under the transfer
    kv._C.unhold(a.cache_id)
    finisher.join(timeout=30)
    assert not finisher.is_alive()
    assert kv.usage() == kv.Usage(0, 0, 0, 0)


def test_finalize_racing_a_copy_is_safe():
    """Not deterministic (see the test above for that): finalize at varying moments of a
    64 MiB copy; whichever comes first, the copy either completed or moved nothing."""
    for attempt in range(5):
        kv.initialize()
        src = [torch.randn(64, 1 << 16) for _ in range(4)]  # 64 MiB in all
        dst = [torch.zeros(64, 1 << 16) for _ in range(4)]
        a, b = kv.register_kv_cache(src), kv.register_kv_cache(dst)
        outcome = []

        def copy(a=a, b=b, outcome=outcome):
            try:
                kv.copy_kv_blocks(a, b, list(range(64)), list(range(64)))
                outcome.append("done")
            except kv.LLMException as exc:
                outcome.append(exc.status_code)

        thread = threading.Thread(target=copy)
        thread.start()
        time.sleep(0.001 * attempt)
        kv.finalize()
        thread.join(timeout=60)
        assert outcome in (["done"], [kv.LLMStatusCode.LLM_FAILED], [kv.LLMStatusCode.LLM_KV_CACHE_NOT_EXIST])
        if outcome == ["done"]:
            assert all(torch.equal(s, d) for s, d in zip(src, dst))  # finalize waited for it
        else:
            assert all(not d.any() for d in dst)  # refused before any byte moved
        assert kv.usage() == kv.Usage(0, 0, 0, 0)
