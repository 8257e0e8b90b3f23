"""vLLM disaggregated prefill/decode over torch_kvreg's KV connector (``make demo-vllm``).

A small Llama is built locally with random weights (nothing is downloaded). Three vLLM
engines run in three processes: one plain instance (the reference), a prefill instance
(``kv_producer``) and a decode instance (``kv_consumer``). The prefill runs each prompt with
``max_tokens=1`` and ``do_remote_decode``; its output's kv_transfer_params go unchanged into
the decode request, whose engine loads the prompt's KV from the prefill process and
generates. The decode's tokens must equal the reference's.

    python examples/vllm_disaggregated.py                 # in-process engines
    python examples/vllm_disaggregated.py --multiprocess  # vLLM's default engine processes

Each engine process is this file run as ``node``: it reads one JSON request per line on
stdin and answers one JSON line on stdout (the tests drive it the same way).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

BLOCK_SIZE = 32
MAX_MODEL_LEN = 512


def build_tiny_llama(path: str, seed: int = 0, **overrides: Any) -> str:
    """Saves a randomly initialised Llama (float32) to ``path``; the same seed gives the
    same weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=MAX_MODEL_LEN,
        torch_dtype="float32",
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    model.save_pretrained(path)
    return path


def connector_config(role: str, extra: dict | None = None) -> dict:
    """kv_transfer_config for torch_kvreg's connector."""
    return {
        "kv_connector": "TorchKvregConnector",
        "kv_connector_module_path": "torch_kvreg.vllm",
        "kv_role": role,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra or {},
    }


def nixl_config(role: str) -> dict:
    """kv_transfer_config for vLLM's own NixlConnector with a CPU buffer (the baseline)."""
    return {
        "kv_connector": "NixlConnector",
        "kv_role": role,
        "kv_buffer_device": "cpu",
        "kv_load_failure_policy": "recompute",
    }


def run_node(
    model: str,
    kv_transfer_config: dict | None,
    num_blocks: int,
    max_model_len: int = MAX_MODEL_LEN,
    block_size: int = BLOCK_SIZE,
) -> None:
    """Serves generate requests from stdin on one vLLM engine (see the module docstring)."""
    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = dict(
        model=model,
        skip_tokenizer_init=True,
        dtype="float32",
        enforce_eager=True,
        max_model_len=max_model_len,
        block_size=block_size,
        num_gpu_blocks_override=num_blocks,
        seed=0,
    )
    if kv_transfer_config is not None:
        kwargs["kv_transfer_config"] = kv_transfer_config
    llm = LLM(**kwargs)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") == "exit":
            break
        params = request.get("params") or [None] * len(request["prompts"])
        sampling = [
            SamplingParams(
                temperature=0,
                ignore_eos=True,
                detokenize=False,
                max_tokens=request["max_tokens"],
                extra_args=None if p is None else {"kv_transfer_params": p},
            )
            for p in params
        ]
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in request["prompts"]], sampling, use_tqdm=False)
        seconds = time.perf_counter() - start
        reply = {
            "tokens": [list(out.outputs[0].token_ids) for out in outputs],
            "params": [out.kv_transfer_params for out in outputs],
            "seconds": seconds,
        }
        if request.get("stats"):
            import torch_kvreg

            reply["stats"] = torch_kvreg.stats() if torch_kvreg.is_initialized() else None
            engine = torch_kvreg.remote.existing_engine() if torch_kvreg.is_initialized() else None
            # How its transfers went: "mapped" (the peer's cache mapped here), "same_host", "nixl".
            reply["paths"] = {} if engine is None else dict(engine.paths)
        print(json.dumps(reply), flush=True)
    del llm


class Node:
    """One engine process (``node`` mode of this file), driven over its stdin and stdout."""

    def __init__(
        self,
        model: str,
        kv_transfer_config: dict | None = None,
        *,
        multiprocess: bool = False,
        num_blocks: int = 64,
        env: dict | None = None,
        log_path: str | None = None,
        cpus: str | None = None,
        max_model_len: int = MAX_MODEL_LEN,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        environ = dict(os.environ)
        environ.update(
            VLLM_ENABLE_V1_MULTIPROCESSING="1" if multiprocess else "0",
            VLLM_CPU_KVCACHE_SPACE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        if cpus is not None:
            # vLLM's CPU worker spins while it waits for the next step: two instances bound to
            # one core starve each other (and the connector's threads), so each gets its own.
            environ["VLLM_CPU_OMP_THREADS_BIND"] = cpus
        environ.update(env or {})
        command = [sys.executable, os.path.abspath(__file__), "node", "--model", model, "--num-blocks", str(num_blocks)]
        command += ["--max-model-len", str(max_model_len), "--block-size", str(block_size)]
        if kv_transfer_config is not None:
            command += ["--kv-transfer-config", json.dumps(kv_transfer_config)]
        self.log_path = log_path or tempfile.mkstemp(prefix="vllm-node-", suffix=".log")[1]
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=environ,
            start_new_session=True,  # kill() reaches vLLM's engine processes too
        )
        self._ready = False
        self._lines: queue.Queue[dict | None] = queue.Queue()
        threading.Thread(target=self._read_lines, daemon=True).start()

    def ready(self, timeout_s: float = 300) -> Node:
        """Waits until the engine has started (nodes started together start in parallel)."""
        if not self._ready:
            self._expect(timeout_s)
            self._ready = True
        return self

    def _read_lines(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("{"):
                self._lines.put(json.loads(line))
        self._lines.put(None)  # the process closed its stdout: it exited

    def _expect(self, timeout_s: float) -> dict:
        try:
            answer = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"no answer from the engine in {timeout_s} s; its log: {self.log_path}") from None
        if answer is None:
            self._lines.put(None)
            raise RuntimeError(f"the engine process exited ({self.process.wait()}); its log: {self.log_path}")
        return answer

    def generate(
        self,
        prompts: list[list[int]],
        max_tokens: int,
        params: list[dict | None] | None = None,
        *,
        stats: bool = False,
        timeout_s: float = 300,
    ) -> dict:
        self.send(prompts, max_tokens, params, stats=stats)
        return self.answer(timeout_s)

    def send(
        self, prompts: list[list[int]], max_tokens: int, params: list[dict | None] | None = None, *, stats: bool = False
    ) -> None:
        self.ready()
        assert self.process.stdin is not None
        request = {"op": "generate", "prompts": prompts, "max_tokens": max_tokens, "params": params, "stats": stats}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()

    def answer(self, timeout_s: float = 300) -> dict:
        return self._expect(timeout_s)

    def kill(self) -> None:
        """SIGKILL to the engine and every process it started."""
        import signal

        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def close(self, timeout_s: float = 60) -> int:
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.process.stdin.close()
                self.process.wait(timeout_s)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        self._log.close()
        return self.process.returncode

    def __enter__(self) -> Node:
        return self.ready()

    def __exit__(self, *exc: object) -> None:
        self.close()


def prefill_params() -> dict:
    """What a proxy puts on the prefill request (NixlConnector's flow)."""
    return {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }


def prompts(count: int = 3, seed: int = 1) -> list[list[int]]:
    """Prompts of lengths whose last block is partial (BLOCK_SIZE is 32) and one of whole blocks."""
    import random

    rng = random.Random(seed)
    lengths = [45, 96, 130, 70, 33, 64, 100, 81][:count]
    return [[rng.randrange(1, 500) for _ in range(length)] for length in lengths]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--multiprocess", action="store_true", help="vLLM's multiprocess engines")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model = build_tiny_llama(os.path.join(folder, "llama"))
        batch = prompts()
        with Node(model, multiprocess=args.multiprocess) as reference:
            expected = reference.generate(batch, args.max_tokens)["tokens"]
        cores = ("0", "1") if (os.cpu_count() or 1) > 1 else (None, None)
        prefill = Node(model, connector_config("kv_producer"), multiprocess=args.multiprocess, cpus=cores[0])
        decode = Node(model, connector_config("kv_consumer"), multiprocess=args.multiprocess, cpus=cores[1])
        with prefill, decode:
            first = prefill.generate(batch, 1, [prefill_params() for _ in batch])
            start = time.perf_counter()
            answer = decode.generate(batch, args.max_tokens, first["params"])
            seconds = time.perf_counter() - start
    for i, (want, got) in enumerate(zip(expected, answer["tokens"])):
        print(f"prompt {i} ({len(batch[i])} tokens)\n  one instance: {want}\n  prefill+decode: {got}")
    same = all(len(got) == args.max_tokens for got in answer["tokens"]) and answer["tokens"] == expected
    print(f"decode took {seconds:.2f} s; tokens {'equal' if same else 'DIFFER'}")
    return 0 if same else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "node":
        node_parser = argparse.ArgumentParser()
        node_parser.add_argument("node")
        node_parser.add_argument("--model", required=True)
        node_parser.add_argument("--kv-transfer-config", default=None)
        node_parser.add_argument("--num-blocks", type=int, default=64)
        node_parser.add_argument("--max-model-len", type=int, default=MAX_MODEL_LEN)
        node_parser.add_argument("--block-size", type=int, default=BLOCK_SIZE)
        node_args = node_parser.parse_args()
        config = None if node_args.kv_transfer_config is None else json.loads(node_args.kv_transfer_config)
        run_node(node_args.model, config, node_args.num_blocks, node_args.max_model_len, node_args.block_size)
        sys.exit(0)
    sys.exit(main())
