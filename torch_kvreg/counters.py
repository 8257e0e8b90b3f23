"""Counters and latencies of the transfers this process made, per path, for a server to
export (torch_kvreg.metrics) or a notebook to show.

Paths: "local_copy" (copy_kv_blocks, copy_kv_cache, swap_blocks and their async forms
through this package; raw torch.ops.llm calls in compiled graphs are not counted), "pull"
and "push" (remote transfers, blocking or not). A transfer counts once it has finished:
its bytes if it succeeded, its status among the failures if not (a call refused before
anything moved counts as a failure too). Latencies are kept for the last WINDOW transfers
of each path.
"""

from __future__ import annotations

import collections
import logging
import threading

from .errors import LLMStatusCode

WINDOW = 1024
PATHS = ("local_copy", "pull", "push")
log = logging.getLogger("torch_kvreg")


class _PathFigures:
    __slots__ = ("ops", "bytes", "failures", "latencies")

    def __init__(self) -> None:
        self.ops = 0
        self.bytes = 0
        self.failures: collections.Counter[str] = collections.Counter()
        self.latencies: collections.deque[float] = collections.deque(maxlen=WINDOW)


_lock = threading.Lock()
_paths = {path: _PathFigures() for path in PATHS}


def record(path: str, nbytes: int, seconds: float, status: LLMStatusCode = LLMStatusCode.LLM_SUCCESS) -> None:
    """Counts one finished transfer (called by the transfer paths themselves)."""
    figures = _paths[path]
    with _lock:
        figures.ops += 1
        figures.latencies.append(seconds)
        if status == LLMStatusCode.LLM_SUCCESS:
            figures.bytes += nbytes
        else:
            figures.failures[status.name] += 1


def _quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def stats() -> dict[str, dict]:
    """Per path: ``ops`` (finished transfers), ``bytes`` (moved by the successful ones),
    ``failures`` ({status name: count}) and ``latency_s`` ({"p50", "p99": seconds or None,
    "samples": how many of the last WINDOW transfers they summarise}).

    >>> import torch, torch_kvreg
    >>> torch_kvreg.reset_stats()
    >>> torch_kvreg.initialize()
    >>> a = torch_kvreg.register_kv_cache([torch.ones(4, 2)])
    >>> b = torch_kvreg.register_kv_cache([torch.zeros(4, 2)])
    >>> torch_kvreg.copy_kv_blocks(a, b, [0, 1], [2, 3])
    >>> figures = torch_kvreg.stats()["local_copy"]
    >>> figures["ops"], figures["bytes"], figures["failures"], figures["latency_s"]["samples"]
    (1, 16, {}, 1)
    >>> torch_kvreg.finalize()
    """
    out = {}
    with _lock:
        for path, figures in _paths.items():
            ordered = sorted(figures.latencies)
            out[path] = {
                "ops": figures.ops,
                "bytes": figures.bytes,
                "failures": dict(figures.failures),
                "latency_s": {"p50": _quantile(ordered, 0.5), "p99": _quantile(ordered, 0.99), "samples": len(ordered)},
            }
    return out


def reset_stats() -> None:
    """Zeroes every counter and forgets the latency windows.

    >>> import torch_kvreg
    >>> torch_kvreg.reset_stats()
    >>> torch_kvreg.stats()["pull"]["ops"]
    0
    """
    with _lock:
        for path in PATHS:
            _paths[path] = _PathFigures()
