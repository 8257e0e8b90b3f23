"""Transfers between caches of different geometry against a same-geometry transfer of the
same bytes, measured in the same run: local copies (copy_kv_tokens) and same-host pulls
from another process (pull_kv_tokens).

Prefill caches hold ``layers`` x K,V of 8 KV heads x 128 dims, fp16, in the case's source
geometry (FlashAttention NHD or HND blocks of 16 tokens: 32 KiB per block per tensor, or
another layout); half of their tokens (whole blocks, random order) go to a decode cache of
another geometry. Baseline: the same-geometry transfer of the source's geometry (local:
copy_kv_blocks; remote: pull_kv_blocks) moving the same bytes as whole random blocks, the
two measured interleaved. Ratio = geometry GB/s / baseline GB/s (>= 0.8 is the target). Both are also timed
through the host's former path ("runs path": the plan's byte runs, single elements by
indexing locally; a same-host pull's runs on the mapped peer cache instead of its box
kernels, with --remote-runs-path; TORCH_KVREG_GEOMETRY_COPY=runs), in the same run.
"TP 2 -> TP 1" gathers a TP-1 decode cache from two TP-2 prefill caches (two transfers, one
call's worth of bytes in all).

    python benchmarks/bench_geometry.py [--quick] [--no-remote] [--json out.json]
"""

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import time

import torch

import torch_kvreg as kv
from torch_kvreg import _C, KVGeometry

from machine import cpu_model

HEADS, DIM, BLOCK = 8, 128, 16


def g(layout, block=BLOCK, tp=1, rank=0):
    return KVGeometry(layout, block, HEADS, DIM, tp, rank)


NHD, HND = g("flash_attn"), g("flash_attn_hnd")
# name: (prefill geometries (two: a gather from TP-2 ranks), decode geometry)
CASES = {
    "block 16 -> 32 (NHD)": ((NHD,), g("flash_attn", 32)),
    "block 32 -> 16 (NHD)": ((g("flash_attn", 32),), NHD),
    "block 16 -> 32 (HND)": ((HND,), g("flash_attn_hnd", 32)),
    "block 32 -> 16 (HND)": ((g("flash_attn_hnd", 32),), HND),
    "NHD -> HND": ((NHD,), HND),
    "HND -> NHD": ((HND,), NHD),
    "K/V split -> interleaved (NHD)": ((NHD,), g("flashinfer")),
    "K/V interleaved -> split (NHD)": ((g("flashinfer"),), NHD),
    "K/V split -> interleaved (HND)": ((HND,), g("flashinfer_hnd")),
    "NHD 16 -> vLLM CPU 32": ((NHD,), g("vllm_cpu", 32)),
    "vLLM CPU 32 -> NHD 16": ((g("vllm_cpu", 32),), NHD),
    "HND 16 -> vLLM CPU 32": ((HND,), g("vllm_cpu", 32)),
    "vLLM CPU 32 -> vLLM FA 32": ((g("vllm_cpu", 32),), g("vllm_flash_attn", 32)),
    "vLLM FA 32 -> vLLM CPU 32": ((g("vllm_flash_attn", 32),), g("vllm_cpu", 32)),
    "HND 16 -> vLLM FA 32": ((HND,), g("vllm_flash_attn", 32)),
    "TP 1 -> TP 2 rank 1 (NHD)": ((NHD,), g("flash_attn", tp=2, rank=1)),
    "TP 1 -> TP 2 rank 1 (HND)": ((HND,), g("flash_attn_hnd", tp=2, rank=1)),
    "TP 2 -> TP 1 gather (NHD)": ((g("flash_attn", tp=2), g("flash_attn", tp=2, rank=1)), NHD),
    "TP 2 -> TP 1 gather (HND)": ((g("flash_attn_hnd", tp=2), g("flash_attn_hnd", tp=2, rank=1)), HND),
}


def prefill_tensors(geometry, layers, num_blocks, seed):
    """Random source tensors, the same in every process for the same arguments."""
    gen = torch.Generator().manual_seed(seed)
    shape = (num_blocks, *geometry.block_shape)
    return [torch.randn(shape, generator=gen).half() for _ in range(layers * geometry.tensors_per_layer)]


def zeros(geometry, layers, num_blocks):
    return [
        torch.zeros(num_blocks, *geometry.block_shape, dtype=torch.float16)
        for _ in range(layers * geometry.tensors_per_layer)
    ]


def logical(tensor, geometry, kv_index=0):
    """K (``kv_index`` 0) or V of a layer's tensor as (blocks, tokens, heads, dim)."""
    view = tensor.view(len(tensor), *geometry.part_shape(kv_index))
    order = geometry.orders[kv_index]
    if "k" in order:
        view = view.select(1 + order.index("k"), kv_index)
        order = order.replace("k", "")
    return view.permute(0, *(1 + order.index(axis) for axis in "thd"))


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def source_geometries():
    return sorted({p for prefills, _ in CASES.values() for p in prefills}, key=repr)


def prefill_process(layers, num_blocks, to_main, from_main):
    """The remote side: every source geometry's cache in memory that peers map."""
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    kv.initialize(1, kv.LlmRole.PROMPT, options={"llm.ListenIpInfo": "127.0.0.1:0"})
    ids = {}
    for seed, geometry in enumerate(source_geometries()):
        values = prefill_tensors(geometry, layers, num_blocks, seed)
        cache, tensors = kv.allocate_kv_cache(
            len(values), (num_blocks, *geometry.block_shape), torch.float16, kv.RegisterCfg(remote_accessible=True)
        )
        for tensor, value in zip(tensors, values):
            tensor.copy_(value)
        ids[geometry] = cache.cache_id
    to_main.put((kv.listen_address(), ids))
    from_main.get()
    kv.finalize()


def pull_tokens(sources, decode, dst, src_blocks, dst_blocks):
    """Pulls the tokens of ``src_blocks`` from each prefill's cache (``sources``: geometry ->
    CacheIndex; several: a TP gather, each its own heads) into ``dst``; the bytes moved."""
    started = [
        kv.pull_kv_tokens_async(
            cache,
            dst,
            src_blocks,
            dst_blocks,
            src_geometry=geometry,
            dst_geometry=decode,
            heads=geometry.heads if len(sources) > 1 else None,
        )
        for geometry, cache in sources.items()
    ]
    return sum(transfer.wait() for transfer in started)


def same_bytes_blocks(nbytes, cache, num_blocks, rng):
    """(source blocks, destination blocks, bytes they hold) of a same-geometry transfer in
    ``cache``'s geometry moving about ``nbytes`` (at least one block): the baseline."""
    block_bytes = cache.cache_desc.block_nbytes * cache.cache_desc.num_tensors
    count = max(1, round(nbytes / block_bytes))
    return rng.sample(range(num_blocks), count), rng.sample(range(num_blocks), count), count * block_bytes


def run_cases(args, layers, num_blocks, remote_ids=None):
    """One row per case; remote_ids: the peer's cache per source geometry (else local)."""
    rng = random.Random(0)
    moved = num_blocks // 2
    sources = {}
    for seed, geometry in enumerate(source_geometries()):
        tensors = prefill_tensors(geometry, layers, num_blocks, seed)
        if remote_ids is None:
            cache = kv.register_kv_cache(tensors)
        else:
            cache = kv.CacheIndex(1, remote_ids[geometry])
        base_dst = kv.register_kv_cache(zeros(geometry, layers, num_blocks))
        sources[geometry] = (tensors, cache, base_dst)
    rows = []
    where = "local" if remote_ids is None else "same-host pull"
    for name, (prefills, decode) in CASES.items():
        if args.only and args.only not in name:
            continue
        tokens = moved * prefills[0].block_size
        src_blocks = rng.sample(range(num_blocks), moved)
        dst_needed = -(-tokens // decode.block_size)
        dst_tensors = zeros(decode, layers, dst_needed * 2)
        dst = kv.register_kv_cache(dst_tensors, kv.RegisterCfg(remote_accessible=remote_ids is not None))
        dst_blocks = rng.sample(range(dst_needed * 2), dst_needed)

        def geometry_copy(prefills=prefills, decode=decode, dst=dst, src_blocks=src_blocks, dst_blocks=dst_blocks):
            if remote_ids is None:
                return sum(
                    kv.copy_kv_tokens(
                        sources[p][1],
                        dst,
                        src_blocks,
                        dst_blocks,
                        src_geometry=p,
                        dst_geometry=decode,
                        heads=p.heads if len(prefills) > 1 else None,
                    )
                    for p in prefills
                )
            return pull_tokens({p: sources[p][1] for p in prefills}, decode, dst, src_blocks, dst_blocks)

        nbytes = geometry_copy()
        base_geometry = prefills[0]
        _, base_src_cache, base_dst = sources[base_geometry]
        base_src, base_dst_blocks, base_bytes = same_bytes_blocks(nbytes, base_dst, num_blocks, rng)

        def same_geometry_copy(src=base_src_cache, dst=base_dst, a=base_src, b=base_dst_blocks, p=base_geometry):
            if remote_ids is None:
                kv.copy_kv_blocks(src, dst, a, b)
            else:
                kv.pull_kv_blocks(src, dst, a, b, tensors_per_layer=p.tensors_per_layer)

        # Interleaved, so that drift on a shared machine hits all alike. Also timed: the
        # host's former path (the plan's runs; TORCH_KVREG_GEOMETRY_COPY=runs).
        # Same-host pulls through the runs path only when asked: a vLLM CPU layout's element
        # runs take seconds per pull, and a run here once lost its peer link during them.
        runs = args.runs_path if remote_ids is None else args.remote_runs_path
        paths = ["boxes", "runs"] if runs else ["boxes"]
        if args.former_kernels:
            paths.append("former")
        if args.one_task and remote_ids is not None:
            paths.append("one_task")
        times = {path: [] for path in [*paths, "base"]}
        for _ in range(3):
            for path in paths:
                os.environ["TORCH_KVREG_GEOMETRY_COPY"] = "runs" if path == "runs" else "boxes"
                _C._test_geometry_former_kernels(path == "former")
                _C._test_geometry_one_task(path == "one_task")
                times[path].append(timed(geometry_copy, max(args.repeats // 3, 1)))
                _C._test_geometry_former_kernels(False)
                _C._test_geometry_one_task(False)
                check(sources, prefills, decode, dst_tensors, src_blocks, dst_blocks, rng, name)
            os.environ.pop("TORCH_KVREG_GEOMETRY_COPY")
            times["base"].append(timed(same_geometry_copy, max(args.repeats // 3, 1)))
        base_gbps = base_bytes / min(times["base"]) / 1e9
        row = {"case": name, "where": where, "nbytes": nbytes, "baseline_gbps": base_bytes / min(times["base"]) / 1e9}
        for path in paths:
            suffix = {"boxes": "", "runs": "_runs", "former": "_former", "one_task": "_one_task"}[path]
            row["gbps" + suffix] = nbytes / min(times[path]) / 1e9
            row["ratio" + suffix] = row["gbps" + suffix] / base_gbps
        rows.append(row)
        runs = f"{row['ratio_runs']:>9.2f}x" if "ratio_runs" in row else f"{'':>10}"
        former = f"{row['ratio_former']:>9.2f}x" if "ratio_former" in row else f"{'':>10}"
        one_task = f"{row['ratio_one_task']:>9.2f}x" if "ratio_one_task" in row else ""
        print(
            f"{where:<15} {name:<34} {nbytes / 2**20:>6.0f} {row['gbps']:>7.2f} {base_gbps:>9.2f}",
            f"{row['ratio']:>5.2f}x {runs} {former} {one_task}",
        )
        kv.unregister_kv_cache(dst)
    for _tensors, cache, base_dst in sources.values():
        kv.unregister_kv_cache(base_dst)
        if remote_ids is None:
            kv.unregister_kv_cache(cache)
    return rows


def pattern_bounds(repeats, nbytes=64 << 20):
    """The head slices' access patterns as plain streams, by torch's own copy on one thread
    against its copy of the same bytes laid out whole: what the pattern costs on this machine
    whatever the kernel. Reading (TP 1 -> TP 2, NHD) or writing (TP 2 -> TP 1 gather) the
    1 KiB half of every 2 KiB token row."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        wide = torch.empty(2 * nbytes, dtype=torch.uint8).random_()
        dense = torch.empty(nbytes, dtype=torch.uint8).random_()
        halves = wide.view(-1, 2048)[:, :1024]
        cases = {
            "read 1 KiB of each 2 KiB row": lambda: dense.view(-1, 1024).copy_(halves),
            "write 1 KiB of each 2 KiB row": lambda: halves.copy_(dense.view(-1, 1024)),
        }
        whole = wide[:nbytes]
        times = {name: [] for name in [*cases, "whole"]}
        for _ in range(3):  # in turns, so that drift on a shared machine hits all alike
            for name, fn in cases.items():
                times[name].append(timed(fn, max(repeats // 3, 1)))
            times["whole"].append(timed(lambda: dense.copy_(whole), max(repeats // 3, 1)))
    finally:
        torch.set_num_threads(threads)
    base = nbytes / min(times["whole"]) / 1e9
    rows = []
    for name in cases:
        gbps = nbytes / min(times[name]) / 1e9
        rows.append({"pattern": name, "gbps": gbps, "whole_gbps": base, "ratio": gbps / base})
        print(f"pattern bound   {name:<34} {nbytes / 2**20:>6.0f} {gbps:>7.2f} {base:>9.2f} {gbps / base:>5.2f}x")
    return rows


def check(sources, prefills, decode, dst_tensors, src_blocks, dst_blocks, rng, name):
    """A few random tokens of K and V of the last layer, read through both layouts."""
    for _ in range(4):
        for kv_index in (0, 1):
            token = rng.randrange(len(src_blocks) * prefills[0].block_size)
            layer = len(dst_tensors) // decode.tensors_per_layer - 1
            for p in prefills:
                src_tensor = sources[p][0][layer * p.tensors_per_layer + (kv_index if p.tensors_per_layer == 2 else 0)]
                dst_tensor = dst_tensors[
                    layer * decode.tensors_per_layer + (kv_index if decode.tensors_per_layer == 2 else 0)
                ]
                got = logical(dst_tensor, decode, kv_index)[
                    dst_blocks[token // decode.block_size], token % decode.block_size
                ]
                want = logical(src_tensor, p, kv_index)[src_blocks[token // p.block_size], token % p.block_size]
                heads = range(max(p.heads.start, decode.heads.start), min(p.heads.stop, decode.heads.stop))
                src_heads = slice(heads.start - p.heads.start, heads.stop - p.heads.start)
                dst_heads = slice(heads.start - decode.heads.start, heads.stop - decode.heads.start)
                assert torch.equal(got[dst_heads], want[src_heads]), name


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, 64 blocks")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=512, help="blocks in a prefill cache (half are moved)")
    parser.add_argument("--remote-layers", type=int, default=2)
    parser.add_argument("--remote-blocks", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--only", help="run the cases whose name contains this")
    parser.add_argument("--no-remote", action="store_true", help="local copies only")
    parser.add_argument("--no-local", action="store_true", help="same-host pulls only")
    parser.add_argument("--no-runs-path", dest="runs_path", action="store_false", help="leave out the runs-path column")
    parser.add_argument(
        "--remote-runs-path", action="store_true", help="time same-host pulls through the runs path too"
    )
    parser.add_argument(
        "--former-kernels",
        action="store_true",
        help="also time the box kernels as they were before (boxes of K, then of V; no next-row prefetch)",
    )
    parser.add_argument(
        "--one-task",
        action="store_true",
        help="also time same-host pulls started as before: one pool task running every box (copy_boxes)",
    )
    parser.add_argument(
        "--pattern-bound",
        action="store_true",
        help="also time the head slices' access patterns as plain streams (torch's copy, one thread)",
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    layers, num_blocks = (2, 64) if args.quick else (args.layers, args.blocks)
    remote_layers, remote_blocks = (2, 64) if args.quick else (args.remote_layers, args.remote_blocks)
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    remote = not args.no_remote and kv.remote.nixl_available()
    peer = None
    if remote:
        ctx = mp.get_context("spawn")
        to_main, from_main = ctx.Queue(), ctx.Queue()
        # daemon: a main side that raises ends the peer at exit instead of waiting on it forever
        peer = ctx.Process(target=prefill_process, args=(remote_layers, remote_blocks, to_main, from_main), daemon=True)
        peer.start()
    kv.initialize(2, kv.LlmRole.DECODER, limits=kv.Limits(240, 50 * 2**30, 64 * 2**30))
    print(
        f"{cpu_model()}, {torch.get_num_threads()} threads; local: {layers} layers,",
        f"{num_blocks // 2} of {num_blocks} blocks moved",
    )
    print(
        f"{'where':<15} {'case':<34} {'MiB':>6} {'GB/s':>7} {'base GB/s':>9} {'ratio':>6}",
        f"{'runs path':>10} {'former':>10} {'one task':>10}",
    )
    rows = [] if args.no_local else run_cases(args, layers, num_blocks)
    if peer is not None:
        address, remote_ids = to_main.get(timeout=600)
        host, port = address.split(":")
        status, _ = kv.link_clusters([kv.ClusterInfo(1, host, int(port))])
        assert status == kv.LLMStatusCode.LLM_SUCCESS
        rows += run_cases(args, remote_layers, remote_blocks, remote_ids)
        paths = dict(kv.remote.current_engine().paths)
        print(f"same-host pulls: {remote_layers} layers, {remote_blocks // 2} of {remote_blocks} blocks; paths {paths}")
        kv.unlink_clusters([kv.ClusterInfo(1, host, int(port))])
        from_main.put(None)
        peer.join(60)
    result = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "layers": layers, "rows": rows}
    if args.pattern_bound:
        result["pattern_bounds"] = pattern_bounds(args.repeats)
    result["copy_strategy"] = kv.copy_strategy()
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)
    kv.finalize()


if __name__ == "__main__":
    main()
