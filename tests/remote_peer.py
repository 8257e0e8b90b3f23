"""A torch_kvreg process driven by a test through queues (a prompt or decode peer),
optionally inside a network namespace (tests/netns.py) with its own environment."""

import contextlib
import multiprocessing as mp
import time

import torch

CTX = mp.get_context("spawn")


def paged(num_tensors, num_blocks, block_shape, seed, dtype=torch.float16):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(num_blocks, *block_shape, generator=gen).to(dtype) for _ in range(num_tensors)]


def usage(pid):
    """(resident MiB, open fds, of which sockets, threads) of process ``pid``, from /proc."""
    import os

    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    fds = sockets = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        fds += 1
        sockets += target.startswith("socket:")
    return int(status["VmRSS"].split()[0]) / 1024, fds, sockets, int(status["Threads"])


CLONE_NEWNET = 0x40000000


def enter_netns(name):
    """Moves this (still single-threaded) process into network namespace ``name``."""
    import ctypes
    import os

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name} failed")
    finally:
        os.close(fd)
    remount_sysfs(libc, name)


def remount_sysfs(libc, name):
    """What ``ip netns exec`` does too: a private mount namespace with /sys remounted, so
    that /sys/class/net (where UCX looks for devices) shows this namespace's interfaces."""
    import ctypes

    CLONE_NEWNS, MS_REC, MS_SLAVE, MNT_DETACH = 0x00020000, 0x4000, 0x80000, 2
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) failed")
    if libc.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None) != 0:
        raise OSError(ctypes.get_errno(), "making / a slave mount failed")
    libc.umount2(b"/sys", MNT_DETACH)
    if libc.mount(name.encode(), b"/sys", b"sysfs", 0, None) != 0:
        raise OSError(ctypes.get_errno(), "mounting sysfs failed")


def peer_main(commands, replies, cluster_id, wait_ms=2000, options=None, netns=None, env=None):
    import os

    if netns is not None:
        enter_netns(netns)
    os.environ.update(env or {})
    import torch_kvreg as kv

    options = {"llm.ListenIpInfo": "127.0.0.1:0", "llm.SyncKvCacheWaitTime": str(wait_ms), **(options or {})}
    transfers = {}
    try:
        kv.initialize(cluster_id=cluster_id, role=kv.LlmRole.PROMPT, options=options)
    except Exception as exc:
        replies.put(("error", repr(exc)))
        return
    caches = {}
    workers = {}  # vLLM connector producer workers by cache id
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
            elif op == "allocate":  # allocate_kv_cache filled like "register"; remote: True, False or None
                num_tensors, num_blocks, block_shape, seed, remote = args
                cache, tensors = kv.allocate_kv_cache(
                    num_tensors, (num_blocks, *block_shape), torch.float16, kv.RegisterCfg(remote_accessible=remote)
                )
                for tensor, values in zip(tensors, paged(num_tensors, num_blocks, block_shape, seed)):
                    tensor.copy_(values)
                caches[cache.cache_id] = tensors
                replies.put(("ok", cache.cache_id))
            elif op == "forget":  # drops this process's reference to a cache's tensors
                del caches[args]
                replies.put(("ok", None))
            elif op == "register_keyed":  # remotely reachable, with cache keys
                num_tensors, num_blocks, block_shape, seed, keys = args
                tensors = paged(num_tensors, num_blocks, block_shape, seed)
                cache = kv.register_kv_cache(tensors, kv.RegisterCfg(remote_accessible=True), keys=keys)
                caches[cache.cache_id] = tensors
                replies.put(("ok", cache.cache_id))
            elif op == "notifications":  # (cluster id, message) pairs received so far
                replies.put(("ok", [tuple(n) for n in kv.get_notifications()]))
            elif op == "leases":  # leases peers hold on this process's caches
                replies.put(("ok", dict(kv.remote.current_engine().holds.leases)))
            elif op == "linked":  # the clusters this process counts as linked (links alive)
                links = kv.remote.current_engine().links
                replies.put(("ok", sorted(cluster for cluster, link in links.items() if link.alive)))
            elif op == "read":
                replies.put(("ok", [t.clone() for t in caches[args]]))
            elif op == "read_blocks":  # (cache id, blocks) -> each tensor's blocks as bytes
                # plain bytes: a tensor in the reply would travel through shared memory that
                # torch's multiprocessing keeps mapped here (a soak test measures this process)
                cache_id, blocks = args
                replies.put(("ok", [t[blocks].numpy().tobytes() for t in caches[cache_id]]))
            elif op == "register_zeros":  # (num_tensors, num_blocks, block_shape): a destination
                num_tensors, num_blocks, block_shape = args
                tensors = [torch.zeros(num_blocks, *block_shape, dtype=torch.float16) for _ in range(num_tensors)]
                cache = kv.register_kv_cache(tensors, kv.RegisterCfg(remote_accessible=True))
                caches[cache.cache_id] = tensors
                replies.put(("ok", cache.cache_id))
            elif op == "unregister":
                kv.unregister_kv_cache(args)
                replies.put(("ok", None))
            elif op == "kv":  # any torch_kvreg function: (name, args, kwargs) -> its result
                name, call_args, call_kwargs = args
                replies.put(("ok", getattr(kv, name)(*call_args, **call_kwargs)))
            elif op == "cache":  # the Cache of one of this process's cache ids
                replies.put(("ok", kv.get_cache(args)))
            elif op == "start_pull":  # (src CacheIndex, dst cache id, src blocks, dst blocks) -> handle
                transfer = kv.pull_kv_blocks_async(*args)
                transfers[id(transfer)] = transfer
                replies.put(("ok", id(transfer)))
            elif op == "wait":  # (handle, timeout ms) -> ("ok", bytes) or (status name, seconds waited)
                transfer = transfers.pop(args[0])
                try:
                    replies.put(("ok", ("ok", transfer.wait(args[1]))))
                except kv.LLMException as exc:
                    replies.put(("ok", (exc.status_code.name, transfer.elapsed_s)))
            elif op == "verify_hook":  # (kind, cache id, block) or None: torch_kvreg.verify's hooks
                set_verify_hook(caches, args)
                replies.put(("ok", None))
            elif op == "vllm_producer":  # (layer tensors, block size, tp size, tp rank) -> its ProducerAddress
                from torch_kvreg.vllm.settings import ConnectorSettings
                from torch_kvreg.vllm.worker import WorkerSide

                layers, block_size, tp_size, tp_rank = args
                worker = WorkerSide(
                    ConnectorSettings(),
                    producer=True,
                    consumer=False,
                    block_size=block_size,
                    tp_size=tp_size,
                    tp_rank=tp_rank,
                )
                address = worker.register({f"model.layers.{i}.self_attn.attn": t for i, t in enumerate(layers)})
                workers[address.cache_id] = worker
                caches[address.cache_id] = layers
                replies.put(("ok", address))
            elif op == "vllm_finished":  # (cache id, sends to add) -> requests whose blocks were read
                worker = workers[args[0]]
                worker.add_sends(args[1])
                replies.put(("ok", worker.finished()[0]))
            elif op == "exit":
                kv.finalize()
                replies.put(("ok", None))
                return
        except Exception as exc:  # reported to the test
            replies.put(("error", repr(exc)))


def flip_byte(tensors, block):
    """Flips one bit of block ``block`` of the first tensor, in place."""
    tensors[0][block].view(torch.uint8).view(-1)[0] ^= 1


def set_verify_hook(caches, args):
    """Clears torch_kvreg.verify's test hooks, then (``args``: (kind, cache id, block))
    flips a bit of that block where ``kind`` says: "source" once its CRC is taken for a
    transfer (the owner overwrites it before it moves), "landed" once a transfer's bytes
    landed there, before their CRC is taken (corrupted in flight)."""
    from torch_kvreg import verify

    verify.source_checksummed = verify.landing_checked = None
    if args is None:
        return
    kind, cache_id, block = args

    def hook(hooked_id, blocks):
        if hooked_id == cache_id and block in blocks:
            flip_byte(caches[cache_id], block)

    if kind == "source":
        verify.source_checksummed = hook
    else:
        assert kind == "landed", kind
        verify.landing_checked = hook


class Peer:
    """A peer process listening on 127.0.0.1; ``call(op, args)`` runs one command there."""

    def __init__(self, cluster_id, wait_ms=2000, options=None, netns=None, env=None, wait=True):
        self.cluster_id = cluster_id
        self.commands, self.replies = CTX.Queue(), CTX.Queue()
        self.process = CTX.Process(
            target=peer_main, args=(self.commands, self.replies, cluster_id, wait_ms, options, netns, env)
        )
        self.process.start()
        if wait:
            self.ready()

    def ready(self):
        """Waits until the process listens (Peer(..., wait=False) starts several at once)."""
        status, address = self.replies.get(timeout=300)
        assert status == "ready", address
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

    def settled_leases(self, within_s: float = 2.0):
        """The leases peers hold on this process's caches once the unused ones have been
        given back (a peer keeps a lease LEASE_LINGER_S after its last transfer); whatever
        is still held after ``within_s``."""
        deadline = time.monotonic() + within_s
        while True:
            leases = self.call("leases")
            if not leases or time.monotonic() > deadline:
                return leases
            time.sleep(0.01)

    def close(self):
        if self.process.is_alive():
            self.call("exit")
        self.process.join(timeout=30)

    def kill(self):
        """Ends the process at once (SIGKILL): no bye, no finalize."""
        self.process.kill()
        self.process.join(timeout=30)


@contextlib.contextmanager
def running_peer(cluster_id, **kwargs):
    """A Peer for a module's tests, closed at the end; the tests skip without the nixl extra."""
    import pytest

    import torch_kvreg as kv

    if not kv.remote.nixl_available():
        pytest.skip("needs the nixl extra")
    peer = Peer(cluster_id, **kwargs)
    try:
        yield peer
    finally:
        peer.close()


@contextlib.contextmanager
def linked_to(peer, cluster_id=2, wait_ms=1000):
    """This process initialized as ``cluster_id`` and linked to ``peer``; finalized after."""
    import torch_kvreg as kv

    kv.initialize(cluster_id=cluster_id, options={"llm.SyncKvCacheWaitTime": str(wait_ms)})
    try:
        assert kv.link_clusters([peer.info])[0] == kv.LLMStatusCode.LLM_SUCCESS
        yield
    finally:
        kv.finalize()
