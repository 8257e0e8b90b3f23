"""A torch_kvreg process driven by a test through queues (a prompt or decode peer)."""

import multiprocessing as mp

import torch

CTX = mp.get_context("spawn")


def paged(num_tensors, num_blocks, block_shape, seed, dtype=torch.float16):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(num_blocks, *block_shape, generator=gen).to(dtype) for _ in range(num_tensors)]


def peer_main(commands, replies, cluster_id, wait_ms=2000):
    import torch_kvreg as kv

    kv.initialize(cluster_id=cluster_id, role=kv.LlmRole.PROMPT,
                  options={"llm.ListenIpInfo": "127.0.0.1:0", "llm.SyncKvCacheWaitTime": str(wait_ms)})
    caches = {}
    replies.put(("ready", kv.listen_address()))
    while True:
        op, args = commands.get()
        try:
            if op == "register":
                num_tensors, num_blocks, block_shape, seed, remote = args  # remote: True, False or None
                tensors = paged(num_tensors, num_blocks, block_shape, seed)
                cache = kv.register_kv_cache(tensors, kv.RegisterCfg(remote_accessible=remote))
                caches[cache.cache_id] = tensors
                replies.put(("ok", cache.cache_id))
            elif op == "register_keyed":  # remotely reachable, with cache keys
                num_tensors, num_blocks, block_shape, seed, keys = args
                tensors = paged(num_tensors, num_blocks, block_shape, seed)
                cache = kv.register_kv_cache(tensors, kv.RegisterCfg(remote_accessible=True), keys=keys)
                caches[cache.cache_id] = tensors
                replies.put(("ok", cache.cache_id))
            elif op == "notifications":  # (cluster id, message) pairs received so far
                replies.put(("ok", [tuple(n) for n in kv.get_notifications()]))
            elif op == "leases":  # leases peers hold on this process's caches
                replies.put(("ok", dict(kv.remote._engine.leases)))
            elif op == "read":
                replies.put(("ok", [t.clone() for t in caches[args]]))
            elif op == "unregister":
                kv.unregister_kv_cache(args)
                replies.put(("ok", None))
            elif op == "exit":
                kv.finalize()
                replies.put(("ok", None))
                return
        except Exception as exc:  # reported to the test
            replies.put(("error", repr(exc)))


class Peer:
    """A peer process listening on 127.0.0.1; ``call(op, args)`` runs one command there."""

    def __init__(self, cluster_id, wait_ms=2000):
        self.cluster_id = cluster_id
        self.commands, self.replies = CTX.Queue(), CTX.Queue()
        self.process = CTX.Process(target=peer_main, args=(self.commands, self.replies, cluster_id, wait_ms))
        self.process.start()
        status, address = self.replies.get(timeout=120)
        assert status == "ready"
        host, port = address.split(":")
        self.host, self.port = host, int(port)

    @property
    def info(self):
        import torch_kvreg as kv

        return kv.ClusterInfo(self.cluster_id, self.host, self.port)

    def call(self, op, args=None):
        self.commands.put((op, args))
        status, value = self.replies.get(timeout=60)
        assert status == "ok", value
        return value

    def close(self):
        if self.process.is_alive():
            self.call("exit")
        self.process.join(timeout=30)
