"""torch_kvreg's transfer figures in vLLM's stats (logged each interval) and its Prometheus
endpoint (``vllm:torch_kvreg_*``)."""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from vllm.v1.metrics.utils import create_metric_per_engine

_COUNTS = ("loads", "failed_loads", "bytes", "sent", "expired")


class TorchKvregStats(KVConnectorStats):
    """The figures of one interval: counts summed over workers, load times concatenated."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {name: 0 for name in _COUNTS}
        self.data["load_seconds"] = []

    def aggregate(self, other: KVConnectorStats) -> TorchKvregStats:
        for name in _COUNTS:
            self.data[name] = self.data.get(name, 0) + other.data.get(name, 0)
        self.data["load_seconds"] = list(self.data.get("load_seconds", [])) + list(other.data.get("load_seconds", []))
        return self

    def reduce(self) -> dict[str, int | float]:
        seconds = sorted(self.data.get("load_seconds", []))
        out: dict[str, int | float] = {name: self.data.get(name, 0) for name in _COUNTS}
        if seconds:
            out["load_p50_ms"] = round(seconds[len(seconds) // 2] * 1000, 3)
            out["load_max_ms"] = round(seconds[-1] * 1000, 3)
            total = sum(seconds)
            out["load_GBps"] = round(self.data.get("bytes", 0) / total / 1e9, 3) if total > 0 else 0.0
        return out

    def is_empty(self) -> bool:
        return not any(self.data.get(name, 0) for name in _COUNTS)


class TorchKvregPromMetrics(KVConnectorPromMetrics):
    """Counters of loads, failed loads, bytes, blocks read by decoders and holds that expired;
    a histogram of load times; one child per engine."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        docs = {
            "loads": "KV loads from a producer that landed",
            "failed_loads": "KV loads from a producer that failed (the blocks were recomputed)",
            "bytes": "bytes of KV loaded from producers",
            "sent": "requests whose KV a decoder read",
            "expired": "requests whose KV no decoder read before the hold timeout",
        }
        # vLLM hands prometheus_client's classes (or its multiprocess-aware wrappers).
        counter_cls: Any = self._counter_cls
        histogram_cls: Any = self._histogram_cls
        self.counters: dict[str, dict[int, Any]] = {
            name: create_metric_per_engine(
                counter_cls(name=f"vllm:torch_kvreg_{name}", documentation=doc, labelnames=labelnames),
                per_engine_labelvalues,
            )
            for name, doc in docs.items()
        }
        self.load_seconds: dict[int, Any] = create_metric_per_engine(
            histogram_cls(
                name="vllm:torch_kvreg_load_seconds",
                documentation="Time from a KV load's start to its end",
                buckets=[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
                labelnames=labelnames,
            ),
            per_engine_labelvalues,
        )

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, counter in self.counters.items():
            value = transfer_stats_data.get(name, 0)
            if value:
                counter[engine_idx].inc(value)
        for seconds in transfer_stats_data.get("load_seconds", []):
            self.load_seconds[engine_idx].observe(seconds)
