"""stats() and reset_stats(): counters per path (ops, bytes, failures by status) and latency
quantiles over a bounded window; the Prometheus collector; logging through the
"torch_kvreg" logger; and a library that never prints."""

import logging
import pathlib
import re
import sys

import pytest
import torch

import torch_kvreg as kv
from torch_kvreg import CacheIndex, LLMStatusCode, counters

from remote_peer import Peer


@pytest.fixture
def local():
    kv.reset_stats()
    kv.initialize()
    src = kv.register_kv_cache([torch.arange(32.0).reshape(8, 4) for _ in range(2)])
    dst = kv.register_kv_cache([torch.zeros(8, 4) for _ in range(2)])
    yield src, dst
    kv.finalize()


def test_local_copies_are_counted_with_their_bytes_and_failures(local):
    src, dst = local
    kv.copy_kv_blocks(src, dst, [0, 1, 2], [5, 6, 7])  # 3 blocks x 16 B x 2 tensors
    kv.swap_blocks(src, dst, {3: 4})
    kv.copy_kv_cache(src, dst, 1, 2, offset=4, size=8)
    kv.copy_kv_blocks(src, dst, [0], [1], layers=range(0, 1), tensors_per_layer=1)
    kv.copy_kv_blocks_async(src, dst, [4], [0]).wait()
    with pytest.raises(kv.LLMException):
        kv.copy_kv_blocks(src, dst, [8], [0])  # out of range
    with pytest.raises(kv.LLMException):
        kv.copy_kv_blocks(src, dst, [0, 1], [2, 2])  # repeated destination
    figures = kv.stats()
    local_figures = figures["local_copy"]
    assert local_figures["ops"] == 7
    assert local_figures["bytes"] == 3 * 32 + 32 + 2 * 8 + 16 + 32
    assert local_figures["failures"] == {"LLM_PARAM_INVALID": 2}
    latency = local_figures["latency_s"]
    assert latency["samples"] == 7 and 0 < latency["p50"] <= latency["p99"] < 5
    assert figures["pull"]["ops"] == figures["push"]["ops"] == 0
    kv.reset_stats()
    assert kv.stats()["local_copy"] == {
        "ops": 0,
        "bytes": 0,
        "failures": {},
        "latency_s": {"p50": None, "p99": None, "samples": 0},
    }


def test_the_latency_window_is_bounded_and_its_quantiles_are_right():
    kv.reset_stats()
    for i in range(counters.WINDOW + 500):
        counters.record("pull", 10, (i % 100) / 1000)  # 0 .. 99 ms, evenly
    figures = kv.stats()["pull"]
    assert figures["ops"] == counters.WINDOW + 500 and figures["bytes"] == 10 * figures["ops"]
    assert figures["latency_s"]["samples"] == counters.WINDOW
    assert abs(figures["latency_s"]["p50"] - 0.050) <= 0.003
    assert abs(figures["latency_s"]["p99"] - 0.099) <= 0.003
    kv.reset_stats()


@pytest.mark.skipif(not kv.remote.nixl_available(), reason="needs the nixl extra")
def test_remote_pulls_and_pushes_are_counted(through_nixl, monkeypatch):
    peer = Peer(cluster_id=31)
    try:
        remote_id = peer.call("register", (2, 8, (4, 8), 5, True))
        kv.reset_stats()
        kv.initialize(cluster_id=2, options={"llm.SyncKvCacheWaitTime": "1000"})
        assert kv.link_clusters([peer.info])[0] == LLMStatusCode.LLM_SUCCESS
        mine = kv.register_kv_cache([torch.zeros(8, 4, 8, dtype=torch.float16) for _ in range(2)])
        block = mine.cache_desc.block_nbytes
        kv.pull_kv_blocks(CacheIndex(31, remote_id), mine, [1, 2], [3, 4])
        kv.pull_kv_blocks_async(CacheIndex(31, remote_id), mine, [5], [5]).wait()
        kv.push_kv_blocks(mine, CacheIndex(31, remote_id), [3], [0])
        agent = kv.remote.current_engine().agent
        monkeypatch.setattr(agent, "check_xfer_state", lambda handle: "ERR")
        monkeypatch.setattr(agent, "transfer", lambda handle, notif_msg=b"": "PROC")
        with pytest.raises(kv.LLMException):
            kv.pull_kv_blocks(CacheIndex(31, remote_id), mine, [0], [0])
        monkeypatch.undo()
        figures = kv.stats()
        assert figures["pull"]["ops"] == 3 and figures["pull"]["bytes"] == 3 * 2 * block
        assert figures["pull"]["failures"] == {"LLM_LINK_FAILED": 1}
        assert figures["push"]["ops"] == 1 and figures["push"]["bytes"] == 2 * block
        assert figures["pull"]["latency_s"]["samples"] == 3
        kv.finalize()
    finally:
        peer.close()


def test_the_prometheus_collector_exposes_the_same_figures(local):
    prometheus_client = pytest.importorskip("prometheus_client")
    src, dst = local
    kv.copy_kv_blocks(src, dst, [0], [1])
    with pytest.raises(kv.LLMException):
        kv.copy_kv_blocks(src, dst, [9], [1])
    registry = prometheus_client.CollectorRegistry()
    registry.register(kv.metrics.collector())
    text = prometheus_client.generate_latest(registry).decode()
    assert 'torch_kvreg_transfers_total{path="local_copy"} 2.0' in text
    assert 'torch_kvreg_transfer_bytes_total{path="local_copy"} 32.0' in text
    assert re.search(r'torch_kvreg_transfer_failures_total\{path="local_copy",status="LLM_\w+"\} 1\.0', text)
    assert 'torch_kvreg_transfer_latency_seconds{path="local_copy",quantile="0.99"}' in text
    assert 'torch_kvreg_transfers_total{path="pull"} 0.0' in text


def test_a_collector_without_prometheus_client_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # importing it now fails
    with pytest.raises(kv.LLMException) as info:
        kv.metrics.collector()
    assert info.value.status_code == LLMStatusCode.LLM_FEATURE_NOT_ENABLED
    assert "prometheus" in str(info.value)


def test_transfers_log_through_the_torch_kvreg_logger(local, caplog):
    src, dst = local
    with caplog.at_level(logging.DEBUG, logger="torch_kvreg"):
        kv.copy_kv_blocks_async(src, dst, [0], [1]).wait()
        failing = kv.copy_kv_blocks_async(src, dst, [0], [2])
        failing.wait()
    assert any(
        r.name == "torch_kvreg" and r.levelno == logging.DEBUG and "local copy" in r.getMessage()
        for r in caplog.records
    )


def test_the_library_never_prints(local, capsys):
    src, dst = local
    kv.copy_kv_blocks(src, dst, [0], [1])
    kv.copy_kv_blocks_async(src, dst, [1], [2]).wait()
    kv.stats()
    assert capsys.readouterr() == ("", "")
    package = pathlib.Path(kv.__file__).parent
    printing = [
        f"{path.relative_to(package)}:{n}"
        for path in package.rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.match(r"\s*print\(", line) and path.name != "config.py"
    ]  # config.py is a CLI
    assert printing == []
