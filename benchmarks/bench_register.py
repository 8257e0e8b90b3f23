"""register + unregister of a 240-tensor cache: Python API, raw op, and baselines in one run.

Baselines: a plain-Python dict registry doing the same bookkeeping (ids, addresses, byte
overlap check), and a plain torch.ops call taking the same 240-tensor list
(aten.broadcast_tensors, which only makes views), to show the op dispatch overhead.

    python benchmarks/bench_register.py [--iters 2000] [--json out.json]
"""

import argparse
import bisect
import json
import platform
import time

import torch

import torch_kvreg as kv


class DictRegistry:
    """The least a registry must do, in plain Python."""

    def __init__(self):
        self.next_id = 1
        self.caches = {}
        self.starts = []  # sorted (start, end, id)

    def register(self, tensors):
        ranges = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors)
        for start, end in ranges:
            i = bisect.bisect_left(self.starts, (end,))
            if i and self.starts[i - 1][1] > start:
                raise ValueError("overlap")
        cache_id = self.next_id
        self.next_id += 1
        for start, end in ranges:
            bisect.insort(self.starts, (start, end, cache_id))
        self.caches[cache_id] = (tuple(tensors), ranges)
        return cache_id

    def unregister(self, cache_id):
        _, ranges = self.caches.pop(cache_id)
        for start, end in ranges:
            del self.starts[bisect.bisect_left(self.starts, (start, end, cache_id))]


def per_call_us(fn, iters):
    fn()  # warm-up
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - start) / iters)
    return best * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=400)
    parser.add_argument("--tensors", type=int, default=240)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    kv.initialize()
    tensors = [torch.zeros(64, 16, 8, 16, dtype=torch.float16) for _ in range(args.tensors)]
    no_pin = kv.RegisterCfg(pin_host_memory=False)
    baseline = DictRegistry()

    def python_api():
        kv.unregister_kv_cache(kv.register_kv_cache(tensors, no_pin))

    def raw_op():
        torch.ops.llm.unregister_kv_cache(torch.ops.llm.register_kv_cache(tensors, False))

    def dict_registry():
        baseline.unregister(baseline.register(tensors))

    def plain_torch_ops():  # two dispatches with the same list, like register + unregister
        torch.ops.aten.broadcast_tensors(tensors)
        torch.ops.aten.broadcast_tensors(tensors)

    results = {
        name: per_call_us(fn, args.iters)
        for name, fn in [
            ("python_api", python_api),
            ("raw_op", raw_op),
            ("dict_registry", dict_registry),
            ("plain_torch_ops", plain_torch_ops),
        ]
    }
    kv.finalize()

    print(
        f"register + unregister of a {args.tensors}-tensor cache, CPU, no pinning "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__})"
    )
    print(f"{'path':<18}{'us/call':>10}{'vs dict registry':>18}{'vs plain torch.ops':>20}")
    for name, us in results.items():
        print(f"{name:<18}{us:>10.1f}{results['dict_registry'] / us:>17.2f}x{us / results['plain_torch_ops']:>19.2f}x")
    print(
        "(vs dict registry: >1 means faster than the baseline; vs plain torch.ops: the op's "
        "cost as a multiple of two plain dispatches of the same list)"
    )
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"tensors": args.tensors, "us_per_call": results, "torch": torch.__version__}, out, indent=2)


if __name__ == "__main__":
    main()
