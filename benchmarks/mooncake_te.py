"""Mooncake's transfer engine as a column of bench_remote.py: the same caches (tensors of
the same shape and values), the same blocks read, by Mooncake's Python API
(``mooncake.engine.TransferEngine``) with its TCP transport and P2P handshake metadata (no
metadata server): a target process registers its tensors, a reader process registers its
own and reads the blocks with ``batch_transfer_sync_read``, one descriptor per block (and,
for consecutive blocks, one per tensor run too), at most MAX_BATCH per call.

Mooncake's TCP transport listens on every address of its network namespace whatever
address it is given, so both processes always run inside namespaces this benchmark makes:
"same host" is one namespace (loopback), --netns the prompt side's namespace and the
decoder side's (TCP over the veth pair). Installed by the ``bench`` extra
(``pip install -e .[bench]``: mooncake-transfer-engine-non-cuda); the wheel's engine links
libibverbs even for TCP (Debian: the libibverbs1 package).
"""

import os
import socket
import statistics
import sys
import tempfile
import time

import torch

# The most reads one batch_transfer_sync_read takes here: with 4096 or more 32 KiB reads in
# one batch it returns -1 at once, its log saying "TCP lane queue-full rejection count: 128"
# and on (0.3.13.post1; benchmarks/RESULTS.md); longer lists go in batches one after another.
MAX_BATCH = 2048

TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")


def unavailable():
    """None when Mooncake's engine imports here, else why not (the import's own error)."""
    try:
        from mooncake.engine import TransferEngine  # noqa: F401  (the bench extra)
    except Exception as exc:  # ImportError, or a missing shared library behind it
        return f"mooncake.engine does not import: {type(exc).__name__}: {exc}"
    return None


def _enter(netns):
    """Into namespace ``netns`` (None: stay), with stderr sent to a log file: Mooncake logs
    every engine and connection on stderr (glog, before InitGoogleLogging, which no GLOG_
    variable quiets); a failure quotes the log's end."""
    log = tempfile.NamedTemporaryFile(prefix="mooncake-bench-", suffix=".log", delete=False)
    os.dup2(log.fileno(), 2)
    if netns is not None:
        sys.path.insert(0, TESTS)
        from remote_peer import enter_netns

        enter_netns(netns)
    return log.name


def _failure(exc, log):
    tail = ""
    if log is not None:
        with open(log) as f:
            tail = f.read()[-600:]
        os.unlink(log)
    return f"{type(exc).__name__}: {exc}" + (f" (its log ends: {tail.strip()!r})" if tail.strip() else "")


def _engine(host):
    from mooncake.engine import TransferEngine

    engine = TransferEngine()
    rc = engine.initialize(host, "P2PHANDSHAKE", "tcp", "")
    if rc != 0:
        raise RuntimeError(f"TransferEngine.initialize({host!r}, 'P2PHANDSHAKE', 'tcp') returned {rc}")
    return engine


def _tensors(num_tensors, shape, fill):
    return [torch.full(shape, float(fill + i % 7), dtype=torch.float16) for i in range(num_tensors)]


def _register(engine, tensors):
    for t in tensors:
        rc = engine.register_memory(t.data_ptr(), t.numel() * t.element_size())
        if rc != 0:
            raise RuntimeError(f"TransferEngine.register_memory returned {rc}")


def _own_address(peer_host):
    """This namespace's address on the route to ``peer_host`` (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((peer_host, 9))
        return s.getsockname()[0]


def target_process(netns, host, num_tensors, shape, fill, to_main, from_main):
    log = None
    try:
        log = _enter(netns)
        engine = _engine(host)
        tensors = _tensors(num_tensors, shape, fill)
        _register(engine, tensors)
        to_main.put(("ok", f"{host}:{engine.get_rpc_port()}", [t.data_ptr() for t in tensors]))
    except Exception as exc:
        to_main.put(("error", _failure(exc, log), None))
        return
    from_main.get()
    os.unlink(log)


def reader_process(netns, target, remote_addrs, shape, patterns, repeats, to_main):
    """Reads ``patterns`` ({name: (src_blocks, dst_blocks)}) from ``target`` ("host:port");
    puts ("ok", results) or ("error", text)."""
    log = None
    try:
        log = _enter(netns)
        engine = _engine(_own_address(target.split(":")[0]))
        tensors = _tensors(len(remote_addrs), shape, 100)  # written before it is read into
        _register(engine, tensors)
        block_nbytes = tensors[0][0].numel() * tensors[0].element_size()
        local_addrs = [t.data_ptr() for t in tensors]

        def read(buffers, peers, lengths):
            for i in range(0, len(buffers), MAX_BATCH):
                rc = engine.batch_transfer_sync_read(
                    target, buffers[i : i + MAX_BATCH], peers[i : i + MAX_BATCH], lengths[i : i + MAX_BATCH]
                )
                if rc != 0:
                    raise RuntimeError(f"batch_transfer_sync_read of {len(buffers[i : i + MAX_BATCH])} returned {rc}")

        start = time.perf_counter()
        read([local_addrs[0]], [remote_addrs[0]], [block_nbytes])  # the handshake with the target
        first_ms = (time.perf_counter() - start) * 1e3
        results = {"first_read_ms": first_ms}
        for name, (src_blocks, dst_blocks) in patterns.items():
            variants = {
                "per_block": (
                    [a + d * block_nbytes for a in local_addrs for d in dst_blocks],
                    [a + s * block_nbytes for a in remote_addrs for s in src_blocks],
                    [block_nbytes] * (len(local_addrs) * len(src_blocks)),
                )
            }
            if name == "consecutive":
                run = len(src_blocks) * block_nbytes
                variants["coalesced"] = (
                    [a + dst_blocks[0] * block_nbytes for a in local_addrs],
                    [a + src_blocks[0] * block_nbytes for a in remote_addrs],
                    [run] * len(local_addrs),
                )
            times = {v: [] for v in variants}
            expected = _tensors(len(tensors), shape[1:], 1)
            for args in variants.values():
                read(*args)  # warm-up
            for _ in range(repeats):
                for v, args in variants.items():
                    for t in tensors:
                        t[dst_blocks[-1]] = -1.0  # what is found here after the read, it moved
                    start = time.perf_counter()
                    read(*args)
                    times[v].append(time.perf_counter() - start)
                    if not all(torch.equal(t[dst_blocks[-1]], e) for t, e in zip(tensors, expected)):
                        raise RuntimeError(f"Mooncake's {v} read of {name} blocks moved the wrong bytes")
            results[name] = {v: statistics.median(ts) for v, ts in times.items()}
        to_main.put(("ok", results))
        os.unlink(log)
    except Exception as exc:
        to_main.put(("error", _failure(exc, log)))


def measure(num_tensors, shape, patterns, repeats, target_netns=None, target_host="127.0.0.1", reader_netns=None):
    """Runs the target and the reader (in the namespaces given; None: this process's) and
    returns ({pattern: {variant: median seconds}, "first_read_ms": ...}, None), or (None,
    why) when Mooncake cannot run here."""
    import multiprocessing as mp

    why = unavailable()
    if why is not None:
        return None, why
    ctx = mp.get_context("spawn")
    to_main, from_main = ctx.Queue(), ctx.Queue()
    target = ctx.Process(
        target=target_process,
        args=(target_netns, target_host, num_tensors, shape, 1, to_main, from_main),
        daemon=True,
    )
    target.start()
    try:
        status, address, remote_addrs = to_main.get(timeout=300)
        if status != "ok":
            return None, f"the target failed: {address}"
        reader = ctx.Process(
            target=reader_process,
            args=(reader_netns, address, remote_addrs, shape, patterns, repeats, to_main),
            daemon=True,
        )
        reader.start()
        status, results = to_main.get(timeout=1800)
        reader.join(timeout=60)
        return (results, None) if status == "ok" else (None, f"the reader failed: {results}")
    finally:
        from_main.put("done")
        target.join(timeout=60)
        if target.is_alive():
            target.kill()


def measure_in_own_namespace(num_tensors, shape, patterns, repeats):
    """``measure`` with target and reader in one network namespace made for it (loopback),
    so that Mooncake's listeners stay off this host's interfaces."""
    why = unavailable()
    if why is not None:
        return None, why
    sys.path.insert(0, TESTS)
    import netns

    why = netns.available()
    if why is not None:
        return None, f"Mooncake listens on every address, so it runs only in a namespace of its own: {why}"
    pair = netns.NetnsPair().up()
    try:
        return measure(num_tensors, shape, patterns, repeats, pair.a, "127.0.0.1", pair.a)
    finally:
        pair.down()
