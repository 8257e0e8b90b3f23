"""pull_kv_blocks and push_kv_blocks between two processes, against a raw NIXL agent pair, one run.

Caches: 32 layers x K and V, 1024 blocks of 16 tokens x 8 heads x 128 dims fp16 (32 KiB
per block per tensor, 2 GiB per process); 512 blocks pulled (1 GiB) and pushed back, random
and consecutive indices. On one host ours copies directly between the processes (same-host
copies; TORCH_KVREG_SAME_HOST_COPY=0 sends it through NIXL like the baseline); the output
says which route it took. Baselines in the same run and the same processes:
(a) a plain NIXL agent pair registering the same tensors (configured as ours: UCX, a
progress thread that pauses between polls; nixl-cu12's default busy-polling thread would
take a core from every measurement), with hand-made per-block
descriptors in prepared descriptor lists (make_prepped_xfer), and for consecutive blocks
also one descriptor per tensor run; (b) copy_kv_blocks moving the same blocks between two
caches of this process (the project's own local copy); (c) Mooncake's transfer engine (TCP,
P2P handshake) reading the same blocks between two processes of its own, after ours
(benchmarks/mooncake_te.py; the `bench` extra installs it; skipped, saying why, without it).

Caches that torch_kvreg allocates (allocate_kv_cache, shared memory) are measured too: a
peer on this host maps them, so its pulls and pushes are local copies. Rows "shared":
--shared-layers layers (8: 256 MiB of 32 KiB blocks moved), random and consecutive, pull and
push, each against copy_kv_blocks of the same blocks between two caches of this process.

    python benchmarks/bench_remote.py [--layers 32] [--repeats 5] [--no-mooncake] [--json out.json]

With --netns (root, Linux): the same over TCP between two network namespaces joined by a
veth pair (tests/netns.py), UCX forced onto TCP over it for ours and the raw pair alike:
the prompt process in one namespace, this one in the other.
"""

import argparse
import gc
import json
import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

import mooncake_te
from machine import cpu_model
from raw_nixl import block_indices, per_block_rows, reg_rows, wait

NUM_BLOCKS, MOVED, BLOCK_SHAPE = 1024, 512, (16, 8, 128)
SHARED_LAYERS = 8  # default of --shared-layers: 16 tensors x 512 blocks x 32 KiB = 256 MiB moved


def make_tensors(layers, fill):
    return [torch.full((NUM_BLOCKS, *BLOCK_SHAPE), float(fill + i % 7), dtype=torch.float16) for i in range(2 * layers)]


TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")


def prompt_process(layers, shared_layers, to_main, from_main, listen="127.0.0.1:0", netns=None):
    if netns is not None:
        sys.path.insert(0, TESTS)
        from remote_peer import enter_netns

        enter_netns(netns)
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    import torch_kvreg as kv
    from torch_kvreg.remote.agent import make_agent

    kv.initialize(1, kv.LlmRole.PROMPT, options={"llm.ListenIpInfo": listen, "llm.SyncKvCacheWaitTime": "30000"})
    tensors = make_tensors(layers, 1)
    cache = kv.register_kv_cache(tensors, kv.RegisterCfg(remote_accessible=True))
    shared, shared_tensors = kv.allocate_kv_cache(
        2 * shared_layers, (NUM_BLOCKS, *BLOCK_SHAPE), torch.float16, kv.RegisterCfg(remote_accessible=True)
    )
    for tensor, values in zip(shared_tensors, make_tensors(shared_layers, 1)):
        tensor.copy_(values)
    raw = make_agent("raw-prompt")
    raw.register_memory(reg_rows(tensors), "DRAM")
    gc.collect()  # (see main: a collection the set-up owes would land in the first link)
    to_main.put(
        (
            kv.listen_address(),
            cache.cache_id,
            raw.get_agent_metadata(),
            [t.data_ptr() for t in tensors],
            shared.cache_id,
        )
    )
    from_main.get()
    kv.finalize()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--shared-layers", type=int, default=SHARED_LAYERS)
    parser.add_argument("--json")
    parser.add_argument("--no-mooncake", action="store_true", help="leave out the Mooncake column")
    parser.add_argument("--netns", action="store_true", help="over TCP between two network namespaces (root)")
    parser.add_argument("--inside", help=argparse.SUPPRESS)  # "namespace,address" of the prompt side
    args = parser.parse_args()
    if args.netns:
        return run_across_namespaces()
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    import torch_kvreg as kv
    from torch_kvreg.remote.agent import make_agent

    ctx = mp.get_context("spawn")
    to_main, from_main = ctx.Queue(), ctx.Queue()
    prompt_netns, listen = args.inside.split(",") if args.inside else (None, "127.0.0.1:0")
    peer = ctx.Process(
        target=prompt_process, args=(args.layers, args.shared_layers, to_main, from_main, listen, prompt_netns)
    )
    peer.start()
    # A decoder starts as its prompt peers do: its initialize makes its NIXL agent in the
    # background (the "agent" phase of the first link waits for what is left of that).
    t0 = time.perf_counter()
    kv.initialize(2, kv.LlmRole.DECODER, options={"llm.SyncKvCacheWaitTime": "30000"})
    init_ms = (time.perf_counter() - t0) * 1e3
    address, remote_id, raw_md, remote_addrs, shared_id = to_main.get(timeout=600)
    host, port = address.split(":")
    # A full collection that the set-up (torch's objects, these tensors) owes takes 30-300
    # ms here and lands in whatever allocates next: without this, in the first link of
    # some runs, whichever its code.
    gc.collect()
    t0 = time.perf_counter()
    status, _ = kv.link_clusters([kv.ClusterInfo(1, host, int(port))])
    linked = time.perf_counter()
    link_ms = (linked - t0) * 1e3
    assert status == kv.LLMStatusCode.LLM_SUCCESS
    engine = kv.remote.current_engine()
    link_phases = getattr(engine, "link_phases", {}).get(1, {})  # where the first link's time went
    tensors = make_tensors(args.layers, 100)
    t0 = time.perf_counter()
    local = kv.register_kv_cache(tensors, kv.RegisterCfg(remote_accessible=True))  # NIXL-registered now
    register_ms = (time.perf_counter() - t0) * 1e3
    # The first pull right after the link (one block of every tensor): what a decoder pays
    # next, with whatever the link left running beside it.
    t0 = time.perf_counter()
    kv.pull_kv_blocks(kv.CacheIndex(1, remote_id), local, [0], [0])
    first_pull_ms = (time.perf_counter() - t0) * 1e3
    # A same-host link loads the peer's NIXL metadata after it returned, on a thread: what
    # that took, and when the link could take NIXL transfers (ms after link_clusters returned).
    load = getattr(engine.links[1], "nixl", None)
    background = None
    if load is not None and "nixl_metadata" not in link_phases and load.finished.wait(60):
        background = {**load.ms, "ready_after_link": (load.finished_at - linked) * 1e3}
    agent_ms = getattr(engine, "agent_ms", None)
    num_tensors = len(tensors)
    block_nbytes = local.cache_desc.block_nbytes
    total = MOVED * block_nbytes * num_tensors

    raw = make_agent("raw-decoder")
    raw.register_memory(reg_rows(tensors), "DRAM")
    remote_name = raw.add_remote_agent(raw_md)
    raw.make_connection(remote_name.decode() if isinstance(remote_name, bytes) else remote_name)

    local_prep = raw.prep_xfer_dlist(
        "NIXL_INIT_AGENT", per_block_rows([t.data_ptr() for t in tensors], NUM_BLOCKS, block_nbytes), "DRAM"
    )
    remote_prep = raw.prep_xfer_dlist(remote_name, per_block_rows(remote_addrs, NUM_BLOCKS, block_nbytes), "DRAM")

    def interleaved(variants):
        """Median seconds of each variant, run in turn so that machine noise hits all alike."""
        times = {name: [] for name in variants}
        for fn in variants.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        return {name: statistics.median(t) for name, t in times.items()}

    # The local baseline: copy_kv_blocks of the same blocks from another cache of this process.
    local_src = kv.register_kv_cache(make_tensors(args.layers, 1))
    rows = []
    rng = random.Random(0)
    patterns = {
        "random": (rng.sample(range(NUM_BLOCKS), MOVED), rng.sample(range(NUM_BLOCKS), MOVED)),
        "consecutive": (list(range(MOVED)), list(range(NUM_BLOCKS - MOVED, NUM_BLOCKS))),
    }
    for pattern, (src_blocks, dst_blocks) in patterns.items():
        # Pushes write back what the pulls read (local dst_blocks -> remote src_blocks), so
        # both sides keep the bytes the check below expects.
        variants = {
            "copy_kv_blocks": lambda: kv.copy_kv_blocks(local_src, local, src_blocks, dst_blocks),
            "pull_kv_blocks": lambda: kv.pull_kv_blocks(kv.CacheIndex(1, remote_id), local, src_blocks, dst_blocks),
            "push_kv_blocks": lambda: kv.push_kv_blocks(local, kv.CacheIndex(1, remote_id), dst_blocks, src_blocks),
            # verify=True: CRC-32C of every block on both sides, compared (torch_kvreg.verify)
            "pull_kv_blocks_verified": lambda: kv.pull_kv_blocks(
                kv.CacheIndex(1, remote_id), local, src_blocks, dst_blocks, verify=True
            ),
            "push_kv_blocks_verified": lambda: kv.push_kv_blocks(
                local, kv.CacheIndex(1, remote_id), dst_blocks, src_blocks, verify=True
            ),
        }
        src_idx = block_indices(num_tensors, NUM_BLOCKS, src_blocks)
        dst_idx = block_indices(num_tensors, NUM_BLOCKS, dst_blocks)

        def raw_prepped(operation):
            handle = raw.make_prepped_xfer(operation, local_prep, dst_idx, remote_prep, src_idx)
            wait(raw, handle)
            raw.release_xfer_handle(handle)

        variants["raw_nixl_per_block"] = lambda: raw_prepped("READ")
        variants["raw_nixl_per_block_write"] = lambda: raw_prepped("WRITE")
        if pattern == "consecutive":
            local_rows = np.array(
                [(t.data_ptr() + dst_blocks[0] * block_nbytes, MOVED * block_nbytes, 0) for t in tensors],
                dtype=np.uint64,
            )
            remote_rows = np.array(
                [(a + src_blocks[0] * block_nbytes, MOVED * block_nbytes, 0) for a in remote_addrs], dtype=np.uint64
            )

            def raw_coalesced(operation):
                handle = raw.initialize_xfer(
                    operation,
                    raw.get_xfer_descs(local_rows, "DRAM"),
                    raw.get_xfer_descs(remote_rows, "DRAM"),
                    remote_name,
                )
                wait(raw, handle)
                raw.release_xfer_handle(handle)

            variants["raw_nixl_coalesced"] = lambda: raw_coalesced("READ")
            variants["raw_nixl_coalesced_write"] = lambda: raw_coalesced("WRITE")
        measured = interleaved(variants)
        expected = torch.stack(
            [torch.full(BLOCK_SHAPE, float(1 + i % 7), dtype=torch.float16) for i in range(num_tensors)]
        )
        got = torch.stack([t[dst_blocks[-1]] for t in tensors])
        assert torch.equal(got, expected), "pulled the wrong bytes"
        gbps = {k: total / v / 1e9 for k, v in measured.items()}
        baseline = "raw_nixl_coalesced" if pattern == "consecutive" else "raw_nixl_per_block"
        rows.append(
            dict(
                pattern=pattern,
                bytes=total,
                gbps=gbps,
                ratio_vs_raw_nixl=gbps["pull_kv_blocks"] / gbps[baseline],
                push_ratio_vs_raw_nixl=gbps["push_kv_blocks"] / gbps[baseline + "_write"],
                raw_baseline=baseline,
                ratio_vs_copy_kv_blocks=gbps["pull_kv_blocks"] / gbps["copy_kv_blocks"],
                push_ratio_vs_copy_kv_blocks=gbps["push_kv_blocks"] / gbps["copy_kv_blocks"],
                # seconds verified / seconds unverified - 1, same run (the target: at most 0.15)
                verify_overhead_pull=measured["pull_kv_blocks_verified"] / measured["pull_kv_blocks"] - 1,
                verify_overhead_push=measured["push_kv_blocks_verified"] / measured["push_kv_blocks"] - 1,
            )
        )
    routes = dict(kv.remote.existing_engine().paths)
    kv_crc = kv._C.crc32c_implementation()
    kv.unregister_kv_cache(local_src)
    shared_rows, shared_routes = measure_shared(kv, shared_id, args.shared_layers, patterns, interleaved)
    kv.finalize()
    from_main.put("done")
    peer.join(timeout=60)
    mooncake = mooncake_column(args, prompt_netns, listen, num_tensors, patterns, total, rows)

    where = f"over TCP across network namespaces ({os.environ.get('UCX_TLS')})" if args.inside else "on one host"
    route = "same-host copies" if routes.get("same_host") else "NIXL"
    print(f"CPU: {cpu_model()}; {where}; ours went by {route} ({routes}); the baseline is raw NIXL over UCX")
    print(
        f"pull_kv_blocks and push_kv_blocks between two processes, {num_tensors} tensors x {MOVED} of "
        f"{NUM_BLOCKS} blocks of {block_nbytes // 1024} KiB ({total / 2**30:.2f} GiB), torch {torch.__version__}"
    )
    print(
        f"first link_clusters: {link_ms:.1f} ms; register_kv_cache ({num_tensors} tensors, with NIXL): "
        f"{register_ms:.1f} ms; then a first pull: {first_pull_ms:.1f} ms; initialize: {init_ms:.1f} ms"
        + ("" if agent_ms is None else f" (its NIXL agent, made in the background: {agent_ms:.1f} ms)")
    )
    if link_phases:
        phases = ", ".join(f"{name} {ms:.1f}" for name, ms in link_phases.items() if name != "total")
        print(f"first link, where the time went (ms): {phases}; total {link_phases['total']:.1f}")
    if background is not None:
        print(
            "  after it, on a thread: this side's NIXL metadata load "
            + ", ".join(f"{name} {ms:.1f}" for name, ms in background.items() if name != "ready_after_link")
            + f" ms; NIXL transfers possible {background['ready_after_link']:.1f} ms after link_clusters returned"
        )
    for r in rows:
        g = r["gbps"]
        extra = f", raw coalesced {g['raw_nixl_coalesced']:.2f}" if "raw_nixl_coalesced" in g else ""
        extra_write = f", raw coalesced {g['raw_nixl_coalesced_write']:.2f}" if "raw_nixl_coalesced" in g else ""
        print(
            f"{r['pattern']:<12} pull: ours {g['pull_kv_blocks']:.2f} GB/s | "
            f"raw per-block {g['raw_nixl_per_block']:.2f}{extra}"
            f" | copy_kv_blocks {g['copy_kv_blocks']:.2f} GB/s || ours / {r['raw_baseline']} = "
            f"{r['ratio_vs_raw_nixl']:.2f}x, ours / copy_kv_blocks = {r['ratio_vs_copy_kv_blocks']:.2f}x"
        )
        print(
            f"{'':<12} push: ours {g['push_kv_blocks']:.2f} GB/s | "
            f"raw per-block {g['raw_nixl_per_block_write']:.2f}{extra_write} || ours / {r['raw_baseline']}_write = "
            f"{r['push_ratio_vs_raw_nixl']:.2f}x, ours / copy_kv_blocks = {r['push_ratio_vs_copy_kv_blocks']:.2f}x"
        )
        print(
            f"{'':<12} verify=True: pull {g['pull_kv_blocks_verified']:.2f} GB/s "
            f"(+{r['verify_overhead_pull']:.0%} time), push {g['push_kv_blocks_verified']:.2f} GB/s "
            f"(+{r['verify_overhead_push']:.0%} time); CRC-32C by {kv_crc}"
        )
    print(
        f"allocate_kv_cache caches ({2 * args.shared_layers} tensors x {MOVED} of {NUM_BLOCKS} blocks of "
        f"{block_nbytes // 1024} KiB, {shared_rows[0]['bytes'] / 2**20:.0f} MiB moved), mapped by the peer "
        f"({shared_routes}); first pull (maps the cache) {shared_rows[0]['first_ms']:.1f} ms"
    )
    for r in shared_rows:
        g = r["gbps"]
        print(
            f"{'shared ' + r['pattern']:<19} pull {g['pull_kv_blocks']:.2f} GB/s, push {g['push_kv_blocks']:.2f} "
            f"GB/s | copy_kv_blocks {g['copy_kv_blocks']:.2f} GB/s || pull / copy_kv_blocks = "
            f"{r['pull_ratio_vs_copy_kv_blocks']:.2f}x, "
            f"push / copy_kv_blocks = {r['push_ratio_vs_copy_kv_blocks']:.2f}x"
        )
    print_mooncake(mooncake, rows)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {
                    "cpu": cpu_model(),
                    "path": where,
                    "routes": routes,
                    "link_ms": link_ms,
                    "link_phases_ms": link_phases,
                    "link_background_ms": background,
                    "initialize_ms": init_ms,
                    "agent_ms": agent_ms,
                    "register_ms": register_ms,
                    "first_pull_ms": first_pull_ms,
                    "rows": rows,
                    "shared_rows": shared_rows,
                    "shared_routes": shared_routes,
                    "mooncake": mooncake,
                },
                out,
                indent=2,
            )


def measure_shared(kv, shared_id, layers, patterns, interleaved):
    """Pulls and pushes between a cache of this process and the peer's allocate_kv_cache
    cache, and copy_kv_blocks of the same blocks between two caches of this process; the
    local caches are allocate_kv_cache's too. Returns the rows and the paths taken."""
    engine = kv.remote.existing_engine()
    before = dict(engine.paths)
    shape = (NUM_BLOCKS, *BLOCK_SHAPE)
    local, local_tensors = kv.allocate_kv_cache(2 * layers, shape, torch.float16)
    source, source_tensors = kv.allocate_kv_cache(2 * layers, shape, torch.float16)
    for tensor, values in zip(source_tensors, make_tensors(layers, 1)):
        tensor.copy_(values)
    remote = kv.CacheIndex(1, shared_id)
    total = MOVED * local.cache_desc.block_nbytes * local.cache_desc.num_tensors
    start = time.perf_counter()
    kv.pull_kv_blocks(remote, local, [0], [0])
    first_ms = (time.perf_counter() - start) * 1e3
    rows = []
    for pattern, (src_blocks, dst_blocks) in patterns.items():
        measured = interleaved(
            {
                "copy_kv_blocks": lambda: kv.copy_kv_blocks(source, local, src_blocks, dst_blocks),
                "pull_kv_blocks": lambda: kv.pull_kv_blocks(remote, local, src_blocks, dst_blocks),
                "push_kv_blocks": lambda: kv.push_kv_blocks(local, remote, dst_blocks, src_blocks),
            }
        )
        got = torch.stack([t[dst_blocks[-1]] for t in local_tensors])
        expected = torch.stack([t[src_blocks[-1]] for t in source_tensors])
        assert torch.equal(got, expected), "pulled the wrong bytes"
        gbps = {k: total / v / 1e9 for k, v in measured.items()}
        rows.append(
            dict(
                pattern=pattern,
                bytes=total,
                gbps=gbps,
                first_ms=first_ms,
                pull_ratio_vs_copy_kv_blocks=gbps["pull_kv_blocks"] / gbps["copy_kv_blocks"],
                push_ratio_vs_copy_kv_blocks=gbps["push_kv_blocks"] / gbps["copy_kv_blocks"],
            )
        )
    routes = {path: count - before.get(path, 0) for path, count in engine.paths.items() if count != before.get(path, 0)}
    kv.unregister_kv_cache(local)
    kv.unregister_kv_cache(source)
    return rows, routes


def mooncake_column(args, prompt_netns, listen, num_tensors, patterns, total, rows):
    """Mooncake's engine reading the same blocks (benchmarks/mooncake_te.py), after ours;
    adds its GB/s and ours / Mooncake to ``rows``. Returns what the JSON keeps of it."""
    if args.no_mooncake:
        return {"skipped": "--no-mooncake"}
    shape = (NUM_BLOCKS, *BLOCK_SHAPE)
    if args.inside:  # the prompt side's namespace and this one, over TCP between them
        where = "between the two namespaces"
        results, why = mooncake_te.measure(
            num_tensors, shape, patterns, args.repeats, prompt_netns, listen.split(":")[0]
        )
    else:
        where = "on one host, in a namespace of its own (loopback)"
        results, why = mooncake_te.measure_in_own_namespace(num_tensors, shape, patterns, args.repeats)
    if results is None:
        return {"skipped": why}
    for row in rows:
        measured = results[row["pattern"]]
        for variant, seconds in measured.items():
            row["gbps"][f"mooncake_{variant}"] = total / seconds / 1e9
        best = min(measured.values())
        row["ratio_vs_mooncake"] = row["gbps"]["pull_kv_blocks"] / (total / best / 1e9)
    return {"where": where, "first_read_ms": results["first_read_ms"]}


def print_mooncake(mooncake, rows):
    if "skipped" in mooncake:
        print(f"Mooncake transfer engine column skipped: {mooncake['skipped']}")
        return
    print(
        f"Mooncake transfer engine (TCP, P2P handshake; batch_transfer_sync_read of the same blocks) "
        f"{mooncake['where']}, measured after ours; first read (with its handshake) {mooncake['first_read_ms']:.1f} ms"
    )
    for r in rows:
        g = r["gbps"]
        extra = f", coalesced {g['mooncake_coalesced']:.2f}" if "mooncake_coalesced" in g else ""
        print(
            f"{r['pattern']:<12} Mooncake read: per-block {g['mooncake_per_block']:.2f} GB/s{extra} || "
            f"ours pull / Mooncake's best = {r['ratio_vs_mooncake']:.2f}x"
        )


def run_across_namespaces() -> None:
    """Makes the namespace pair, runs this benchmark with the decoder side in one and the
    prompt process in the other (--inside), and removes the pair whatever happens."""
    sys.path.insert(0, TESTS)
    import netns

    why = netns.available()
    if why is not None:
        raise SystemExit(f"--netns: {why}")
    pair = netns.NetnsPair().up()
    try:
        rest = [a for a in sys.argv[1:] if a != "--netns"]
        env = {**os.environ, "UCX_TLS": "tcp", "UCX_NET_DEVICES": f"{pair.dev_a},{pair.dev_b}"}
        subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                pair.b,
                sys.executable,
                os.path.abspath(__file__),
                *rest,
                "--inside",
                f"{pair.a},{pair.addr_a}:0",
            ],
            env=env,
            check=True,
        )
    finally:
        pair.down()


if __name__ == "__main__":
    main()
