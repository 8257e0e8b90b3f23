"""Programs written the LLM-DataDist way (examples/llm_datadist/: the flows of upstream's
push_blocks, switch_role, push_cache and transfer_cache_async samples) run as two processes
on 127.0.0.1, and the tensors they log hold what upstream's would."""

import json
import pathlib
import socket
import subprocess
import sys

import pytest

import torch_kvreg as kv

pytestmark = pytest.mark.skipif(not kv.remote.nixl_available(), reason="needs the nixl extra")
PROGRAMS = pathlib.Path(__file__).resolve().parent.parent / "examples" / "llm_datadist"
ONES, ZEROS = [1.0] * 10, [0.0] * 10
# program -> {(role, logged label): the 3x10 tensor upstream's sample would log}
EXPECTED = {
    "push_blocks": {  # the decoder's zero blocks 0, 1 land in the prompt's blocks 0, 2
        ("p", "after_decoder_push"): [ZEROS, ONES, ZEROS],
        ("p", "after_decoder_push_tensor2"): [ZEROS, ONES, ZEROS],
    },
    "switch_role": {  # pulled [0, 1] -> [0, 2], then pushed back whole after the role switch
        ("d", "after_decoder_pull"): [ONES, ZEROS, ONES],
        ("d", "after_decoder_pull_tensor2"): [ONES, ZEROS, ONES],
        ("p", "after_decoder_push"): [ONES, ZEROS, ONES],
        ("p", "after_decoder_push_tensor2"): [ONES, ZEROS, ONES],
    },
    "push_cache": {  # the decoder's slot 0 (ones) into the prompt's cache id 1, slot 0
        ("p", "after_decoder_push"): [ONES, ZEROS, ZEROS],
        ("p", "after_decoder_push_tensor2"): [ONES, ZEROS, ZEROS],
    },
    "transfer_cache_async": {  # layer 0 (both tensors), every block
        ("d", "after_prompt_transfer_cache"): [ONES, ONES, ONES],
        ("d", "after_prompt_transfer_cache_tensor2"): [ONES, ONES, ONES],
    },
}


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_pair(program: str) -> dict:
    prompt_port, decoder_port, master_port = free_ports(3)
    command = [
        sys.executable,
        str(PROGRAMS / f"{program}.py"),
        "--prompt_port",
        str(prompt_port),
        "--decoder_port",
        str(decoder_port),
        "--master_port",
        str(master_port),
    ]
    procs = {
        role: subprocess.Popen(command + ["--role", role], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for role in ("p", "d")
    }
    logs = {}
    try:
        for role, proc in procs.items():
            logs[role] = proc.communicate(timeout=240)[0]
    finally:
        for proc in procs.values():
            proc.kill()
    for role, proc in procs.items():
        assert proc.returncode == 0, f"{program} --role {role} failed:\n{logs[role][-3000:]}"
        assert "Sample end" in logs[role]
    results = {}
    for role, log in logs.items():
        for line in log.splitlines():
            if " RESULT " in line:
                label, values = line.split(" RESULT ", 1)[1].split(" ", 1)
                results[(role, label)] = json.loads(values)
    return results


@pytest.mark.parametrize("program", sorted(EXPECTED))
def test_program_logs_what_upstream_would(program):
    results = run_pair(program)
    assert results == EXPECTED[program]
