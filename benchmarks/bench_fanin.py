"""How pulls scale with peers: one prefill process and 1, 2, 4, 8 decoder processes pulling
from it at once (fan-out), and one decoder pulling from 1, 2, 4 prefill processes at once
(fan-in); torch_kvreg against raw NIXL, in one run.

Every process has a cache of --layers layers x K and V, --cache-blocks blocks of 16 tokens
x 8 heads x 128 dims fp16 (32 KiB per block per tensor), three times over: "ours", a
remote-accessible register_kv_cache over its own tensors (a same-host pull reads the
peer's memory through the kernel, process_vm_readv); "ours_mapped", an allocate_kv_cache
cache (shared memory the decoder maps once: a pull is a copy in its own address space);
"raw_nixl", its own tensors registered with a raw NIXL agent (benchmarks/raw_nixl.py:
per-block descriptors in prepared lists, UCX, the agent made as torch_kvreg makes its
own). The ceiling: copy_kv_blocks of one pull's blocks between two caches of one process
(/copy). A pull moves --blocks random blocks of every tensor into random
blocks of the decoder's cache (written before, so no page is touched for the first time).
In a phase every decoder taking part makes --pulls pulls of one kind, all decoders
starting together; the kinds take turns, --repeats rounds after a warm-up round.
Per phase: aggregate GB/s (bytes of all pulls over first start to last end) and the CPU
time all processes of this benchmark used per GB pulled (/proc, every thread); per pull: its time from
start to end, pooled over rounds (p50, p99). Fan-in: the decoder starts one
pull to each prefill at once (pull_kv_blocks_async; raw: one request per peer, polled in
turn) into disjoint blocks of its cache and waits for all.

    python benchmarks/bench_fanin.py [--decoders 1,2,4,8] [--prefills 1,2,4] [--layers 4]
        [--blocks 64] [--pulls 24] [--repeats 3] [--json out.json]
"""

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import time

import torch

from machine import cpu_model
from raw_nixl import RawReader, reg_rows

BLOCK_SHAPE = (16, 8, 128)
PREFILL_BASE, DECODER_BASE = 1, 100  # cluster ids
# ours: caches over the processes' own tensors (register_kv_cache); ours_mapped: caches that
# torch_kvreg allocated (allocate_kv_cache, shared memory the decoder maps); raw_nixl.
KINDS = ("ours", "ours_mapped", "raw_nixl")


def make_tensors(layers, num_blocks, fill):
    return [torch.full((num_blocks, *BLOCK_SHAPE), float(fill + i % 7), dtype=torch.float16) for i in range(2 * layers)]


def prefill_process(index, layers, num_blocks, to_main, from_main):
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    torch.set_num_threads(1)
    import torch_kvreg as kv
    from torch_kvreg.remote.agent import make_agent

    options = {"llm.ListenIpInfo": "127.0.0.1:0", "llm.SyncKvCacheWaitTime": "30000"}
    kv.initialize(PREFILL_BASE + index, kv.LlmRole.PROMPT, options=options)
    tensors = make_tensors(layers, num_blocks, fill=10 * index)
    cache = kv.register_kv_cache(tensors, kv.RegisterCfg(remote_accessible=True))
    shared, shared_tensors = kv.allocate_kv_cache(
        len(tensors), tensors[0].shape, tensors[0].dtype, kv.RegisterCfg(remote_accessible=True)
    )
    for dst, src in zip(shared_tensors, tensors):
        dst.copy_(src)
    raw = make_agent(f"raw-prefill-{index}")
    raw.register_memory(reg_rows(tensors), "DRAM")
    address = kv.listen_address()
    ids = {"ours": cache.cache_id, "ours_mapped": shared.cache_id}
    to_main.put((index, address, ids, raw.get_agent_metadata(), [t.data_ptr() for t in tensors]))
    from_main.get()
    kv.finalize()


def pull_plan(rng, num_blocks, blocks, targets, pulls):
    """Per pull, per target: (source blocks, destination blocks); destinations of one pull
    are disjoint across targets."""
    plan = []
    for _ in range(pulls):
        dst = rng.sample(range(num_blocks), blocks * len(targets))
        plan.append(
            [(rng.sample(range(num_blocks), blocks), dst[i * blocks : (i + 1) * blocks]) for i in range(len(targets))]
        )
    return plan


def decoder_process(index, layers, num_blocks, prefills, go, to_main, from_main):
    """Links to ``prefills`` ((index, address, cache ids, raw metadata, addresses) each) and
    runs the phases it is sent: (kind, target indices, blocks, pulls, generation)."""
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    torch.set_num_threads(1)
    import torch_kvreg as kv

    kv.initialize(DECODER_BASE + index, kv.LlmRole.DECODER, options={"llm.SyncKvCacheWaitTime": "30000"})
    clusters = [kv.ClusterInfo(PREFILL_BASE + p[0], p[1].split(":")[0], int(p[1].split(":")[1])) for p in prefills]
    status, per_cluster = kv.link_clusters(clusters, timeout_ms=30000)
    assert status == kv.LLMStatusCode.LLM_SUCCESS, (status, per_cluster)
    tensors = make_tensors(layers, num_blocks, fill=1000)
    local = kv.register_kv_cache(tensors, kv.RegisterCfg(remote_accessible=True))
    block_nbytes = local.cache_desc.block_nbytes
    reader = RawReader(f"raw-decoder-{index}", tensors, num_blocks, block_nbytes)
    mapped, mapped_tensors = kv.allocate_kv_cache(len(tensors), tensors[0].shape, tensors[0].dtype)
    for t in mapped_tensors:
        t.fill_(1000.0)
    locals_ = {"ours": (local, tensors), "ours_mapped": (mapped, mapped_tensors), "raw_nixl": (None, tensors)}
    remote = {}
    for p_index, _, cache_ids, raw_md, addrs in prefills:
        reader.connect(p_index, raw_md, addrs)
        for kind, cache_id in cache_ids.items():
            remote[kind, p_index] = kv.CacheIndex(PREFILL_BASE + p_index, cache_id)
    rng = random.Random(index)
    to_main.put(("ready", index, block_nbytes))
    while (command := from_main.get()) is not None:
        kind, targets, blocks, pulls, generation = command
        plan = pull_plan(rng, num_blocks, blocks, targets, pulls)
        cache, tensors = locals_[kind]
        # The last pull's destinations are overwritten first: what is found there after
        # the phase was moved in this phase, by this kind.
        for _, dst in plan[-1]:
            for t in tensors:
                t[dst] = -1.0
        to_main.put(("armed", index, None))
        while go.value < generation:
            time.sleep(0.0002)
        latencies, start = [], time.perf_counter()
        for pieces in plan:
            if kind != "raw_nixl" and len(targets) == 1:
                t0 = time.perf_counter()
                kv.pull_kv_blocks(remote[kind, targets[0]], cache, *pieces[0])
                latencies.append(time.perf_counter() - t0)
            elif kind != "raw_nixl":
                transfers = [kv.pull_kv_blocks_async(remote[kind, p], cache, *pc) for p, pc in zip(targets, pieces)]
                for transfer in transfers:
                    transfer.wait()
                latencies += [transfer.elapsed_s for transfer in transfers]
            else:
                t0 = time.perf_counter()
                pending = {reader.start(p, *pc): p for p, pc in zip(targets, pieces)}
                while pending:
                    for handle in list(pending):
                        state = reader.agent.check_xfer_state(handle)
                        if state != "PROC":
                            assert state == "DONE", state
                            latencies.append(time.perf_counter() - t0)
                            reader.agent.release_xfer_handle(handle)
                            del pending[handle]
        end = time.perf_counter()
        ok = all(
            torch.equal(tensors[i][dst], torch.full_like(tensors[i][dst], float(10 * p + i % 7)))
            for p, (_, dst) in zip(targets, plan[-1])
            for i in range(len(tensors))
        )
        to_main.put(("done", index, (start, end, latencies, ok)))
    routes = dict(kv.remote.existing_engine().paths)
    kv.finalize()
    to_main.put(("exit", index, routes))


def cpu_seconds(pids):
    """CPU seconds (user + system, every thread) the processes ``pids`` have used, from /proc."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def local_copy_gbps(kv, layers, num_blocks, blocks, repeats):
    """copy_kv_blocks of one pull's blocks between two caches of this process (the same
    bytes, no second process): what one copier moves on this machine."""
    src = kv.register_kv_cache(make_tensors(layers, num_blocks, fill=1))
    dst = kv.register_kv_cache(make_tensors(layers, num_blocks, fill=2))
    rng = random.Random(7)
    times = []
    for i in range(repeats + 1):
        src_blocks, dst_blocks = rng.sample(range(num_blocks), blocks), rng.sample(range(num_blocks), blocks)
        start = time.perf_counter()
        kv.copy_kv_blocks(src, dst, src_blocks, dst_blocks)
        if i:
            times.append(time.perf_counter() - start)
    kv.unregister_kv_cache(src)
    kv.unregister_kv_cache(dst)
    return blocks * 2 * layers * src.cache_desc.block_nbytes / statistics.median(times) / 1e9


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decoders", default="1,2,4,8", help="decoder counts of the fan-out table")
    parser.add_argument("--prefills", default="1,2,4", help="prefill counts of the fan-in table")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--cache-blocks", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=64, help="blocks of every tensor per pull")
    parser.add_argument("--pulls", type=int, default=24, help="pulls per decoder per phase")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    decoder_counts = [int(n) for n in args.decoders.split(",") if n]
    prefill_counts = [int(n) for n in args.prefills.split(",") if n]
    if min(decoder_counts + prefill_counts) < 1 or args.blocks * max(prefill_counts) > args.cache_blocks:
        raise SystemExit("counts must be >= 1 and --blocks x the largest prefill count at most --cache-blocks")

    ctx = mp.get_context("spawn")
    from_peers = ctx.Queue()
    to_prefills = [ctx.Queue() for _ in range(max(prefill_counts))]
    started = time.perf_counter()
    processes = [
        # Daemons: a failed check here ends the run instead of waiting on peers forever.
        ctx.Process(target=prefill_process, args=(i, args.layers, args.cache_blocks, from_peers, q), daemon=True)
        for i, q in enumerate(to_prefills)
    ]
    for p in processes:
        p.start()
    infos = sorted(from_peers.get(timeout=600) for _ in to_prefills)
    go = ctx.Value("q", 0, lock=False)
    to_decoders = [ctx.Queue() for _ in range(max(decoder_counts))]
    for i, q in enumerate(to_decoders):
        # Decoder 0 links to every prefill (the fan-in table); the others to prefill 0.
        linked = infos if i == 0 else infos[:1]
        processes.append(
            ctx.Process(
                target=decoder_process,
                args=(i, args.layers, args.cache_blocks, linked, go, from_peers, q),
                daemon=True,
            )
        )
        processes[-1].start()
    ready = [from_peers.get(timeout=600) for _ in to_decoders]
    block_nbytes = ready[0][2]
    setup_s = time.perf_counter() - started
    pids = [p.pid for p in processes]
    pull_bytes = args.blocks * 2 * args.layers * block_nbytes
    generation = 0

    def phase(members, kind, targets):
        nonlocal generation
        generation += 1
        for m in members:
            to_decoders[m].put((kind, targets, args.blocks, args.pulls, generation))
        for _ in members:
            assert from_peers.get(timeout=600)[0] == "armed"
        cpu0 = cpu_seconds(pids)
        go.value = generation
        results = [from_peers.get(timeout=600)[2] for _ in members]
        cpu1 = cpu_seconds(pids)
        assert all(ok for *_, ok in results), f"{kind} moved the wrong bytes"
        span = max(r[1] for r in results) - min(r[0] for r in results)
        pulls = len(members) * args.pulls * len(targets)
        moved = pulls * pull_bytes / 1e9
        return moved / span, [s for r in results for s in r[2]], (cpu1 - cpu0) / moved

    import torch_kvreg as kv

    kv.initialize(0, kv.LlmRole.DECODER)
    copy_gbps = local_copy_gbps(kv, args.layers, args.cache_blocks, args.blocks, args.pulls)
    kv.finalize()
    fanout = {(n, k): ([], [], []) for n in decoder_counts for k in KINDS}
    fanin = {(n, k): ([], [], []) for n in prefill_counts for k in KINDS}
    for round_ in range(args.repeats + 1):  # round 0 warms up every path and is dropped
        for table, counts in ((fanout, decoder_counts), (fanin, prefill_counts)):
            for n in counts:
                for kind in KINDS:
                    members, targets = (range(n), [0]) if table is fanout else ([0], list(range(n)))
                    gbps, lat, cpu = phase(members, kind, targets)
                    if round_:
                        table[n, kind][0].append(gbps)
                        table[n, kind][1].extend(lat)
                        table[n, kind][2].append(cpu)
    for q in to_decoders:
        q.put(None)
    routes = {}
    for _ in to_decoders:
        _, index, decoder_routes = from_peers.get(timeout=600)
        if index == 0:
            routes = decoder_routes
    for q in to_prefills:
        q.put(None)
    for p in processes:
        p.join(timeout=120)

    def rows(table, key):
        out = []
        for n in sorted({n for n, _ in table}):
            row = {key: n}
            for kind in KINDS:
                gbps, lat, cpu = table[n, kind]
                row[kind] = dict(
                    gbps=statistics.median(gbps),
                    cpu_s_per_gb=statistics.median(cpu),
                    vs_copy_kv_blocks=statistics.median(gbps) / copy_gbps,
                    p50_ms=percentile(lat, 0.5) * 1e3,
                    p99_ms=percentile(lat, 0.99) * 1e3,
                    pulls=len(lat),
                )
            row["ratio_vs_raw_nixl"] = row["ours"]["gbps"] / row["raw_nixl"]["gbps"]
            row["mapped_ratio_vs_raw_nixl"] = row["ours_mapped"]["gbps"] / row["raw_nixl"]["gbps"]
            out.append(row)
        for row in out:
            for kind in KINDS:
                row[kind]["gbps_vs_one"] = row[kind]["gbps"] / out[0][kind]["gbps"]
        return out

    fanout_rows, fanin_rows = rows(fanout, "decoders"), rows(fanin, "prefills")
    cpus = os.cpu_count()
    route = "same-host copies" if routes.get("same_host") else "NIXL"
    print(f"CPU: {cpu_model()} ({cpus} CPUs); one host; ours went by {route} ({routes}); baseline raw NIXL over UCX")
    print(
        f"a pull: {2 * args.layers} tensors x {args.blocks} random of {args.cache_blocks} blocks of "
        f"{block_nbytes // 1024} KiB ({pull_bytes / 2**20:.1f} MiB); {args.pulls} pulls per decoder per phase, "
        f"{args.repeats} rounds; torch {torch.__version__}; {len(processes)} processes started in {setup_s:.1f} s"
    )
    print(
        f"copy_kv_blocks of one pull's blocks between two caches of one process: {copy_gbps:.2f} GB/s "
        "(/copy: aggregate over it); CPU s/GB: CPU time of this benchmark's processes per GB pulled"
    )
    for title, table, key in (
        ("fan-out: one prefill, N decoders pulling at once", fanout_rows, "decoders"),
        ("fan-in: one decoder pulling from N prefills at once", fanin_rows, "prefills"),
    ):
        print(title)
        print(
            f"{'N':>3}  {'':<12} {'GB/s':>6} {'x N=1':>6} {'/copy':>6} "
            f"{'p50 ms':>7} {'p99 ms':>7} {'CPU s/GB':>8} {'/ raw':>6}"
        )
        for row in table:
            for kind in KINDS:
                r = row[kind]
                print(
                    f"{row[key]:>3}  {kind:<12} {r['gbps']:>6.2f} {r['gbps_vs_one']:>5.2f}x "
                    f"{r['vs_copy_kv_blocks']:>5.2f}x "
                    f"{r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['cpu_s_per_gb']:>8.3f} "
                    f"{r['gbps'] / row['raw_nixl']['gbps']:>5.2f}x"
                )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                dict(
                    cpu=cpu_model(),
                    cpus=cpus,
                    copy_kv_blocks_gbps=copy_gbps,
                    routes=routes,
                    pull_bytes=pull_bytes,
                    setup_s=setup_s,
                    fanout=fanout_rows,
                    fanin=fanin_rows,
                ),
                out,
                indent=2,
            )


if __name__ == "__main__":
    main()
