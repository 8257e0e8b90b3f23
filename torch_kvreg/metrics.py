"""Prometheus export of torch_kvreg.stats(): a collector a server registers.

    >>> from prometheus_client import REGISTRY          # doctest: +SKIP
    >>> REGISTRY.register(torch_kvreg.metrics.collector())   # doctest: +SKIP

Metrics (label ``path``: local_copy, pull, push): ``torch_kvreg_transfers_total``,
``torch_kvreg_transfer_bytes_total``, ``torch_kvreg_transfer_failures_total`` (also
labelled ``status``) and ``torch_kvreg_transfer_latency_seconds`` (labelled ``quantile``
0.5 and 0.99, over the last counters.WINDOW transfers of the path).
"""

from __future__ import annotations

from collections.abc import Iterator

from .counters import stats
from .errors import LLMStatusCode, make_error


class TransferCollector:
    """Reads torch_kvreg.stats() each time Prometheus scrapes."""

    def collect(self) -> Iterator[object]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        figures = stats()
        ops = CounterMetricFamily("torch_kvreg_transfers", "Transfers finished, by path", labels=["path"])
        moved = CounterMetricFamily(
            "torch_kvreg_transfer_bytes", "Bytes moved by successful transfers", labels=["path"]
        )
        failures = CounterMetricFamily(
            "torch_kvreg_transfer_failures", "Failed transfers, by LLM status", labels=["path", "status"]
        )
        latency = GaugeMetricFamily(
            "torch_kvreg_transfer_latency_seconds",
            "Transfer latency quantiles over the last transfers of a path",
            labels=["path", "quantile"],
        )
        for path, path_figures in figures.items():
            ops.add_metric([path], path_figures["ops"])
            moved.add_metric([path], path_figures["bytes"])
            for status, count in sorted(path_figures["failures"].items()):
                failures.add_metric([path, status], count)
            for quantile, key in (("0.5", "p50"), ("0.99", "p99")):
                value = path_figures["latency_s"][key]
                if value is not None:
                    latency.add_metric([path, quantile], value)
        yield from (ops, moved, failures, latency)


def collector() -> TransferCollector:
    """A Prometheus collector of torch_kvreg's transfer figures; LLM_FEATURE_NOT_ENABLED
    when prometheus_client is not installed."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise make_error(
            LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
            "torch_kvreg.metrics.collector() needs prometheus_client (pip install prometheus-client)",
        ) from None
    return TransferCollector()
