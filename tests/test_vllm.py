"""torch_kvreg's vLLM connector, driven by real vLLM engines (vLLM's CPU build): prefill and
decode in separate processes, as a proxy would run them (examples/vllm_disaggregated.py's
node processes), against one plain instance's tokens."""

import copy
import pathlib
import socket
import time
import zlib

import pytest

from vllm_engines import NEEDS_ENGINES, demo

pytestmark = NEEDS_ENGINES

MAX_TOKENS = 12
BLOCK_BYTES = 2 * 2 * demo.BLOCK_SIZE * 64 * 4  # layers x kv heads x block x (K and V of 32) x float32


def blocks_of(prompt):
    return -(-len(prompt) // demo.BLOCK_SIZE)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return {
        "a": demo.build_tiny_llama(str(folder / "a"), seed=0),
        "b": demo.build_tiny_llama(str(folder / "b"), seed=1),
    }


@pytest.fixture
def batch(request):
    """Prompts of this test alone: the decode's prefix cache keeps what earlier tests loaded."""
    return demo.prompts(count=5, seed=zlib.crc32(request.node.name.encode()))


@pytest.fixture(scope="module")
def engines(models, tmp_path_factory):
    """The in-process engines most tests share: the reference (weights A), a kv_both prefill
    with weights A, a kv_producer prefill with weights B, a kv_consumer decode with A."""
    logs = tmp_path_factory.mktemp("logs")
    nodes = {
        "reference": demo.Node(models["a"], log_path=str(logs / "reference.log")),
        "prefill": demo.Node(models["a"], demo.connector_config("kv_both"), log_path=str(logs / "prefill.log")),
        "prefill_b": demo.Node(models["b"], demo.connector_config("kv_producer"), log_path=str(logs / "prefill_b.log")),
        "decode": demo.Node(models["a"], demo.connector_config("kv_consumer"), log_path=str(logs / "decode.log")),
    }
    try:
        for node in nodes.values():
            node.ready()
        yield nodes
    finally:
        for node in nodes.values():
            node.close()


@pytest.fixture
def reference(engines, batch):
    return engines["reference"].generate(batch, MAX_TOKENS)["tokens"]


def prefill(node, prompts):
    answer = node.generate(prompts, 1, [demo.prefill_params() for _ in prompts])
    for params in answer["params"]:
        assert params["do_remote_prefill"] is True and params["transfer_mode"] == "torch_kvreg"
    return answer["params"]


def pull_figures(node):
    """torch_kvreg's pull counters in an in-process engine, with the paths its transfers took."""
    answer = node.generate([[1, 2, 3]], 1, stats=True)
    return {**answer["stats"]["pull"], "paths": answer["paths"]}


def test_in_process_engines_decode_what_one_instance_does(engines, batch, reference):
    params = prefill(engines["prefill"], batch)
    assert [len(p["remote_block_ids"]) for p in params] == [blocks_of(p) for p in batch]
    assert [p["remote_num_tokens"] for p in params] == [len(p) for p in batch]
    before = pull_figures(engines["decode"])
    tokens = engines["decode"].generate(batch, MAX_TOKENS, params)["tokens"]
    after = pull_figures(engines["decode"])
    assert all(len(t) == MAX_TOKENS for t in tokens)
    assert tokens == reference
    assert after["ops"] - before["ops"] == len(batch)  # one load per request, all landed
    assert after["bytes"] - before["bytes"] == sum(blocks_of(p) for p in batch) * BLOCK_BYTES
    assert after["failures"] == before["failures"]
    # vLLM allocated the prefill's CPU KV cache in the connector's shared memory: the decoder
    # mapped it, and every load was a local copy.
    mapped = after["paths"].get("mapped", 0) - before["paths"].get("mapped", 0)
    assert mapped >= len(batch) and after["paths"].get("same_host", 0) == before["paths"].get("same_host", 0)
    # Again: the decode's prefix cache holds every whole block but the last of each prompt
    # (vLLM recomputes at least one token), so only the blocks after the cached prefix load.
    params = prefill(engines["prefill"], batch)
    tokens = engines["decode"].generate(batch, MAX_TOKENS, params)["tokens"]
    again = pull_figures(engines["decode"])
    assert tokens == reference
    cached = sum((len(p) - 1) // demo.BLOCK_SIZE for p in batch)
    assert again["bytes"] - after["bytes"] == (sum(blocks_of(p) for p in batch) - cached) * BLOCK_BYTES


def test_decode_uses_the_loaded_kv(engines, batch, reference):
    # The same prompts prefilled by a model with other weights: the decode continues from
    # that KV, so its tokens change (a decode that recomputed would match the reference).
    params = prefill(engines["prefill_b"], batch)
    tokens = engines["decode"].generate(batch, MAX_TOKENS, params)["tokens"]
    assert all(len(t) == MAX_TOKENS for t in tokens)
    assert all(got != want for got, want in zip(tokens, reference))


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_bad_params_are_recomputed_and_leave_the_batch_alone(engines):
    batch = demo.prompts(count=8, seed=7)  # one prompt per request: a shared prefix would be cached
    reference = engines["reference"].generate(batch, MAX_TOKENS)["tokens"]
    good = prefill(engines["prefill_b"], batch[:1])[0]
    bad = {
        "missing field": {k: v for k, v in good.items() if k != "remote_cache_id"},
        "wrong type": dict(good, remote_block_ids="1,2"),
        # a cluster this decoder has no link to, at a port where nobody listens
        "nobody listening": dict(good, remote_port=free_port(), remote_cluster_id=good["remote_cluster_id"] ^ 1),
        "blocks out of range": dict(good, remote_block_ids=[10**6 + i for i in range(len(good["remote_block_ids"]))]),
        "no such cache": dict(good, remote_cache_id=10**9),
        "hold expired": dict(good, remote_expires_at=time.time() - 1),
    }
    # prompt 0 loads B's KV; every other prompt carries one bad case and must be recomputed
    prompts = batch[: len(bad) + 1]
    params = [copy.deepcopy(good)] + [dict(case, remote_request_id=good["remote_request_id"]) for case in bad.values()]
    log = pathlib.Path(engines["decode"].log_path)
    logged = log.read_text()
    tokens = engines["decode"].generate(prompts, MAX_TOKENS, params, timeout_s=120)["tokens"]
    assert all(len(t) == MAX_TOKENS for t in tokens)
    assert tokens[0] != reference[0]  # loaded from B
    for i, case in enumerate(bad, start=1):
        assert tokens[i] == reference[i], case
    new_lines = log.read_text()[len(logged) :]
    assert new_lines.count("recomputes its prompt") == 2  # refused by the scheduler: malformed
    assert new_lines.count("are reported as load errors") == 4  # refused or failed on the worker
    assert "stale kv_transfer_params" in new_lines and "LLM_KV_CACHE_NOT_EXIST" in new_lines
    # the engine goes on serving loads
    again = prefill(engines["prefill"], batch[7:])
    assert engines["decode"].generate(batch[7:], MAX_TOKENS, again)["tokens"] == reference[7:]


def test_prefill_killed_before_and_during_the_load(models, engines, batch, reference, tmp_path):
    victim = demo.Node(models["a"], demo.connector_config("kv_producer"), log_path=str(tmp_path / "victim.log"))
    with victim:
        params = prefill(victim, batch)
        victim.kill()
    before = pull_figures(engines["decode"])
    log = pathlib.Path(engines["decode"].log_path)
    logged = len(log.read_text())
    tokens = engines["decode"].generate(batch, MAX_TOKENS, params, timeout_s=120)["tokens"]
    assert tokens == reference and all(len(t) == MAX_TOKENS for t in tokens)
    assert log.read_text()[logged:].count("are reported as load errors") == len(batch)
    assert pull_figures(engines["decode"])["bytes"] == before["bytes"]

    victim = demo.Node(models["a"], demo.connector_config("kv_producer"), log_path=str(tmp_path / "victim2.log"))
    with victim:
        params = prefill(victim, batch)
        engines["decode"].send(batch, MAX_TOKENS, params)
        victim.kill()  # while the decoder links and reads
        tokens = engines["decode"].answer(timeout_s=120)["tokens"]
    assert tokens == reference and all(len(t) == MAX_TOKENS for t in tokens)


def test_multiprocess_engines_decode_what_one_instance_does(models, batch, reference, tmp_path):
    prefill_node = demo.Node(
        models["a"], demo.connector_config("kv_producer"), multiprocess=True, log_path=str(tmp_path / "p.log"), cpus="0"
    )
    decode_node = demo.Node(
        models["a"], demo.connector_config("kv_consumer"), multiprocess=True, log_path=str(tmp_path / "d.log"), cpus="1"
    )
    with prefill_node, decode_node:
        params = prefill(prefill_node, batch)
        tokens = decode_node.generate(batch, MAX_TOKENS, params)["tokens"]
        assert tokens == reference and all(len(t) == MAX_TOKENS for t in tokens)
        # the producer freed the blocks on the decoder's notices: a second round fits too
        params = prefill(prefill_node, batch)
        assert decode_node.generate(batch, MAX_TOKENS, params)["tokens"] == reference
    assert "load errors" not in (tmp_path / "d.log").read_text()


@pytest.mark.slow
def test_decode_with_larger_blocks_than_the_prefill_loads_tokens(models, batch, tmp_path):
    """A decode engine whose blocks hold 64 tokens loads the prompts' KV from a prefill
    whose blocks hold 32 (both vLLM's CPU layout, K tiles dim-major): the connector pulls
    tokens, not blocks, and the decode generates what one instance does."""
    reference_node = demo.Node(models["a"], log_path=str(tmp_path / "r.log"))
    prefill_node = demo.Node(models["a"], demo.connector_config("kv_producer"), log_path=str(tmp_path / "p32.log"))
    decode = demo.Node(
        models["a"], demo.connector_config("kv_consumer"), log_path=str(tmp_path / "d64.log"), block_size=64
    )
    with reference_node, prefill_node, decode:
        reference = reference_node.generate(batch, MAX_TOKENS)["tokens"]
        params = prefill(prefill_node, batch)
        assert all(p["remote_geometry"]["block_size"] == demo.BLOCK_SIZE for p in params)
        assert all(p["remote_geometry"]["layout"] == "vllm_cpu" for p in params)
        before = pull_figures(decode)
        tokens = decode.generate(batch, MAX_TOKENS, params)["tokens"]
        after = pull_figures(decode)
    assert all(len(t) == MAX_TOKENS for t in tokens) and tokens == reference
    assert after["ops"] - before["ops"] == len(batch) and after["failures"] == before["failures"]
    token_bytes = BLOCK_BYTES // demo.BLOCK_SIZE
    assert after["bytes"] - before["bytes"] == sum(len(p) for p in batch) * token_bytes  # the tokens, not blocks
    assert "load errors" not in (tmp_path / "d64.log").read_text()
