"""Concurrent registration: the native registry is the only lock needed."""

import random
import threading

import torch

import torch_kvreg  # noqa: F401  (the kv fixture initializes it)

THREADS = 8
OPS_PER_THREAD = 600


def test_concurrent_register_unregister(kv):
    ids_seen = [[] for _ in range(THREADS)]
    kept = [[] for _ in range(THREADS)]
    errors = []
    start = threading.Barrier(THREADS)

    def worker(index):
        rng = random.Random(index)
        pool = [torch.zeros(4, 16) for _ in range(8)]  # private, disjoint memory
        live = {}
        try:
            start.wait()
            for _ in range(OPS_PER_THREAD):
                free = [i for i in range(len(pool)) if i not in live]
                if free and (not live or rng.random() < 0.6):
                    slot = rng.choice(free)
                    cache_id = int(torch.ops.llm.register_kv_cache([pool[slot]]))
                    live[slot] = cache_id
                    ids_seen[index].append(cache_id)
                else:
                    slot = rng.choice(list(live))
                    torch.ops.llm.unregister_kv_cache(live.pop(slot))
            kept[index] = [(pool[slot], cache_id) for slot, cache_id in live.items()]
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert errors == []
    all_ids = [i for ids in ids_seen for i in ids]
    assert len(all_ids) == len(set(all_ids)), "a cache id was handed out twice"
    survivors = [entry for entries in kept for entry in entries]
    usage = kv.usage()
    assert usage.num_caches == len(survivors) == usage.num_addrs
    assert usage.host_bytes == len(survivors) * 4 * 16 * 4
    registered = {c.cache_id: c.tensor_addrs[0] for c in kv.registered_caches()}
    assert registered == {cache_id: tensor.data_ptr() for tensor, cache_id in survivors}
    assert sum(len(ids) for ids in ids_seen) >= THREADS * OPS_PER_THREAD // 2
