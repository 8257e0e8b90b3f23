"""The vLLM connector's parts without an engine: settings, kv_transfer_params, the scheduler
side's bookkeeping, the worker side's notices, stats and Prometheus metrics, and vLLM's CPU
cache layout."""

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


def fake_vllm_config(role="kv_both", extra=None, tp=1):
    transfer = types.SimpleNamespace(
        kv_role=role,
        kv_connector_extra_config=extra or {},
        is_kv_producer=role in ("kv_producer", "kv_both"),
        is_kv_consumer=role in ("kv_consumer", "kv_both"),
        engine_id="e",
    )
    return types.SimpleNamespace(
        kv_transfer_config=transfer,
        parallel_config=types.SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=1),
        cache_config=types.SimpleNamespace(block_size=32),
    )


def test_connector_refuses_what_it_cannot_serve(vk):
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    with pytest.raises(kv.LLMParamInvalidError, match="kv_role 'kv_sideways'"):
        vk.TorchKvregConnector(fake_vllm_config("kv_sideways"), KVConnectorRole.SCHEDULER)
    with pytest.raises(kv.LLMParamInvalidError, match="unknown keys"):
        vk.TorchKvregConnector(fake_vllm_config(extra={"port": 1}), KVConnectorRole.WORKER)
    with pytest.raises(kv.LLMException, match="parallel size 1") as info:
        vk.TorchKvregConnector(fake_vllm_config(tp=2), KVConnectorRole.WORKER)
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
