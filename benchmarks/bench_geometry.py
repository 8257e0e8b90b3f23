"""copy_kv_tokens between caches of different geometry, against a same-geometry transfer of
the same bytes measured in the same run.

Prefill caches: ``layers`` x K,V, FlashAttention blocks (NHD or HND) of 16 tokens x 8 KV
heads x 128 dims, fp16 (32 KiB per block per tensor); ``moved`` of its blocks (random order)
go to a decode cache of another geometry. Baseline: copy_kv_blocks between two caches of the
prefill's geometry moving the same number of bytes as whole random blocks (what a transfer
between equal geometries does). Ratio = baseline time / geometry time (>= 0.8 is the target).

    python benchmarks/bench_geometry.py [--quick] [--json out.json]
"""

import argparse
import json
import random
import statistics
import time

import torch

import torch_kvreg as kv
from torch_kvreg import KVGeometry

from machine import cpu_model

HEADS, DIM, BLOCK = 8, 128, 16
NHD = KVGeometry("flash_attn", BLOCK, HEADS, DIM)
HND = KVGeometry("flash_attn_hnd", BLOCK, HEADS, DIM)
# name: (prefill geometry, decode geometry)
CASES = {
    "block 16 -> 32 (NHD)": (NHD, KVGeometry("flash_attn", 32, HEADS, DIM)),
    "block 16 -> 32 (HND)": (HND, KVGeometry("flash_attn_hnd", 32, HEADS, DIM)),
    "TP 1 -> TP 2 rank 1 (HND)": (HND, KVGeometry("flash_attn_hnd", 16, HEADS, DIM, 2, 1)),
    "TP 1 -> TP 2 rank 1, block 32 (HND)": (HND, KVGeometry("flash_attn_hnd", 32, HEADS, DIM, 2, 1)),
    "HND split -> vLLM CPU, block 32": (HND, KVGeometry("vllm_cpu", 32, HEADS, DIM)),
    "HND split -> vLLM FlashAttention, block 32": (HND, KVGeometry("vllm_flash_attn", 32, HEADS, DIM)),
    "TP 1 -> TP 2 rank 1 (NHD)": (NHD, KVGeometry("flash_attn", 16, HEADS, DIM, 2, 1)),
    "NHD -> HND": (NHD, HND),
    "NHD split -> vLLM CPU, block 32": (NHD, KVGeometry("vllm_cpu", 32, HEADS, DIM)),
}


def tensors_of(geometry, layers, num_blocks, fill):
    shape = (num_blocks, *geometry.block_shape)
    out = []
    for _ in range(layers * geometry.tensors_per_layer):
        tensor = torch.empty(shape, dtype=torch.float16)
        if fill is None:
            tensor.normal_()
        else:
            tensor.view(torch.int16).fill_(fill)
        out.append(tensor)
    return out


def logical_k(tensor, geometry):
    """The K part of a layer's tensor as (blocks, tokens, heads, dim)."""
    view = tensor.view(len(tensor), *geometry.part_shape(0))
    order = geometry.orders[0]
    if "k" in order:
        view = view.select(1 + order.index("k"), 0)
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, 128 blocks")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=512, help="blocks in the prefill cache (half are moved)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json")
    args = parser.parse_args()
    layers, num_blocks = (2, 128) if args.quick else (args.layers, args.blocks)
    moved = num_blocks // 2
    kv.initialize(limits=kv.Limits(240, 50 * 2**30, 64 * 2**30))
    rng = random.Random(0)
    prefills = {}
    for prefill in (NHD, HND):
        tensors = tensors_of(prefill, layers, num_blocks, None)
        base_dst = kv.register_kv_cache(tensors_of(prefill, layers, num_blocks, 0))  # the baseline's
        prefills[prefill] = (tensors, kv.register_kv_cache(tensors), base_dst)
    src_blocks = rng.sample(range(num_blocks), moved)
    rows = []
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, {layers} layers, {moved} of {num_blocks} blocks moved")
    print(f"{'case':<36} {'MiB':>7} {'GB/s':>7} {'base GB/s':>9} {'ratio':>6}")
    for name, (prefill, geometry) in CASES.items():
        src_tensors, src, base_dst = prefills[prefill]
        dst_blocks_needed = -(-moved * BLOCK // geometry.block_size)
        dst_tensors = tensors_of(geometry, layers, max(dst_blocks_needed * 2, 1), 0)
        dst = kv.register_kv_cache(dst_tensors)
        dst_blocks = rng.sample(range(len(dst_tensors[0])), dst_blocks_needed)
        plan = kv.plan_kv_tokens(src, dst, src_blocks, dst_blocks, src_geometry=prefill, dst_geometry=geometry)
        nbytes = plan.nbytes
        block_bytes = src.cache_desc.block_nbytes * src.cache_desc.num_tensors
        base_count = nbytes // block_bytes
        assert base_count * block_bytes == nbytes, (nbytes, block_bytes)
        base_src, base_dst_blocks = rng.sample(range(num_blocks), base_count), rng.sample(range(num_blocks), base_count)

        def geometry_copy(src=src, dst=dst, prefill=prefill, geometry=geometry, dst_blocks=dst_blocks):
            kv.copy_kv_tokens(src, dst, src_blocks, dst_blocks, src_geometry=prefill, dst_geometry=geometry)

        def same_geometry_copy(src=src, base_dst=base_dst, base_src=base_src, base_dst_blocks=base_dst_blocks):
            kv.copy_kv_blocks(src, base_dst, base_src, base_dst_blocks)

        # Interleaved, so that drift on a shared machine hits both alike.
        geo_times, base_times = [], []
        for _ in range(3):
            geo_times.append(timed(geometry_copy, max(args.repeats // 3, 1)))
            base_times.append(timed(same_geometry_copy, max(args.repeats // 3, 1)))
        geo_s, base_s = min(geo_times), min(base_times)
        # The bytes that landed are checked once, by the reference reading of both layouts.
        check_token = rng.randrange(moved * BLOCK)
        k_src = logical_k(src_tensors[0], prefill)[src_blocks[check_token // BLOCK], check_token % BLOCK]
        k_dst = logical_k(dst_tensors[0], geometry)[
            dst_blocks[check_token // geometry.block_size], check_token % geometry.block_size
        ]
        assert torch.equal(k_dst, k_src[geometry.heads.start : geometry.heads.stop]), name
        row = {
            "case": name,
            "nbytes": nbytes,
            "segments": len(plan.segments) + len(plan.v_segments),
            "lanes": len(plan.lanes),
            "gbps": nbytes / geo_s / 1e9,
            "baseline_gbps": nbytes / base_s / 1e9,
            "ratio": base_s / geo_s,
        }
        rows.append(row)
        print(
            f"{name:<36} {nbytes / 2**20:>7.0f} {row['gbps']:>7.1f} {row['baseline_gbps']:>9.1f} {row['ratio']:>5.2f}x"
        )
        kv.unregister_kv_cache(dst)
        del dst_tensors
    result = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "layers": layers, "moved": moved, "rows": rows}
    result["copy_strategy"] = kv.copy_strategy()
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)
    kv.finalize()


if __name__ == "__main__":
    main()
