"""The vLLM connector's parts without an engine: settings, kv_transfer_params, the scheduler
side's bookkeeping, the worker side's notices, stats and Prometheus metrics, and vLLM's CPU
cache layout."""

import dataclasses
import logging
import types

import pytest
import torch

import torch_kvreg as kv

from conftest import run_python
from vllm_engines import HAVE_VLLM


def test_importing_torch_kvreg_never_imports_vllm():
    result = run_python("import sys, torch_kvreg; assert 'vllm' not in sys.modules, 'vllm imported'; print('ok')")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_vllm_cpu_layer_views_of_one_storage_register_one_tensor_per_layer(kv):
    layers, blocks, heads, block_size, head = 3, 8, 2, 32, 16
    storage = torch.randn(layers * blocks * heads * block_size * 2 * head)
    views = {
        f"model.layers.{i}.self_attn.attn": storage[
            i * storage.numel() // layers : (i + 1) * storage.numel() // layers
        ].view(blocks, heads, block_size, 2 * head)
        for i in range(layers)
    }
    cache = kv.register_layer_caches(views)
    assert cache.cache_desc.num_tensors == layers and cache.tensors_per_layer == 1
    assert cache.cache_desc.shape == (blocks, heads, block_size, 2 * head)
    assert cache.layer("model.layers.2.self_attn.attn") == 2
    kv.copy_kv_blocks(cache, cache, [1, 2], [5, 6])
    for view in views.values():
        assert torch.equal(view[5], view[1]) and torch.equal(view[6], view[2])
    strided = torch.zeros(blocks, layers, heads, block_size, 2 * head)[:, 0]
    with pytest.raises(kv.LLMParamInvalidError, match="neither contiguous"):
        kv.register_layer_caches({"x": strided})
    with pytest.raises(kv.LLMParamInvalidError, match=r"vllm_cpu layers are \(N, H, B, 2\*D\)"):
        kv.register_layer_caches({"x": torch.zeros(4, 2, 32, 15)})
    assert kv.usage().num_caches == 1


@pytest.fixture(scope="module")
def vk():
    if not HAVE_VLLM:
        pytest.skip("needs the vllm extra (vllm-cpu)")
    from torch_kvreg import vllm as connector_module

    return connector_module


def good_params(vk, **changes):
    source = vk.RemoteSource("engine", "req-1", "127.0.0.1", 4000, 7, 3, (10, 11, 12), 32, 70, 4e9)
    params = source.to_params()
    params.update(changes)
    return params


def test_settings_defaults_and_checks(vk, monkeypatch):
    monkeypatch.delenv("TORCH_KVREG_LINK_SECRET", raising=False)
    settings = vk.ConnectorSettings.from_extra_config(None)
    assert settings.listen_address == "127.0.0.1:0" and settings.link_secret is None
    monkeypatch.setenv("TORCH_KVREG_LINK_SECRET", "s3cret-value")
    settings = vk.ConnectorSettings.from_extra_config({"link_timeout_ms": 500, "hold_timeout_s": 2.5})
    assert settings.link_secret == "s3cret-value" and "s3cret-value" not in repr(settings)
    assert settings.link_timeout_ms == 500 and settings.hold_timeout_s == 2.5
    cases = [
        ({"listen_adress": "127.0.0.1:0"}, kv.LLMParamInvalidError, "unknown keys"),
        ({"listen_address": "nowhere"}, kv.LLMParamInvalidError, "is not 'ip:port'"),
        ({"listen_address": 5}, kv.LLMTypeError, "must be a str"),
        ({"link_timeout_ms": "3000"}, kv.LLMTypeError, "must be a number"),
        ({"transfer_timeout_ms": 0}, kv.LLMParamInvalidError, "must be positive"),
        ({"hold_timeout_s": float("nan")}, kv.LLMParamInvalidError, "must be positive"),
        ({"max_concurrent_loads": 1.5}, kv.LLMParamInvalidError, "must be whole"),
        ({"link_secret": ""}, kv.LLMParamInvalidError, "non-empty"),
        (["listen_address"], kv.LLMTypeError, "must be a dict"),
    ]
    for extra, error, text in cases:
        with pytest.raises(error, match=text) as info:
            vk.ConnectorSettings.from_extra_config(extra)
        assert info.value.status_code in (kv.LLMStatusCode.LLM_PARAM_INVALID, kv.LLMStatusCode.LLM_PARAM_INVALID)


def test_remote_source_names_the_field_that_is_wrong(vk):
    source = vk.RemoteSource.from_params(good_params(vk))
    assert source.block_ids == (10, 11, 12) and source.num_tokens == 70 and source.notice() == b"torch_kvreg.vllm:req-1"
    assert vk.RemoteSource.from_params(good_params(vk, remote_block_ids=[[10, 11, 12]])).block_ids == (10, 11, 12)
    cases = {
        "remote_cache_id": good_params(vk, remote_cache_id=None),
        "remote_host": good_params(vk, remote_host=""),
        "remote_port": good_params(vk, remote_port=70000),
        "remote_block_ids": good_params(vk, remote_block_ids=[1, -2, 3]),
        "transfer_mode": good_params(vk, transfer_mode="nixl"),
        "4 blocks of 32": good_params(vk, remote_num_tokens=97),
        "remote_expires_at": good_params(vk, remote_expires_at="soon"),
        "remote_cluster_id": good_params(vk, remote_cluster_id=True),
    }
    for name, params in cases.items():
        with pytest.raises(kv.LLMParamInvalidError, match=name) as info:
            vk.RemoteSource.from_params(params)
        assert info.value.status_code == kv.LLMStatusCode.LLM_PARAM_INVALID
    with pytest.raises(kv.LLMParamInvalidError, match="must be a dict"):
        vk.RemoteSource.from_params(["not", "params"])


class FakeBlock:
    def __init__(self, block_id, cached):
        self.block_id, self.block_hash, self.is_null = block_id, ("h" if cached else None), False


def fake_request(request_id, params, prompt_len=70, status="FINISHED_LENGTH_CAPPED", computed=70):
    return types.SimpleNamespace(
        request_id=request_id,
        kv_transfer_params=params,
        num_prompt_tokens=prompt_len,
        num_computed_tokens=computed,
        status=types.SimpleNamespace(name=status),
    )


def scheduler(vk, producer=True, consumer=True, hold_s=30.0):
    from torch_kvreg.vllm.scheduler import SchedulerSide

    settings = vk.ConnectorSettings(hold_timeout_s=hold_s)
    side = SchedulerSide(settings, engine_id="eng", producer=producer, consumer=consumer, block_size=32)
    side.set_address(vk.ProducerAddress("127.0.0.1", 4000, 7, 3, 32, 64))
    return side


def test_scheduler_side_producer_offers_the_prompt_blocks(vk):
    side = scheduler(vk, consumer=False)
    request = fake_request("r1", {"do_remote_decode": True}, computed=70)
    delay, params = side.request_finished(request, ([4, 5, 6, 9],))  # a fourth block beyond the 70 tokens
    assert delay is True
    assert params["remote_block_ids"] == [4, 5, 6] and params["remote_num_tokens"] == 70
    assert params["remote_request_id"] == "r1" and params["remote_port"] == 4000 and params["do_remote_prefill"]
    loads, sends = side.take_step()
    assert loads == {} and list(sends) == ["r1"] and sends["r1"] == params["remote_expires_at"]
    assert side.take_step() == ({}, {})
    aborted = fake_request("r2", {"do_remote_decode": True}, status="FINISHED_ABORTED")
    assert side.request_finished(aborted, [[1]]) == (False, None)
    assert side.request_finished(fake_request("r3", None), [[1]]) == (False, None)
    assert scheduler(vk, producer=False).request_finished(fake_request("r4", {"do_remote_decode": True}), [[1]]) == (
        False,
        None,
    )


def test_scheduler_side_consumer_plans_loads_after_a_cached_prefix(vk):
    side = scheduler(vk, producer=False)
    params = good_params(vk)
    request = fake_request("d1", params, prompt_len=70, computed=0)
    assert side.num_new_matched_tokens(request, 32) == (38, True)
    blocks = types.SimpleNamespace(blocks=[[FakeBlock(20, True), FakeBlock(21, False), FakeBlock(22, False)]])
    side.update_state_after_alloc(request, blocks, 38)
    assert params["do_remote_prefill"] is False
    loads, _ = side.take_step()
    assert loads["d1"].block_pairs() == ([11, 12], [21, 22])
    # loaded once: a second allocation for the same request plans nothing
    side.update_state_after_alloc(request, blocks, 0)
    assert side.take_step() == ({}, {})


def test_scheduler_side_consumer_recomputes_what_it_cannot_load(vk, caplog):
    side = scheduler(vk, producer=False)
    caplog.set_level(logging.WARNING, "torch_kvreg.vllm")
    cases = [
        good_params(vk, remote_port="4000"),
        good_params(vk, remote_block_size=16, remote_block_ids=[1, 2, 3, 4, 5]),
        {"do_remote_prefill": True},
    ]
    for i, params in enumerate(cases):
        assert side.num_new_matched_tokens(fake_request(f"x{i}", params), 0) == (0, False)
        assert params["do_remote_prefill"] is False
    assert caplog.text.count("recomputes its prompt") == len(cases)
    fully_cached = good_params(vk)
    assert side.num_new_matched_tokens(fake_request("y", fully_cached, prompt_len=70), 70) == (0, False)
    assert scheduler(vk, consumer=False).num_new_matched_tokens(fake_request("z", good_params(vk)), 0) == (0, False)
    # a request that ends before its load is planned leaves nothing behind
    params = good_params(vk)
    request = fake_request("w", params, computed=0)
    assert side.num_new_matched_tokens(request, 0) == (70, True)
    assert side.request_finished(request, [[]]) == (False, None)
    assert side.take_step() == ({}, {}) and side._sources == {}


def test_worker_side_matches_notices_and_frees_expired_holds(vk, monkeypatch, caplog):
    from torch_kvreg.vllm import worker as worker_module

    arriving = []
    monkeypatch.setattr(worker_module, "get_notifications", lambda: [arriving.pop() for _ in list(arriving)])
    side = worker_module.WorkerSide(vk.ConnectorSettings(), producer=True, consumer=False, block_size=32)
    now = __import__("time").time()
    arriving.append(kv.Notification(7, b"torch_kvreg.vllm:early"))  # before the scheduler's word
    arriving.append(kv.Notification(7, b"something else"))
    assert side.finished() == (set(), set())
    side.add_sends({"early": now + 60, "read": now + 60, "late": now - 1})
    arriving.append(kv.Notification(7, b"torch_kvreg.vllm:read"))
    caplog.set_level(logging.WARNING, "torch_kvreg.vllm")
    assert side.finished() == ({"early", "read", "late"}, set())
    assert "no decoder read request late's KV in time" in caplog.text
    figures = side.take_figures()
    assert figures.sent == 2 and figures.expired == 1 and side.take_figures() is None


def test_worker_side_load_errors_are_reported_once(vk, monkeypatch):
    from torch_kvreg.vllm import worker as worker_module

    side = worker_module.WorkerSide(vk.ConnectorSettings(), producer=False, consumer=True, block_size=32)
    source = vk.RemoteSource.from_params(good_params(vk))
    side.start_loads({"d": vk.LoadSpec(source, (3, 4, 5))})  # not registered: the load fails at once
    sending, recving = side.finished()
    assert recving == {"d"} and side.load_errors() == {3, 4, 5} and side.load_errors() == set()
    assert side.take_figures().failed_loads == 1


def fake_vllm_config(role="kv_both", extra=None, tp=1, pp=1):
    transfer = types.SimpleNamespace(
        kv_role=role,
        kv_connector_extra_config=extra or {},
        is_kv_producer=role in ("kv_producer", "kv_both"),
        is_kv_consumer=role in ("kv_consumer", "kv_both"),
        engine_id="e",
    )
    return types.SimpleNamespace(
        kv_transfer_config=transfer,
        parallel_config=types.SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp),
        cache_config=types.SimpleNamespace(block_size=32),
    )


def test_connector_refuses_what_it_cannot_serve(vk):
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    with pytest.raises(kv.LLMParamInvalidError, match="kv_role 'kv_sideways'"):
        vk.TorchKvregConnector(fake_vllm_config("kv_sideways"), KVConnectorRole.SCHEDULER)
    with pytest.raises(kv.LLMParamInvalidError, match="unknown keys"):
        vk.TorchKvregConnector(fake_vllm_config(extra={"port": 1}), KVConnectorRole.WORKER)
    with pytest.raises(kv.LLMException, match="parallel size 1") as info:
        vk.TorchKvregConnector(fake_vllm_config(pp=2), KVConnectorRole.WORKER)
    assert info.value.status_code == kv.LLMStatusCode.LLM_FEATURE_NOT_ENABLED
    connector = vk.TorchKvregConnector(fake_vllm_config(), KVConnectorRole.SCHEDULER)
    assert connector.build_connector_meta(None) == vk.TorchKvregMetadata()


def test_stats_aggregate_reduce_and_reach_prometheus(vk):
    import prometheus_client
    from prometheus_client import Counter, Gauge, Histogram

    one = vk.TorchKvregConnector.build_kv_connector_stats(
        {"loads": 2, "failed_loads": 1, "bytes": 4_000_000, "sent": 0, "expired": 0, "load_seconds": [0.002, 0.004]}
    )
    other = vk.TorchKvregStats(data={"loads": 1, "bytes": 2_000_000, "load_seconds": [0.006]})
    total = one.aggregate(other)
    reduced = total.reduce()
    assert reduced["loads"] == 3 and reduced["failed_loads"] == 1 and reduced["bytes"] == 6_000_000
    assert reduced["load_p50_ms"] == 4.0 and reduced["load_max_ms"] == 6.0 and reduced["load_GBps"] == 0.5
    assert not total.is_empty() and vk.TorchKvregStats().is_empty()

    registry = prometheus_client.CollectorRegistry()
    types_ = {
        Gauge: lambda **kw: Gauge(registry=registry, **kw),
        Counter: lambda **kw: Counter(registry=registry, **kw),
        Histogram: lambda **kw: Histogram(registry=registry, **kw),
    }
    config = types.SimpleNamespace(kv_transfer_config=None)
    metrics = vk.TorchKvregConnector.build_prom_metrics(config, types_, ["engine"], {0: ["0"], 1: ["1"]})
    metrics.observe(total.data, engine_idx=1)
    sample = registry.get_sample_value
    assert sample("vllm:torch_kvreg_loads_total", {"engine": "1"}) == 3
    assert sample("vllm:torch_kvreg_bytes_total", {"engine": "1"}) == 6_000_000
    assert sample("vllm:torch_kvreg_failed_loads_total", {"engine": "1"}) == 1
    assert sample("vllm:torch_kvreg_load_seconds_count", {"engine": "1"}) == 3
    assert sample("vllm:torch_kvreg_loads_total", {"engine": "0"}) == 0


def test_the_worker_has_vllm_allocate_its_cpu_kv_cache_in_shared_memory(vk):
    """vLLM's worker allocates the KV cache inside the connector's get_mem_pool_context
    (Worker.initialize_from_config, inherited by the CPU worker): one int8 backing buffer,
    which lands in shared memory there, so that a same-host decoder maps it."""
    import inspect

    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.worker import utils as worker_utils

    from torch_kvreg import allocate

    # The call the context recognizes is the one vLLM makes (source of the installed version).
    assert "torch.zeros(buf_size, dtype=torch.int8, device=device)" in inspect.getsource(worker_utils.allocate_kv_cache)
    scheduler = vk.TorchKvregConnector(fake_vllm_config(), KVConnectorRole.SCHEDULER)
    assert scheduler.get_mem_pool_context() is None
    context = vk.TorchKvregConnector(fake_vllm_config(), KVConnectorRole.WORKER).get_mem_pool_context()
    kv.initialize()
    with context:
        buffer = torch.zeros(3 * 4096, dtype=torch.int8, device=torch.device("cpu"))
        others = [torch.zeros(4096, dtype=torch.float16), torch.zeros(2, 4096, dtype=torch.int8), torch.empty(8)]
    assert context.allocated == 1 and buffer.dtype == torch.int8 and int(buffer.abs().sum()) == 0
    layers = [buffer[i * 4096 : (i + 1) * 4096].view(torch.float16) for i in range(3)]
    cache = kv.register_kv_cache(layers)
    region = allocate.shared_region(cache)
    assert region is not None and region.base == buffer.data_ptr()
    assert all(allocate.shared_region(kv.register_kv_cache([t])) is None for t in others[:2])


# --- producer and decoder of different shapes (block size, layout, tensor parallelism) ---------


def test_cache_shapes_travel_in_params_and_say_what_cannot_map(vk):
    from torch_kvreg.vllm.shapes import CacheShape, mapping_error, source_ranks, token_span

    layer = torch.zeros(2, 8, 16, 4, 32)  # vLLM FlashAttention (2, N, B, H, D) on rank 1 of 2
    shape = CacheShape.of_layers([layer], tp_size=2, tp_rank=1)
    assert shape.geometry == kv.KVGeometry("flash_attn", 16, 8, 32, 2, 1) and shape.dtype == "DT_FLOAT"
    assert CacheShape.of_layers([torch.zeros(8, 16, 64)], 1, 0) is None  # MLA: no heads to map
    source = vk.RemoteSource(
        "e", "r", "h", 1, 2, 3, (4, 5), 16, 20, 1e12, shape.rank(0), (("h", 1, 2, 3), ("g", 5, 6, 7))
    )
    again = vk.RemoteSource.from_params(source.to_params())
    assert again == source and again.rank_address(1) == ("g", 5, 6, 7) and source.to_params()["tp_size"] == 2
    bad = {
        "'layout'": dict(shape.to_params(), layout=3),
        "'head_dim'": dict(shape.to_params(), head_dim=0),
        "does not divide": dict(shape.to_params(), num_kv_heads=7),
        "'dtype'": dict(shape.to_params(), dtype="float32"),
    }
    for text, geometry in bad.items():
        with pytest.raises(kv.LLMParamInvalidError, match=text):
            vk.RemoteSource.from_params(dict(source.to_params(), remote_geometry=geometry))
    with pytest.raises(kv.LLMParamInvalidError, match="must list 2 ranks"):
        vk.RemoteSource.from_params(dict(source.to_params(), remote_ranks=[["h", 1, 2, 3]]))
    with pytest.raises(kv.LLMParamInvalidError, match="not remote_block_size"):
        vk.RemoteSource.from_params(dict(source.to_params(), remote_block_size=32, remote_num_tokens=20))

    decode = CacheShape(kv.KVGeometry("vllm_cpu", 32, 8, 32), "DT_FLOAT")
    assert mapping_error(shape, decode) is None and source_ranks(shape.rank(0), decode) == [0, 1]
    assert "head_dim" in mapping_error(shape, CacheShape(kv.KVGeometry("vllm_cpu", 32, 8, 64), "DT_FLOAT"))
    assert "data_type" in mapping_error(shape, CacheShape(decode.geometry, "DT_BF16"))
    assert "KV heads in all" in mapping_error(shape, CacheShape(kv.KVGeometry("flash_attn", 32, 4, 32), "DT_FLOAT"))
    assert token_span(70, 0, 3, 16, 32) == (0, 0, 70) and token_span(70, 64, 1, 32, 32) == (2, 0, 6)


def test_scheduler_side_consumer_refuses_shapes_that_cannot_map(vk, caplog):
    from torch_kvreg.vllm.shapes import CacheShape

    side = scheduler(vk, producer=False)
    own = CacheShape(kv.KVGeometry("flash_attn", 32, 4, 64), "DT_FLOAT")
    side.set_address(vk.ProducerAddress("127.0.0.1", 4000, 7, 3, 32, 64, own))
    caplog.set_level(logging.WARNING, "torch_kvreg.vllm")
    prefill = {"layout": "flash_attn", "block_size": 16, "num_kv_heads": 4, "head_dim": 64, "tp_size": 1}
    ok = good_params(
        vk, remote_block_size=16, remote_block_ids=[1, 2, 3, 4, 5], remote_geometry=prefill | {"dtype": "DT_FLOAT"}
    )
    assert side.num_new_matched_tokens(fake_request("ok", ok), 0) == (70, True)
    cases = {
        "head_dim 32": prefill | {"head_dim": 32, "dtype": "DT_FLOAT"},
        "data_type": prefill | {"dtype": "DT_FLOAT16"},
        "8 KV heads in all": prefill | {"num_kv_heads": 8, "dtype": "DT_FLOAT"},
    }
    for i, (text, geometry) in enumerate(cases.items()):
        params = dict(ok, remote_geometry=geometry)
        assert side.num_new_matched_tokens(fake_request(f"x{i}", params), 0) == (0, False)
        assert params["do_remote_prefill"] is False and text in caplog.text, text
    # a producer that says nothing of its geometry: its blocks must be ours
    old = good_params(vk, remote_block_size=16, remote_block_ids=[1, 2, 3, 4, 5])
    assert side.num_new_matched_tokens(fake_request("old", old), 0) == (0, False)
    assert "blocks hold 16 tokens, ours 32" in caplog.text


@pytest.fixture(scope="module")
def producer_peer(vk):
    from remote_peer import running_peer

    with running_peer(31) as peer:
        yield peer


def registered_tensors(layers, layout):
    """The tensors register_layer_caches makes of vLLM layer tensors (K, V per layer for
    FlashAttention's (2, N, B, H, D); the layer itself for the CPU layout)."""
    if layout.startswith("flash_attn"):
        return [half for layer in layers for half in (layer[0], layer[1])]
    return list(layers)


def flash_attn_layers(num_layers, num_blocks, block_size, heads, head_dim, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, num_blocks, block_size, heads, head_dim, generator=gen) for _ in range(num_layers)]


def cpu_layers(num_layers, num_blocks, block_size, heads, head_dim, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(num_blocks, heads, block_size, 2 * head_dim, generator=gen) for _ in range(num_layers)]


def wait_loaded(side, request_id, timeout_s=60.0):
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _, recving = side.finished()
        if request_id in recving:
            return
        time.sleep(0.01)
    raise AssertionError(f"load of {request_id} did not end")


def offer(vk, peer, address, request_id, remote_blocks, num_tokens=70):
    """The producer's scheduler offers a finished request's blocks: its kv_transfer_params."""
    from torch_kvreg.vllm.scheduler import SchedulerSide

    side = SchedulerSide(
        vk.ConnectorSettings(), engine_id="prefill", producer=True, consumer=False, block_size=address.block_size
    )
    side.set_addresses({0: address})
    delay, params = side.request_finished(
        fake_request(request_id, {"do_remote_decode": True}, computed=num_tokens), [remote_blocks]
    )
    assert delay is True and params["remote_geometry"]["block_size"] == address.block_size
    _, sends = side.take_step()
    return params, sends


def decoder_worker(vk, layers, block_size, tp_size=1, tp_rank=0):
    from torch_kvreg.vllm.worker import WorkerSide

    # generous timeouts: a loaded shared machine must not turn a slow link into a load error
    settings = vk.ConnectorSettings(link_timeout_ms=20000, transfer_timeout_ms=20000)
    side = WorkerSide(settings, producer=False, consumer=True, block_size=block_size, tp_size=tp_size, tp_rank=tp_rank)
    address = side.register({f"model.layers.{i}.self_attn.attn": t for i, t in enumerate(layers)})
    return side, address


def plan_load(vk, decoder_address, params, request_id, local_blocks, cached_blocks=0):
    """The decoder's scheduler: the load of a request given the producer's params."""
    from torch_kvreg.vllm.scheduler import SchedulerSide

    side = SchedulerSide(
        vk.ConnectorSettings(), engine_id="decode", producer=False, consumer=True, block_size=decoder_address.block_size
    )
    side.set_address(decoder_address)
    request = fake_request(request_id, params, prompt_len=70, computed=0)
    computed = cached_blocks * decoder_address.block_size
    count, asynchronous = side.num_new_matched_tokens(request, computed)
    assert (count, asynchronous) == (70 - computed, True)
    blocks = [FakeBlock(b, i < cached_blocks) for i, b in enumerate(local_blocks)]
    side.update_state_after_alloc(request, types.SimpleNamespace(blocks=[blocks]), count)
    loads, _ = side.take_step()
    return loads


@pytest.mark.parametrize("decode_layout", ["flash_attn", "vllm_cpu"])
def test_decoder_with_larger_blocks_pulls_the_prompt_tokens(vk, producer_peer, decode_layout):
    """Prefill blocks of 16 tokens (FlashAttention NHD), decode blocks of 32 (the same, or
    vLLM's CPU layout): the decoder pulls the prompt's tokens after its cached prefix, and
    every token lands in its slot (against the reference); the producer frees its blocks on
    the decoder's notice."""
    from geometry_ref import expected_after, same_bytes

    heads, head_dim, layers = 4, 32, 2
    kv.initialize(cluster_id=32, options={"llm.SyncKvCacheWaitTime": "20000"})
    try:
        prefill_layers = flash_attn_layers(layers, 8, 16, heads, head_dim, seed=1)
        reference = [t.clone() for t in prefill_layers]
        address = producer_peer.call("vllm_producer", (prefill_layers, 16, 1, 0))
        make = flash_attn_layers if decode_layout == "flash_attn" else cpu_layers
        mine = make(layers, 6, 32, heads, head_dim, seed=2)
        side, decoder_address = decoder_worker(vk, mine, 32)
        assert decoder_address.shape.geometry.layout == decode_layout
        remote_blocks = [7, 2, 5, 0, 3]  # 70 tokens in blocks of 16
        request_id = f"p-{decode_layout}"
        params, sends = offer(vk, producer_peer, address, request_id, remote_blocks)
        loads = plan_load(vk, decoder_address, params, "d1", [4, 1, 3], cached_blocks=1)
        before = [t.clone() for t in mine]
        dst_g, src_g = decoder_address.shape.geometry, address.shape.geometry
        expected = expected_after(
            registered_tensors(reference, "flash_attn"),
            src_g,
            registered_tensors(before, decode_layout),
            dst_g,
            remote_blocks[2:],
            [1, 3],
            num_tokens=38,
        )
        side.start_loads(loads)
        wait_loaded(side, "d1")
        assert side.load_errors() == set()
        assert same_bytes(registered_tensors(mine, decode_layout), expected)
        assert side.take_figures().bytes == 38 * heads * head_dim * 4 * 2 * layers
        assert producer_peer.call("vllm_finished", (address.cache_id, sends)) == {request_id}
        side.close()
    finally:
        kv.finalize()


def test_tp2_decoder_ranks_each_pull_their_half_of_the_heads(vk, producer_peer):
    """A TP-1 prefill (blocks of 16), two TP-2 decode ranks (blocks of 32, HND): each rank
    pulls its half of the KV heads; the producer frees the blocks only after both ranks'
    notices."""
    from geometry_ref import expected_after, same_bytes

    heads, head_dim, layers = 4, 32, 2
    kv.initialize(cluster_id=33, options={"llm.SyncKvCacheWaitTime": "20000"})
    try:
        prefill_layers = flash_attn_layers(layers, 8, 16, heads, head_dim, seed=3)
        reference = [t.clone() for t in prefill_layers]
        address = producer_peer.call("vllm_producer", (prefill_layers, 16, 1, 0))
        remote_blocks = [6, 1, 4, 2, 0]
        params, sends = offer(vk, producer_peer, address, "p-tp", remote_blocks)
        ranks = []
        for rank in range(2):
            # HND, as vLLM builds it for some backends: a (2, N, B, H, D) view of (2, N, H, B, D) memory
            gen = torch.Generator().manual_seed(4 + rank)
            physical = [torch.randn(2, 4, heads // 2, 32, head_dim, generator=gen) for _ in range(layers)]
            side, rank_address = decoder_worker(vk, [t.transpose(2, 3) for t in physical], 32, tp_size=2, tp_rank=rank)
            assert rank_address.shape.geometry == kv.KVGeometry("flash_attn_hnd", 32, heads, head_dim, 2, rank)
            ranks.append((side, rank_address, physical))
        loads = plan_load(vk, ranks[0][1], params, "d-tp", [3, 0, 2])
        src_g = address.shape.geometry
        for count, (side, rank_address, physical) in enumerate(ranks):
            expected = expected_after(
                registered_tensors(reference, "flash_attn"),
                src_g,
                registered_tensors([t.clone() for t in physical], "flash_attn"),
                rank_address.shape.geometry,
                remote_blocks,
                [3, 0, 2],
                num_tokens=70,
            )
            side.start_loads(loads)
            wait_loaded(side, "d-tp")
            assert side.load_errors() == set()
            assert same_bytes(registered_tensors(physical, "flash_attn"), expected)
            assert side.take_figures().bytes == 70 * (heads // 2) * head_dim * 4 * 2 * layers
            freed = producer_peer.call("vllm_finished", (address.cache_id, sends if count == 0 else {}))
            assert freed == (set() if count == 0 else {"p-tp"})  # the first rank's notice alone frees nothing
        for side, _, _ in ranks:
            side.close()
    finally:
        kv.finalize()


def test_decoder_reports_a_load_that_cannot_map_as_load_errors(vk, producer_peer, caplog):
    """Params whose geometry the producer's cache does not have (the scheduler could not
    know): the native planner refuses before any byte moves, and the load's blocks are
    reported as load errors, untouched."""
    kv.initialize(cluster_id=34, options={"llm.SyncKvCacheWaitTime": "20000"})
    try:
        address = producer_peer.call("vllm_producer", (flash_attn_layers(2, 8, 16, 4, 32, seed=5), 16, 1, 0))
        mine = cpu_layers(2, 4, 32, 4, 32, seed=6)
        before = [t.clone() for t in mine]
        side, decoder_address = decoder_worker(vk, mine, 32)
        params, _ = offer(vk, producer_peer, address, "p-bad", [1, 2, 3, 4, 5])
        loads = plan_load(vk, decoder_address, params, "d-bad", [0, 2, 3])
        # params that say the producer's blocks hold 32 tokens: its cache's blocks are of 16
        lying = dict(params, remote_block_size=32, remote_geometry=dict(params["remote_geometry"], block_size=32))
        wrong = dataclasses.replace(loads["d-bad"], source=vk.RemoteSource.from_params(lying))
        caplog.set_level(logging.WARNING, "torch_kvreg.vllm")
        side.start_loads({"d-bad": wrong})
        wait_loaded(side, "d-bad")
        assert side.load_errors() == {0, 2, 3}
        assert "LLM_PARAM_INVALID" in caplog.text and "makes" in caplog.text  # the planner's words
        assert all(torch.equal(a, b) for a, b in zip(mine, before))
        side.close()
    finally:
        kv.finalize()


def test_a_tp2_producer_offers_every_ranks_address(vk, caplog):
    """The scheduler learns each worker's address from vLLM's handshake metadata (by TP
    rank); a TP-2 producer's params list both, and none are offered before both are known."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from torch_kvreg.vllm.shapes import CacheShape

    connector = vk.TorchKvregConnector(fake_vllm_config("kv_producer", tp=2), KVConnectorRole.SCHEDULER)
    shapes = [CacheShape(kv.KVGeometry("flash_attn", 32, 8, 64, 2, rank), "DT_BF16") for rank in range(2)]
    addresses = [vk.ProducerAddress("10.0.0.1", 4000 + rank, 70 + rank, 3, 32, 64, shapes[rank]) for rank in range(2)]
    connector.set_xfer_handshake_metadata({0: vk.TorchKvregHandshake(addresses[0])})
    caplog.set_level(logging.WARNING, "torch_kvreg.vllm")
    request = fake_request("r", {"do_remote_decode": True}, computed=40)
    assert connector.request_finished(request, ([1, 2],)) == (False, None)
    assert "no address of tensor-parallel ranks [1]" in caplog.text
    connector.set_xfer_handshake_metadata({rank: vk.TorchKvregHandshake(a) for rank, a in enumerate(addresses)})
    delay, params = connector.request_finished(request, ([1, 2],))
    assert delay is True and params["tp_size"] == 2
    assert params["remote_ranks"] == [["10.0.0.1", 4000, 70, 3], ["10.0.0.1", 4001, 71, 3]]
    source = vk.RemoteSource.from_params(params)
    assert source.shape == shapes[0] and source.rank_address(1) == ("10.0.0.1", 4001, 71, 3)


def test_decoder_of_the_same_geometry_pulls_whole_blocks(vk, producer_peer):
    """Producer and decoder caches alike: the load moves whole blocks (the last one too,
    partial as it is), after the decoder's cached prefix."""
    kv.initialize(cluster_id=35, options={"llm.SyncKvCacheWaitTime": "20000"})
    try:
        prefill_layers = flash_attn_layers(2, 8, 16, 4, 32, seed=7)
        reference = [t.clone() for t in prefill_layers]
        address = producer_peer.call("vllm_producer", (prefill_layers, 16, 1, 0))
        mine = flash_attn_layers(2, 8, 16, 4, 32, seed=8)
        side, decoder_address = decoder_worker(vk, mine, 16)
        params, sends = offer(vk, producer_peer, address, "p-same", [7, 2, 5, 0, 3])
        loads = plan_load(vk, decoder_address, params, "d-same", [1, 4, 6, 3, 2], cached_blocks=1)
        side.start_loads(loads)
        wait_loaded(side, "d-same")
        assert side.load_errors() == set()
        for layer, want in zip(mine, reference):
            assert torch.equal(layer[:, [4, 6, 3, 2]], want[:, [2, 5, 0, 3]])
        assert side.take_figures().bytes == 4 * 16 * 4 * 32 * 4 * 2 * 2  # 4 whole blocks of K and V, 2 layers
        assert producer_peer.call("vllm_finished", (address.cache_id, sends)) == {"p-same"}
        side.close()
    finally:
        kv.finalize()
