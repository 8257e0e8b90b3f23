"""Same-host pulls between geometries (the peer's cache mapped here): the box job started as
one pool task (the former way, _C._test_geometry_one_task) against the job split into
ranges of boxes that the copy threads and the waiting caller share, and both against a
same-geometry pull_kv_blocks of the same bytes. The three are timed in turns, call by call,
so that load from elsewhere hits all alike; medians. "busy" is this process's CPU time over
wall time while it copied: how many threads actually worked (2 at most on 2 cores).

    python benchmarks/bench_geometry_job.py [--cases "NHD -> HND,TP 1 -> TP 2 rank 1 (NHD)"]
        [--turns 30] [--json out.json]

The caches are bench_geometry.py's (8 KV heads x 128 dims, fp16; its case names); set
TORCH_KVREG_COPY to pin the copy strategy (":single": copy_boxes on one thread).
"""

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import time

import bench_geometry as bg

import torch_kvreg as kv
from torch_kvreg import _C

from machine import cpu_model

DEFAULT_CASES = ",".join(
    [
        "NHD -> HND",
        "HND -> NHD",
        "block 32 -> 16 (HND)",
        "K/V split -> interleaved (NHD)",
        "TP 1 -> TP 2 rank 1 (NHD)",
        "TP 2 -> TP 1 gather (NHD)",
    ]
)


def run_case(name, ids, layers, num_blocks, turns, rng):
    prefills, decode = bg.CASES[name]
    moved = num_blocks // 2
    need = -(-moved * prefills[0].block_size // decode.block_size)
    dst = kv.register_kv_cache(bg.zeros(decode, layers, need * 2), kv.RegisterCfg(remote_accessible=True))
    src_blocks, dst_blocks = rng.sample(range(num_blocks), moved), rng.sample(range(need * 2), need)

    sources = {p: kv.CacheIndex(1, ids[p]) for p in prefills}

    def geometry_pull():
        return bg.pull_tokens(sources, decode, dst, src_blocks, dst_blocks)

    nbytes = geometry_pull()
    p = prefills[0]
    base_dst = kv.register_kv_cache(bg.zeros(p, layers, num_blocks))
    base_src, base_to, base_bytes = bg.same_bytes_blocks(nbytes, base_dst, num_blocks, rng)

    def base_pull():
        kv.pull_kv_blocks(kv.CacheIndex(1, ids[p]), base_dst, base_src, base_to, tensors_per_layer=p.tensors_per_layer)

    wall = {"one_task": [], "split": [], "base": []}
    cpu = dict.fromkeys(wall, 0.0)
    for _ in range(turns):
        for path in wall:
            _C._test_geometry_one_task(path == "one_task")
            fn = base_pull if path == "base" else geometry_pull
            cpu_start, start = time.process_time(), time.perf_counter()
            fn()
            wall[path].append(time.perf_counter() - start)
            cpu[path] += time.process_time() - cpu_start
        _C._test_geometry_one_task(False)
    kv.unregister_kv_cache(dst)
    kv.unregister_kv_cache(base_dst)
    base_gbps = base_bytes / statistics.median(wall["base"]) / 1e9
    row = {"case": name, "nbytes": nbytes, "baseline_gbps": base_gbps}
    for path in wall:
        row[f"busy_{path}"] = cpu[path] / sum(wall[path])
        if path != "base":
            row[f"ratio_{path}"] = nbytes / statistics.median(wall[path]) / 1e9 / base_gbps
    print(
        f"{name:<34} {nbytes / 2**20:>5.0f} {base_gbps:>9.2f}",
        f"{row['ratio_one_task']:>8.2f}x {row['ratio_split']:>6.2f}x",
        f"  {row['busy_one_task']:>4.2f} {row['busy_split']:>5.2f} {row['busy_base']:>4.2f}",
    )
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=DEFAULT_CASES, help="bench_geometry.py case names, comma-separated")
    parser.add_argument("--turns", type=int, default=30)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=256, help="blocks in a prefill cache (half are moved)")
    parser.add_argument("--json")
    args = parser.parse_args()
    names = args.cases.split(",")
    for name in names:
        if name not in bg.CASES:
            parser.error(f"no case {name!r}")
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    ctx = mp.get_context("spawn")
    to_main, from_main = ctx.Queue(), ctx.Queue()
    peer = ctx.Process(target=bg.prefill_process, args=(args.layers, args.blocks, to_main, from_main), daemon=True)
    peer.start()
    kv.initialize(2, kv.LlmRole.DECODER, limits=kv.Limits(240, 50 * 2**30, 64 * 2**30))
    address, ids = to_main.get(timeout=600)
    host, port = address.split(":")
    status, _ = kv.link_clusters([kv.ClusterInfo(1, host, int(port))])
    assert status == kv.LLMStatusCode.LLM_SUCCESS
    print(f"{cpu_model()}; {args.layers} layers, {args.blocks // 2} of {args.blocks} blocks; {args.turns} turns")
    print(f"{'case':<34} {'MiB':>5} {'base GB/s':>9} {'one task':>9} {'split':>7}   busy: one split base")
    rng = random.Random(0)
    rows = [run_case(name, ids, args.layers, args.blocks, args.turns, rng) for name in names]
    result = {"cpu": cpu_model(), "copy_strategy": kv.copy_strategy(), "threads": _C.peer_copy_threads(), "rows": rows}
    print(f"copy strategy {result['copy_strategy']}, {result['threads']} same-host copy thread(s) + the caller")
    kv.unlink_clusters([kv.ClusterInfo(1, host, int(port))])
    from_main.put(None)
    peer.join(60)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)
    kv.finalize()


if __name__ == "__main__":
    main()
