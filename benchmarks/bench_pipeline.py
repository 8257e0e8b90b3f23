"""Prefill to first token: layer-wise asynchronous pushes against compute-then-transfer,
and many asynchronous pulls against one blocking pull, in one run.

Two processes on this host. The prefill process computes L layers (each a fixed amount of
matrix work that writes the layer's K and V blocks) and pushes them to the decode process:
(a) sequential: every layer computed, then every layer pushed; (b) overlapped: each layer
pushed asynchronously as soon as it is computed, the next layer computed meanwhile. The
decode process records when the last of the layers' completion notices arrives and
computes its first token. The layer work is calibrated in this run so that computing a layer takes about
as long as pushing it. Then: 64 asynchronous pulls of 32 KiB blocks in flight from one
thread against one blocking pull of the same blocks.

    python benchmarks/bench_pipeline.py [--layers 8] [--repeats 7] [--json out.json]

BENCH_DEBUG=1 also prints, per run, when compute ended, the pushes landed, the decoder saw
the last notice and computed its token.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import time

import torch

from machine import cpu_model

BLOCK_SHAPE = (16, 8, 128)  # 16 tokens x 8 heads x 128 dims fp16: 32 KiB per block per tensor
PREFILL, DECODE = 1, 2
WORK_DIM = 128  # the layer work: tanh(x @ weight), x and weight WORK_DIM x WORK_DIM


def decode_process(layers, blocks, to_main, from_main):
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    import torch_kvreg as kv

    torch.set_num_threads(1)  # two cores: a second intra-op thread would spin against prefill
    kv.initialize(
        DECODE, kv.LlmRole.DECODER, options={"llm.ListenIpInfo": "127.0.0.1:0", "llm.SyncKvCacheWaitTime": "30000"}
    )
    tensors = [torch.zeros(blocks, *BLOCK_SHAPE, dtype=torch.float16) for _ in range(2 * layers)]
    cache = kv.register_kv_cache(tensors, kv.RegisterCfg(remote_accessible=True))
    head = torch.randn(BLOCK_SHAPE[-1], 256)
    to_main.put((kv.listen_address(), cache.cache_id))
    while True:
        command = from_main.get()
        if command == "exit":
            break
        # Wait for every layer's notice (pushes in flight land in any order), then the first
        # token (a small read of every layer).
        # wait_notices blocks without the GIL and wakes as a notice lands: the waiting decoder
        # takes no CPU from the prefill and its pushes, and polls nothing.
        waiting = {f"{command}/{layer}" for layer in range(layers)}
        while waiting:
            for notice in kv.wait_notices(timeout_ms=60_000):
                waiting.discard(notice.message.decode())
        seen = time.time()
        first = sum(t[0, 0].float() @ head for t in tensors[::2]).argmax()
        to_main.put((seen, time.time(), int(first)))
    kv.finalize()


def copy_forever(ready):
    """A process that copies memory without pause (what a transfer does to the other core)."""
    torch.set_num_threads(1)
    src = torch.ones(1 << 26, dtype=torch.uint8)
    dst = torch.empty_like(src)
    ready.set()
    while True:
        dst.copy_(src)


def compute_slowdown(ctx, x0, weight, reps) -> float:
    """How much slower the layer work runs while another process copies memory: 1.0 on two
    independent cores; near 2.0 where the two "cores" share one (vCPUs on sibling threads).
    Bounds what overlapping can win on this machine."""

    def timed():  # a whole prefill's worth of layer work, median of five
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            layer_work(x0, weight, 8 * reps)
            runs.append(time.perf_counter() - start)
        return statistics.median(runs)

    alone = timed()
    ready = ctx.Event()
    copier = ctx.Process(target=copy_forever, args=(ready,), daemon=True)
    copier.start()
    ready.wait(120)
    time.sleep(0.2)
    beside = timed()
    copier.kill()
    copier.join()
    return beside / alone


def layer_work(x: torch.Tensor, weight: torch.Tensor, reps: int) -> torch.Tensor:
    for _ in range(reps):
        x = torch.tanh(x @ weight)
    return x


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=128, help="blocks per layer pushed (32 KiB each, K and V)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.blocks < 64:
        parser.error("--blocks must be at least 64 (64 different blocks are pulled)")
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    import torch_kvreg as kv

    torch.set_num_threads(1)  # the prefill computes on one core; the transfer has the other
    ctx = mp.get_context("spawn")
    to_main, from_main = ctx.Queue(), ctx.Queue()
    decoder = ctx.Process(target=decode_process, args=(args.layers, args.blocks, to_main, from_main), daemon=True)
    decoder.start()
    address, remote_id = to_main.get(timeout=600)
    kv.initialize(PREFILL, kv.LlmRole.PROMPT, options={"llm.SyncKvCacheWaitTime": "30000"})
    host, port = address.split(":")
    assert kv.link_clusters([kv.ClusterInfo(DECODE, host, int(port))])[0] == kv.LLMStatusCode.LLM_SUCCESS
    tensors = [torch.zeros(args.blocks, *BLOCK_SHAPE, dtype=torch.float16) for _ in range(2 * args.layers)]
    for t in tensors:
        t.normal_()  # written memory
    local = kv.register_kv_cache(tensors)
    remote = kv.CacheIndex(DECODE, remote_id)
    blocks = list(range(args.blocks))
    # One unit of layer work is small (a 128x128 matmul, tens of microseconds) so that a
    # layer's work, a whole number of units, matches a layer's push closely; 256x256 units
    # (about 0.45 ms here) left a layer at 1 or 2 units, 0.65x or 1.3x of a 0.7 ms push.
    weight = torch.randn(WORK_DIM, WORK_DIM) / WORK_DIM**0.5
    x0 = torch.randn(WORK_DIM, WORK_DIM)
    layer_bytes = 2 * args.blocks * local.cache_desc.block_nbytes

    def push(layer, notify=None):
        return kv.push_kv_blocks_async(local, remote, blocks, blocks, layers=range(layer, layer + 1), notify=notify)

    # Calibrate: one layer's push time, and matrix work of about the same duration (medians:
    # this machine is shared, and single timings wander).
    for _ in range(3):
        push(0).wait()
    rounds = []
    for _ in range(5):  # as the sequential mode pushes: every layer started, then waited for
        start = time.perf_counter()
        for transfer in [push(layer) for layer in range(args.layers)]:
            transfer.wait()
        rounds.append((time.perf_counter() - start) / args.layers)
    push_s = statistics.median(rounds)
    work = []
    for _ in range(5):
        start = time.perf_counter()
        layer_work(x0, weight, 10)
        work.append((time.perf_counter() - start) / 10)
    reps = max(1, round(push_s / statistics.median(work)))

    def run(overlapped: bool, tag: int):
        from_main.put(tag)
        start_wall = time.time()
        x, pending = x0, []
        for layer in range(args.layers):
            x = layer_work(x, weight, reps)
            tensors[2 * layer][0, 0, 0, 0] = float(x[0, 0])  # the layer's KV depends on its compute
            if overlapped:
                pending.append(push(layer, f"{tag}/{layer}"))
        if not overlapped:
            pending = [push(layer, f"{tag}/{layer}") for layer in range(args.layers)]
        computed = time.time()
        for transfer in pending:
            transfer.wait(60_000)
        pushed = time.time()
        seen, first_token, _ = to_main.get(timeout=120)
        if os.environ.get("BENCH_DEBUG"):
            print(
                f"{'overlapped' if overlapped else 'sequential'}: computed {1e3 * (computed - start_wall):.1f} "
                f"pushed {1e3 * (pushed - start_wall):.1f} seen {1e3 * (seen - start_wall):.1f} "
                f"token {1e3 * (first_token - start_wall):.1f}"
            )
        # The phases: compute, the pushes after it, the decoder's learning of the last notice
        # and its token.
        return {
            "token": first_token - start_wall,
            "compute": computed - start_wall,
            "push_tail": pushed - computed,
            "notice": seen - pushed,
            "first_token": first_token - seen,
        }

    slowdown = compute_slowdown(ctx, x0, weight, reps)
    phases = {"sequential": [], "overlapped": []}
    for repeat in range(args.repeats):
        for mode in ("sequential", "overlapped"):
            phases[mode].append(run(mode == "overlapped", 2 * repeat + (mode == "overlapped")))
    times = {mode: [p["token"] for p in runs] for mode, runs in phases.items()}
    if os.environ.get("BENCH_DEBUG"):
        print({mode: [round(t * 1e3, 1) for t in runs] for mode, runs in times.items()})
    sequential, overlapped = statistics.median(times["sequential"]), statistics.median(times["overlapped"])
    median = {mode: {k: statistics.median(p[k] for p in runs) for k in runs[0]} for mode, runs in phases.items()}
    # What overlapping can reach here at best (benchmarks/RESULTS.md): sequential is compute
    # C, then the pushes T, then the tail t (the decoder learns of the last layer and computes
    # its token). Overlapped, the compute runs s times slower beside the copies, the last
    # layer's push cannot start before its compute ends, and the tail is paid too:
    #   overlapped >= s*C + T/L + t, so the ratio >= (s*C + T/L + t) / (C + T + t),
    # with C, T and t measured in this run's sequential runs. With C = T and t = 0 this is
    # the rough s/2 + 1/(2L).
    seq = median["sequential"]
    tail = seq["notice"] + seq["first_token"]
    overlap_bound = (slowdown * seq["compute"] + seq["push_tail"] / args.layers + tail) / (
        seq["compute"] + seq["push_tail"] + tail
    )

    # Many asynchronous pulls in flight against one blocking pull of the same blocks.
    pull_blocks = random.Random(0).sample(range(args.blocks), 64)
    mine = [torch.zeros(args.blocks, *BLOCK_SHAPE, dtype=torch.float16) for _ in range(2 * args.layers)]
    target = kv.register_kv_cache(mine)
    one, many, starts = [], [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        kv.pull_kv_blocks(remote, target, pull_blocks, pull_blocks)
        one.append(time.perf_counter() - start)
        start = time.perf_counter()
        flights = [kv.pull_kv_blocks_async(remote, target, [b], [b]) for b in pull_blocks]
        starts.append(time.perf_counter() - start)
        for flight in flights:
            flight.wait(60_000)
        many.append(time.perf_counter() - start)
    # The same 64 copies started from native code (the route the pulls above used), with no
    # Python per pull: what the copies alone reach on this machine. The difference to the
    # 64 async pulls is what each pull's Python costs (start, wait, completion).
    engine = kv.remote.existing_engine()
    route = next((r for r in engine.routes.table.values() if r.local_id == target.cache_id), None)
    floor = []
    if route is not None:
        for _ in range(args.repeats):
            kv.pull_kv_blocks(remote, target, pull_blocks[:1], pull_blocks[:1])  # the lease lingers 50 ms
            start = time.perf_counter()
            jobs = [route.native.start_job([b], [b], False) for b in pull_blocks]
            for job in jobs:
                job.help(-1)
            took = time.perf_counter() - start
            if engine.peer_leases.shared.get(route.lease.key) is route.lease:  # still leased throughout
                floor.append(took)
    # What the 64 starts cost bounds what they can reach: the blocking pull copies on T
    # threads (same-host copies: the pool's workers and the waiting caller; NIXL: one), so
    # it needs about T x its time of CPU; the 64 pulls need that plus their starts' time,
    # spread over at most P cores.
    routes = kv.remote.existing_engine().paths
    threads = kv._C.peer_copy_threads() + 1 if routes.get("same_host") else 1
    cores = len(os.sched_getaffinity(0))
    blocking_s, starts_s = statistics.median(one), statistics.median(starts)
    pulls_bound = blocking_s / max((blocking_s * min(threads, cores) + starts_s) / cores, starts_s)
    pulled = 64 * 2 * args.layers * target.cache_desc.block_nbytes
    one_gbps, many_gbps = pulled / statistics.median(one) / 1e9, pulled / statistics.median(many) / 1e9
    from_main.put("exit")
    decoder.join(timeout=60)
    kv.finalize()

    result = {
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "layers": args.layers,
        "layer_mib": layer_bytes / 2**20,
        "push_ms_per_layer": push_s * 1e3,
        "work_reps_per_layer": reps,
        "prefill_to_first_token_ms": {"sequential": sequential * 1e3, "overlapped": overlapped * 1e3},
        "overlapped_over_sequential": overlapped / sequential,
        "compute_slowdown_beside_a_copy": slowdown,
        "overlap_best_reachable": min(1.0, overlap_bound),
        "phases_ms": {mode: {k: v * 1e3 for k, v in m.items()} for mode, m in median.items()},
        "pulls": {
            "bytes": pulled,
            "one_blocking_gbps": one_gbps,
            "64_async_gbps": many_gbps,
            "async_over_blocking": many_gbps / one_gbps,
            "starts_ms": starts_s * 1e3,
            "copy_threads": threads,
            "cores": cores,
            "best_reachable": min(1.0, pulls_bound),
            "native_starts_gbps": pulled / statistics.median(floor) / 1e9 if floor else None,
            "native_over_blocking": statistics.median(one) / statistics.median(floor) if floor else None,
            "python_us_per_pull": (statistics.median(many) - statistics.median(floor)) / 64 * 1e6 if floor else None,
        },
    }
    print(
        f"CPU: {result['cpu']}; {args.layers} layers, {result['layer_mib']:.1f} MiB per layer, "
        f"push {push_s * 1e3:.2f} ms per layer, layer work calibrated to match"
    )
    print(
        f"prefill start -> first token: sequential {sequential * 1e3:.1f} ms, overlapped "
        f"{overlapped * 1e3:.1f} ms, ratio {overlapped / sequential:.2f}x"
    )
    ov = median["overlapped"]
    print(
        f"phases (medians, ms): sequential compute {seq['compute'] * 1e3:.1f}, pushes after it "
        f"{seq['push_tail'] * 1e3:.1f}, last notice seen {seq['notice'] * 1e3:.2f}, token "
        f"{seq['first_token'] * 1e3:.2f}; overlapped compute {ov['compute'] * 1e3:.1f}, pushes after it "
        f"{ov['push_tail'] * 1e3:.1f}, last notice seen {ov['notice'] * 1e3:.2f}, token {ov['first_token'] * 1e3:.2f}"
    )
    print(
        f"layer work runs {slowdown:.2f}x slower beside a memory copy in another process; with the last "
        f"layer's push after its compute and the decoder's tail paid in both modes, overlapping can reach "
        f"about {min(1.0, overlap_bound):.2f}x of sequential on this machine at best (benchmarks/RESULTS.md)"
    )
    print(
        f"64 async pulls of one 32 KiB block (x{2 * args.layers} tensors) in flight: {many_gbps:.2f} GB/s; "
        f"one blocking pull of the same blocks: {one_gbps:.2f} GB/s; ratio {many_gbps / one_gbps:.2f}x"
    )
    print(
        f"the 64 starts take {starts_s * 1e3:.2f} ms of the starting thread; the blocking pull copies on "
        f"{threads} thread(s): on {cores} cores the 64 pulls can reach about {min(1.0, pulls_bound):.2f}x of it "
        "on this machine at best"
    )
    if floor:
        pulls = result["pulls"]
        print(
            f"the same 64 copies started from native code: {pulls['native_starts_gbps']:.2f} GB/s, "
            f"{pulls['native_over_blocking']:.2f}x of the blocking pull: each async pull's Python "
            f"(start, wait, completion) costs about {pulls['python_us_per_pull']:.1f} us of wall time here"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
