"""The connector's worker side: registers vLLM's KV cache, loads prompts' KV from producers,
and tells vLLM which requests' blocks were read. No vllm import: vLLM calls it through
connector.py.

A decoder's load runs on a small thread pool: link to the producer once (kept for later
loads), then one blocking ``pull_kv_blocks`` of the request's blocks with a completion notice
for the producer; when the producer's cache differs in block size, layout or tensor-parallel
degree (shapes.py), one ``pull_kv_tokens`` of the prompt's tokens from each producer rank
that holds heads of this rank, each with its notice. A load that fails for any reason (a
dead producer, a stale or malformed kv_transfer_params, blocks out of range, geometries
that do not map) reports the request's local blocks as load errors, so vLLM's
``kv_load_failure_policy`` applies (recompute, or fail the request).
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
from ..inflight import Transfer
from ..layouts import register_layer_caches
from ..remote import (
    get_notifications,
    link_clusters,
    listen_address,
    pull_kv_blocks,
    pull_kv_tokens_async,
    unlink_clusters,
)
from ..types import Cache, CacheIndex, ClusterInfo, LlmRole, RegisterCfg
from .settings import NOTICE_PREFIX, ConnectorSettings, LoadSpec, ProducerAddress, RankAddress
from .shapes import CacheShape, readers_per_rank, source_ranks, token_span

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

    def __init__(
        self,
        settings: ConnectorSettings,
        *,
        producer: bool,
        consumer: bool,
        block_size: int,
        tp_size: int = 1,
        tp_rank: int = 0,
    ) -> None:
        self.settings = settings
        self.producer = producer
        self.consumer = consumer
        self.block_size = block_size
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.cache: Cache | None = None
        self.shape: CacheShape | None = None  # once registered
        self._owns_runtime = False
        self._pool: ThreadPoolExecutor | None = None
        self._results: queue.SimpleQueue[LoadResult] = queue.SimpleQueue()
        self._loading: set[str] = set()
        self._load_errors: set[int] = set()
        self._sends: dict[str, float] = {}  # producer request id -> when its blocks are freed anyway
        # Notices by request: when the first came, the readers heard from, how many will read.
        self._notices: dict[str, tuple[float, set[int], int]] = {}
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
        self.shape = CacheShape.of_layers(list(kv_caches.values()), self.tp_size, self.tp_rank)
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
            shape=self.shape,
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

    def _link(self, address: RankAddress) -> None:
        host, port, cluster_id, _ = address
        key = (cluster_id, host, port)
        with self._links_lock:
            lock = self._link_locks.setdefault(key, threading.Lock())
        with lock:
            status, statuses = link_clusters([ClusterInfo(cluster_id, host, port)], self.settings.link_timeout_ms)
            code = statuses[0] if statuses else status
            if code not in (LLMStatusCode.LLM_SUCCESS, LLMStatusCode.LLM_ALREADY_LINK):
                raise LLMException(code, f"link to {host}:{port} (cluster {cluster_id}) failed")

    def _unlink(self, addresses: list[RankAddress]) -> None:
        for host, port, cluster_id, _ in addresses:
            try:
                unlink_clusters([ClusterInfo(cluster_id, host, port)], force=True)
            except Exception:  # the link may be gone already; the next load links afresh
                log.debug("unlink after a failed load raised", exc_info=True)

    def _pull_blocks(self, spec: LoadSpec, addresses: list[RankAddress]) -> int:
        """Whole blocks: the producer's cache has this one's geometry."""
        remote_blocks, local_blocks = spec.block_pairs()
        if not local_blocks:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID, "no remote block left to load")
        addresses.append(spec.source.rank_address(0))
        self._link(addresses[0])
        assert self.cache is not None
        return pull_kv_blocks(
            CacheIndex(spec.source.cluster_id, spec.source.cache_id),
            self.cache,
            remote_blocks,
            local_blocks,
            notify=spec.source.notice(),
        )

    def _pull_tokens(self, spec: LoadSpec, addresses: list[RankAddress]) -> int:
        """Tokens from each producer rank holding heads of this rank: the caches differ in
        block size, layout or tensor-parallel split. Every pull started is waited for, so
        no byte lands after a failed load is reported."""
        source, own = spec.source, self.shape
        assert source.shape is not None and own is not None and self.cache is not None
        first, offset, count = token_span(
            source.num_tokens,
            spec.first_block * self.block_size,
            len(spec.local_block_ids),
            source.block_size,
            self.block_size,
        )
        if count <= 0:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID, "no remote token left to load")
        readers = readers_per_rank(source.shape, own)
        transfers: list[Transfer] = []
        failure: BaseException | None = None
        try:
            for rank in source_ranks(source.shape, own):
                address = source.rank_address(rank)
                addresses.append(address)
                self._link(address)
                transfers.append(
                    pull_kv_tokens_async(
                        CacheIndex(address[2], address[3]),
                        self.cache,
                        list(source.block_ids[first:]),
                        list(spec.local_block_ids),
                        count,
                        src_geometry=source.shape.rank(rank).geometry,
                        dst_geometry=own.geometry,
                        src_offset=offset,
                        notify=source.notice(own.geometry.tp_rank % readers, readers),
                    )
                )
        except BaseException as exc:
            failure = exc
        nbytes = 0
        for transfer in transfers:
            try:
                nbytes += transfer.wait()
            except BaseException as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
        return nbytes

    def _load(self, request_id: str, spec: LoadSpec) -> None:
        start = time.perf_counter()
        nbytes, error = 0, None
        addresses: list[RankAddress] = []  # linked, or about to be
        try:
            left_s = spec.source.expires_at - time.time()
            if left_s < self.settings.transfer_timeout_ms / 1000:
                raise LLMException(
                    LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                    f"the producer holds these blocks for {left_s:.1f} s more, less than a load may take "
                    f"({self.settings.transfer_timeout_ms} ms): stale kv_transfer_params",
                )
            shape = spec.source.shape
            if shape is None or self.shape is None or shape.same_blocks(self.shape):
                nbytes = self._pull_blocks(spec, addresses)
            else:
                nbytes = self._pull_tokens(spec, addresses)
            if time.time() > spec.source.expires_at:
                raise LLMException(LLMStatusCode.LLM_TIMEOUT, "the load ended after the producer's hold expired")
        except LLMException as exc:
            error = str(exc)
            if exc.status_code in _LINK_LOST:
                self._unlink(addresses)
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

    def _heard(self, message: bytes, now: float) -> None:
        """Counts one decoder's notice (see RemoteSource.notice)."""
        if not message.startswith(NOTICE_PREFIX):
            log.debug("torch_kvreg connector: ignoring notice %r", message[:64])
            return
        body = message[len(NOTICE_PREFIX) :]
        reader, readers = 0, 1
        if b"\x00" in body:
            body, _, tail = body.rpartition(b"\x00")
            try:
                reader, readers = (int(part) for part in tail.split(b"/"))
            except ValueError:
                log.debug("torch_kvreg connector: ignoring notice %r", message[:64])
                return
        request_id = body.decode(errors="replace")
        first, seen, _ = self._notices.get(request_id, (now, set(), readers))
        self._notices[request_id] = (first, seen | {reader}, readers)

    def _sent(self, now: float) -> set[str]:
        for notification in get_notifications():
            self._heard(notification.message, now)
        done: set[str] = set()
        for request_id, (first, seen, readers) in list(self._notices.items()):
            if request_id in self._sends and len(seen) >= readers:
                del self._sends[request_id]
                del self._notices[request_id]
                done.add(request_id)
            elif now - first > _EARLY_NOTICE_S:
                del self._notices[request_id]
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
