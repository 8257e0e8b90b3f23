"""The connector's worker side: registers vLLM's KV cache, loads prompts' KV from producers,
and tells vLLM which requests' blocks were read. No vllm import: vLLM calls it through
connector.py.

A decoder's load runs on a small thread pool: link to the producer once (kept for later
loads), then one blocking ``pull_kv_blocks`` of the request's blocks with a completion notice
for the producer. A load that fails for any reason (a dead producer, a stale or malformed
kv_transfer_params, blocks out of range) reports the request's local blocks as load errors,
so vLLM's ``kv_load_failure_policy`` applies (recompute, or fail the request).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import random
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

import torch

from .. import registry
from ..errors import LLMException, LLMStatusCode
from ..layouts import register_layer_caches
from ..remote import get_notifications, link_clusters, listen_address, pull_kv_blocks, unlink_clusters
from ..types import Cache, CacheIndex, ClusterInfo, LlmRole, RegisterCfg
from .settings import NOTICE_PREFIX, ConnectorSettings, LoadSpec, ProducerAddress

log = logging.getLogger("torch_kvreg.vllm")

# Statuses after which the link to a producer is dropped, so the next load links afresh.
_LINK_LOST = (
    LLMStatusCode.LLM_TIMEOUT,
    LLMStatusCode.LLM_LINK_FAILED,
    LLMStatusCode.LLM_NOT_YET_LINK,
    LLMStatusCode.LLM_WAIT_PROC_TIMEOUT,
    LLMStatusCode.LLM_FAILED,
)
# Notices that arrive before the producer's worker learns of the request are kept this long.
_EARLY_NOTICE_S = 600.0


@dataclasses.dataclass
class LoadResult:
    request_id: str
    local_block_ids: tuple[int, ...]
    nbytes: int
    seconds: float
    error: str | None


@dataclasses.dataclass
class TransferFigures:
    """What this worker did since the last report (vLLM's stats interval)."""

    loads: int = 0
    failed_loads: int = 0
    bytes: int = 0
    load_seconds: list[float] = dataclasses.field(default_factory=list)
    sent: int = 0
    expired: int = 0

    def is_empty(self) -> bool:
        return not (self.loads or self.failed_loads or self.sent or self.expired)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class WorkerSide:
    """One vLLM worker's half of the connector (see the module docstring)."""

    def __init__(self, settings: ConnectorSettings, *, producer: bool, consumer: bool, block_size: int) -> None:
        self.settings = settings
        self.producer = producer
        self.consumer = consumer
        self.block_size = block_size
        self.cache: Cache | None = None
        self._owns_runtime = False
        self._pool: ThreadPoolExecutor | None = None
        self._results: queue.SimpleQueue[LoadResult] = queue.SimpleQueue()
        self._loading: set[str] = set()
        self._load_errors: set[int] = set()
        self._sends: dict[str, float] = {}  # producer request id -> when its blocks are freed anyway
        self._early_notices: dict[str, float] = {}  # notices for requests not yet handed to us
        self._link_locks: dict[tuple[int, str, int], threading.Lock] = {}
        self._links_lock = threading.Lock()
        self._figures = TransferFigures()
        self._figures_lock = threading.Lock()

    # --- start-up ---------------------------------------------------------------------------
    def register(self, kv_caches: Mapping[str, torch.Tensor]) -> ProducerAddress:
        """Registers vLLM's per-layer caches (starting torch_kvreg if this process has not)
        and returns where a decoder reads them."""
        if not registry.is_initialized():
            options = {
                "llm.ListenIpInfo": self.settings.listen_address,
                "llm.SyncKvCacheWaitTime": str(self.settings.transfer_timeout_ms),
            }
            if self.settings.link_secret is not None:
                options["llm.LinkSecret"] = self.settings.link_secret
            role = (
                LlmRole.MIX if self.producer and self.consumer else LlmRole.PROMPT if self.producer else LlmRole.DECODER
            )
            registry.initialize(random.SystemRandom().randrange(1, 2**31), role, options=options)
            self._owns_runtime = True
        elif self.producer and listen_address() is None:
            raise LLMException(
                LLMStatusCode.LLM_PARAM_INVALID,
                "torch_kvreg was initialized without llm.ListenIpInfo; a kv_producer must be reachable",
            )
        self.cache = register_layer_caches(dict(kv_caches), RegisterCfg(remote_accessible=self.producer))
        if self.consumer:
            self._pool = ThreadPoolExecutor(self.settings.max_concurrent_loads, thread_name_prefix="torch_kvreg-load")
        address = listen_address()
        host, port = ("", 0) if address is None else (address.rsplit(":", 1)[0], int(address.rsplit(":", 1)[1]))
        log.info(
            "torch_kvreg connector: %d layers registered as cache %d, serving on %s",
            len(kv_caches),
            self.cache.cache_id,
            address,
        )
        return ProducerAddress(
            host=host,
            port=port,
            cluster_id=registry.cluster_id(),
            cache_id=self.cache.cache_id,
            block_size=self.block_size,
            num_blocks=self.cache.cache_desc.shape[0],
        )

    # --- decoder ----------------------------------------------------------------------------
    def start_loads(self, loads: Mapping[str, LoadSpec]) -> None:
        """Starts one load per request; each ends in ``finished()``."""
        for request_id, spec in loads.items():
            if request_id in self._loading:
                continue
            if self._pool is None or self.cache is None:
                self._results.put(
                    LoadResult(request_id, spec.local_block_ids, 0, 0.0, "this instance is not a kv_consumer")
                )
                self._loading.add(request_id)
                continue
            self._loading.add(request_id)
            self._pool.submit(self._load, request_id, spec)

    def _link(self, spec: LoadSpec) -> None:
        source = spec.source
        key = (source.cluster_id, source.host, source.port)
        with self._links_lock:
            lock = self._link_locks.setdefault(key, threading.Lock())
        with lock:
            status, statuses = link_clusters(
                [ClusterInfo(source.cluster_id, source.host, source.port)], self.settings.link_timeout_ms
            )
            code = statuses[0] if statuses else status
            if code not in (LLMStatusCode.LLM_SUCCESS, LLMStatusCode.LLM_ALREADY_LINK):
                raise LLMException(code, f"link to {source.host}:{source.port} (cluster {source.cluster_id}) failed")

    def _unlink(self, spec: LoadSpec) -> None:
        source = spec.source
        try:
            unlink_clusters([ClusterInfo(source.cluster_id, source.host, source.port)], force=True)
        except Exception:  # the link may be gone already; the next load links afresh
            log.debug("unlink after a failed load raised", exc_info=True)

    def _load(self, request_id: str, spec: LoadSpec) -> None:
        start = time.perf_counter()
        nbytes, error = 0, None
        try:
            remote_blocks, local_blocks = spec.block_pairs()
            if not local_blocks:
                raise LLMException(LLMStatusCode.LLM_PARAM_INVALID, "no remote block left to load")
            left_s = spec.source.expires_at - time.time()
            if left_s < self.settings.transfer_timeout_ms / 1000:
                raise LLMException(
                    LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                    f"the producer holds these blocks for {left_s:.1f} s more, less than a load may take "
                    f"({self.settings.transfer_timeout_ms} ms): stale kv_transfer_params",
                )
            self._link(spec)
            assert self.cache is not None
            nbytes = pull_kv_blocks(
                CacheIndex(spec.source.cluster_id, spec.source.cache_id),
                self.cache,
                remote_blocks,
                local_blocks,
                notify=spec.source.notice(),
            )
            if time.time() > spec.source.expires_at:
                raise LLMException(LLMStatusCode.LLM_TIMEOUT, "the load ended after the producer's hold expired")
        except LLMException as exc:
            error = str(exc)
            if exc.status_code in _LINK_LOST:
                self._unlink(spec)
        except Exception as exc:  # a load never takes the engine down: it is recomputed
            error = f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - start
        if error is not None:
            log.warning(
                "torch_kvreg connector: loading request %s's KV from %s:%d failed, its %d blocks are reported "
                "as load errors: %s",
                request_id,
                spec.source.host,
                spec.source.port,
                len(spec.local_block_ids),
                error,
            )
        self._results.put(LoadResult(request_id, spec.local_block_ids, nbytes, seconds, error))

    def load_errors(self) -> set[int]:
        """The local blocks of failed loads reported since the last call."""
        errors, self._load_errors = self._load_errors, set()
        return errors

    # --- producer ---------------------------------------------------------------------------
    def add_sends(self, sends: Mapping[str, float]) -> None:
        """Requests whose blocks wait for a decoder's read, each with its expiry time."""
        self._sends.update(sends)

    def _sent(self, now: float) -> set[str]:
        for notification in get_notifications():
            message = notification.message
            if not message.startswith(NOTICE_PREFIX):
                log.debug("torch_kvreg connector: ignoring notice %r", message[:64])
                continue
            request_id = message[len(NOTICE_PREFIX) :].decode(errors="replace")
            self._early_notices[request_id] = now
        done: set[str] = set()
        for request_id in list(self._early_notices):
            if request_id in self._sends:
                del self._sends[request_id]
                del self._early_notices[request_id]
                done.add(request_id)
            elif now - self._early_notices[request_id] > _EARLY_NOTICE_S:
                del self._early_notices[request_id]
        expired = [request_id for request_id, expires_at in self._sends.items() if expires_at <= time.time()]
        for request_id in expired:
            del self._sends[request_id]
            log.warning(
                "torch_kvreg connector: no decoder read request %s's KV in time; freeing its blocks", request_id
            )
        with self._figures_lock:
            self._figures.sent += len(done)
            self._figures.expired += len(expired)
        return done | set(expired)

    # --- every step ---------------------------------------------------------------------------
    def finished(self) -> tuple[set[str], set[str]]:
        """(requests whose blocks were read or expired, requests whose loads ended)."""
        now = time.monotonic()
        sending = self._sent(now) if self.producer else set()
        recving: set[str] = set()
        while True:
            try:
                result = self._results.get_nowait()
            except queue.Empty:
                break
            self._loading.discard(result.request_id)
            recving.add(result.request_id)
            with self._figures_lock:
                if result.error is None:
                    self._figures.loads += 1
                    self._figures.bytes += result.nbytes
                    self._figures.load_seconds.append(result.seconds)
                else:
                    self._figures.failed_loads += 1
                    self._load_errors.update(result.local_block_ids)
        return sending, recving

    def take_figures(self) -> TransferFigures | None:
        with self._figures_lock:
            if self._figures.is_empty():
                return None
            figures, self._figures = self._figures, TransferFigures()
            return figures

    def close(self) -> None:
        """Waits for running loads, unregisters the cache, and stops torch_kvreg if this
        connector started it."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._owns_runtime:
            registry.finalize()
            self._owns_runtime = False
        elif self.cache is not None and registry.is_initialized():
            registry.unregister_kv_cache(self.cache)
        self.cache = None


def flatten_block_ids(block_ids: object) -> list[int]:
    """vLLM's block ids of one request, one KV-cache group: a list, or a one-group tuple."""
    if isinstance(block_ids, tuple) and len(block_ids) == 1:
        block_ids = block_ids[0]
    if isinstance(block_ids, (tuple, list)) and len(block_ids) == 1 and isinstance(block_ids[0], (list, tuple)):
        block_ids = block_ids[0]
    if not isinstance(block_ids, Iterable):
        raise TypeError(f"block ids must be a list, got {type(block_ids).__name__}")
    return [int(block) for block in block_ids]
