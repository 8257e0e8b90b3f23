"""vLLM disaggregated prefill/decode: torch_kvreg's connector against vLLM's NixlConnector.

The same model, the same prompts, the same two in-process vLLM engines (prefill and decode,
one process each), run with three KV paths one after the other, nothing else running:

- ``torch_kvreg``: TorchKvregConnector (kv_producer -> kv_consumer);
- ``nixl``: vLLM's own NixlConnector with ``kv_buffer_device: cpu``;
- ``recompute``: a plain decode instance that computes the prompt itself (the floor to beat).

For each path: the time from the decode request to its first token (``max_tokens=1``), the
median over fresh prompts after one warm-up request (which links). The KV load time is that
time less the first-token time of the same prompt already held in a plain instance's prefix
cache (what the decode costs without any transfer: with ``--tokens`` one more than a whole
number of blocks, that instance computes exactly one token, as a decode whose KV was loaded
does), so both connectors are measured the same way; torch_kvreg's own pull latency (its
stats) is printed beside it. The prompt's KV is at least 32 MiB (``--tokens`` x 32 KiB per
token for the default model).

    python benchmarks/bench_vllm.py [--tokens 1537] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import statistics
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))
import vllm_disaggregated as demo  # noqa: E402
from machine import cpu_model  # noqa: E402

MODEL = dict(
    vocab_size=512,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=2048,
)
KV_BYTES_PER_TOKEN = MODEL["num_hidden_layers"] * 2 * MODEL["num_key_value_heads"] * MODEL["head_dim"] * 4


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def nixl_env() -> dict:
    # Each NixlConnector instance serves its handshake on its own port (two on one host).
    return {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())}


NODE = dict(num_blocks=160, max_model_len=MODEL["max_position_embeddings"])


def run_pair(model: str, producer: dict, consumer: dict, prompts: list, logs: str) -> dict:
    # The prefill and the decode each on a core of their own, as on a real host.
    prefill = demo.Node(model, producer, log_path=f"{logs}-prefill.log", env=nixl_env(), cpus="0", **NODE)
    decode = demo.Node(model, consumer, log_path=f"{logs}-decode.log", env=nixl_env(), cpus="1", **NODE)
    times, tokens = [], []
    with prefill, decode:
        for i, prompt in enumerate(prompts):
            params = prefill.generate([prompt], 1, [demo.prefill_params()], timeout_s=600)["params"]
            answer = decode.generate([prompt], 1, params, stats=True, timeout_s=600)
            tokens.append(answer["tokens"][0])
            if i:  # the first request links: a warm-up
                times.append(answer["seconds"])
        stats = answer.get("stats")
    log = pathlib.Path(f"{logs}-decode.log").read_text()
    failed = log.count("load errors") + log.count("Recovered from KV load failure")
    return {"ttft_s": times, "tokens": tokens, "failed_loads": failed, "kvreg_stats": stats}


def run_plain(model: str, prompts: list, logs: str) -> dict:
    node = demo.Node(model, log_path=f"{logs}-plain.log", cpus="1", **NODE)
    fresh, cached, tokens = [], [], []
    with node:
        for i, prompt in enumerate(prompts):
            answer = node.generate([prompt], 1, timeout_s=600)
            again = node.generate([prompt], 1, timeout_s=600)  # its KV now in the prefix cache
            tokens.append(answer["tokens"][0])
            if i:
                fresh.append(answer["seconds"])
                cached.append(again["seconds"])
    return {"ttft_s": fresh, "cached_ttft_s": cached, "tokens": tokens}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1537)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    parser.add_argument("--logs", help="keep the engines' logs in this folder")
    args = parser.parse_args()
    if (args.tokens - 1) % demo.BLOCK_SIZE:
        parser.error(f"--tokens must be one more than a multiple of {demo.BLOCK_SIZE} (see the docstring)")
    import random

    rng = random.Random(0)
    prompts = [[rng.randrange(1, 500) for _ in range(args.tokens)] for _ in range(args.repeats + 1)]
    kv_mib = args.tokens * KV_BYTES_PER_TOKEN / 2**20
    print(f"CPU: {cpu_model()}; prompt {args.tokens} tokens, KV {kv_mib:.1f} MiB; {args.repeats} requests per path")
    with tempfile.TemporaryDirectory() as folder:
        model = demo.build_tiny_llama(os.path.join(folder, "llama"), seed=0, **MODEL)
        logs = os.path.join(args.logs or folder, "run")
        plain = run_plain(model, prompts, logs)
        kvreg = run_pair(
            model, demo.connector_config("kv_producer"), demo.connector_config("kv_consumer"), prompts, logs + "-kvreg"
        )
        nixl = run_pair(
            model, demo.nixl_config("kv_producer"), demo.nixl_config("kv_consumer"), prompts, logs + "-nixl"
        )
    floor = statistics.median(plain["cached_ttft_s"])
    rows = {
        "recompute": statistics.median(plain["ttft_s"]),
        "torch_kvreg": statistics.median(kvreg["ttft_s"]),
        "nixl": statistics.median(nixl["ttft_s"]),
    }
    load = {name: rows[name] - floor for name in ("torch_kvreg", "nixl")}
    print(f"decode first token with the prompt already cached (no transfer): {floor * 1000:.1f} ms")
    print(f"{'path':<12} {'first token ms':>15} {'vs recompute':>13} {'KV load ms':>11} {'tokens ok':>10}")
    for name, seconds in rows.items():
        same = (kvreg if name == "torch_kvreg" else nixl if name == "nixl" else plain)["tokens"] == plain["tokens"]
        load_text = f"{load[name] * 1000:11.1f}" if name in load else f"{'-':>11}"
        print(f"{name:<12} {seconds * 1000:15.1f} {seconds / rows['recompute']:12.2f}x {load_text} {str(same):>10}")
    ratio = load["torch_kvreg"] / load["nixl"] if load["nixl"] > 0 else float("nan")
    print(f"KV load, torch_kvreg / NixlConnector: {ratio:.2f}x (target at most 0.5x)")
    pull = (kvreg["kvreg_stats"] or {}).get("pull", {})
    if pull.get("latency_s", {}).get("p50") is not None:
        p50 = pull["latency_s"]["p50"]
        print(f"torch_kvreg's own pull p50: {p50 * 1000:.1f} ms ({kv_mib / 1024 / p50:.1f} GB/s)")
    print(f"failed loads: torch_kvreg {kvreg['failed_loads']}, nixl {nixl['failed_loads']}")
    if args.json:
        out = {
            "cpu": cpu_model(),
            "tokens": args.tokens,
            "kv_mib": kv_mib,
            "cached_ttft_s": plain["cached_ttft_s"],
            "recompute_ttft_s": plain["ttft_s"],
            "torch_kvreg_ttft_s": kvreg["ttft_s"],
            "nixl_ttft_s": nixl["ttft_s"],
            "load_ratio": ratio,
            "kvreg_pull": pull,
        }
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))
    ok = kvreg["tokens"] == plain["tokens"] and nixl["tokens"] == plain["tokens"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
