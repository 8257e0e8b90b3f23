"""The connector's scheduler side: which requests load KV from a producer, which requests'
blocks a producer keeps for a decoder, and the kv_transfer_params between them.

It reads vLLM's Request and KVCacheBlocks by their attributes and imports no vllm, so it can
be driven without an engine.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..errors import LLMException
from .settings import ConnectorSettings, LoadSpec, ProducerAddress, RemoteSource
from .shapes import mapping_error, source_ranks
from .worker import flatten_block_ids

log = logging.getLogger("torch_kvreg.vllm")

# vLLM's RequestStatus names of a request that ended normally (others were aborted).
_FINISHED_NORMALLY = ("FINISHED_LENGTH_CAPPED", "FINISHED_STOPPED")


class SchedulerSide:
    """One engine's scheduler half of the connector."""

    def __init__(
        self, settings: ConnectorSettings, *, engine_id: str, producer: bool, consumer: bool, block_size: int
    ) -> None:
        self.settings = settings
        self.engine_id = engine_id
        self.producer = producer
        self.consumer = consumer
        self.block_size = block_size
        self.address: ProducerAddress | None = None  # tensor-parallel rank 0's
        self.addresses: dict[int, ProducerAddress] = {}  # every rank's, by rank
        self._sources: dict[str, RemoteSource] = {}  # checked params of requests about to load
        self._loads: dict[str, LoadSpec] = {}  # for the next step's metadata
        self._sends: dict[str, float] = {}

    def set_address(self, address: ProducerAddress) -> None:
        self.set_addresses({0: address})

    def set_addresses(self, addresses: dict[int, ProducerAddress]) -> None:
        """The workers' addresses by tensor-parallel rank (vLLM's handshake metadata)."""
        self.addresses = dict(addresses)
        self.address = self.addresses.get(0)

    def _cannot_load(self, source: RemoteSource) -> str | None:
        """Why this engine cannot load KV from ``source``'s cache, or None: the same block
        size and split move as whole blocks; other geometries as tokens, where the native
        planner maps them."""
        own = None if self.address is None else self.address.shape
        if source.shape is None or own is None:
            tp = (
                1 if source.shape is None else source.shape.geometry.tp_size,
                1 if own is None else own.geometry.tp_size,
            )
            if source.block_size != self.block_size:
                return f"the producer's blocks hold {source.block_size} tokens, ours {self.block_size}"
            if tp != (1, 1):
                return f"tensor-parallel sizes {tp[0]} -> {tp[1]} and a cache without KV-head geometry"
            return None
        if source.shape.same_blocks(own):
            return None
        ranks = source_ranks(source.shape, own)
        if not ranks:  # (the producer's ranks hold every head between them)
            return "the producer holds none of our KV heads"
        error = mapping_error(source.shape.rank(ranks[0]), own)
        return None if error is None else f"its KV cannot map into ours: {error}"

    def num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params
        if not self.consumer or not params or not params.get("do_remote_prefill"):
            return 0, False
        try:
            source = RemoteSource.from_params(params)
        except LLMException as exc:
            log.warning("torch_kvreg connector: request %s recomputes its prompt: %s", request.request_id, exc)
            params["do_remote_prefill"] = False
            return 0, False
        refusal = self._cannot_load(source)
        if refusal is not None:
            log.warning("torch_kvreg connector: request %s recomputes its prompt: %s", request.request_id, refusal)
            params["do_remote_prefill"] = False
            return 0, False
        count = min(source.num_tokens, request.num_prompt_tokens) - num_computed_tokens
        if count <= 0:
            return 0, False
        self._sources[request.request_id] = source
        return count, True

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_prefill"):
            return
        params["do_remote_prefill"] = False  # load once, whatever happens next
        source = self._sources.pop(request.request_id, None)
        if source is None or num_external_tokens <= 0:
            return
        group = blocks.blocks[0]
        cached = sum(1 for block in group if block.block_hash is not None and not block.is_null)
        local = [block.block_id for block in group if block.block_hash is None and not block.is_null]
        self._loads[request.request_id] = LoadSpec(source, tuple(local), first_block=cached)

    def take_step(self) -> tuple[dict[str, LoadSpec], dict[str, float]]:
        """The loads to start and the sends to track, handed to the workers once."""
        loads, self._loads = self._loads, {}
        sends, self._sends = self._sends, {}
        return loads, sends

    def request_finished(self, request: Any, block_ids: object) -> tuple[bool, dict[str, Any] | None]:
        params = request.kv_transfer_params
        if not params:
            return False, None
        if params.get("do_remote_prefill"):  # ended before its load was planned
            self._sources.pop(request.request_id, None)
            params["do_remote_prefill"] = False
            return False, None
        if not self.producer or not params.get("do_remote_decode"):
            return False, None
        status = getattr(request.status, "name", str(request.status))
        if status not in _FINISHED_NORMALLY:
            return False, None
        if self.address is None:
            log.warning(
                "torch_kvreg connector: no worker address known; request %s's KV is not offered", request.request_id
            )
            return False, None
        num_tokens = int(request.num_computed_tokens)
        blocks = flatten_block_ids(block_ids)[: -(-num_tokens // self.block_size)]
        if num_tokens <= 0 or not blocks:
            return False, None
        shape = self.address.shape
        ranks: tuple[tuple[str, int, int, int], ...] = ()
        if shape is not None and shape.geometry.tp_size > 1:
            missing = [rank for rank in range(shape.geometry.tp_size) if rank not in self.addresses]
            if missing:
                log.warning(
                    "torch_kvreg connector: no address of tensor-parallel ranks %s; request %s's KV is not offered",
                    missing,
                    request.request_id,
                )
                return False, None
            ranks = tuple(
                (a.host, a.port, a.cluster_id, a.cache_id)
                for a in (self.addresses[rank] for rank in range(shape.geometry.tp_size))
            )
        expires_at = time.time() + self.settings.hold_timeout_s
        self._sends[request.request_id] = expires_at
        source = RemoteSource(
            engine_id=self.engine_id,
            request_id=request.request_id,
            host=self.address.host,
            port=self.address.port,
            cluster_id=self.address.cluster_id,
            cache_id=self.address.cache_id,
            block_ids=tuple(blocks),
            block_size=self.block_size,
            num_tokens=num_tokens,
            expires_at=expires_at,
            shape=shape,
            ranks=ranks,
        )
        return True, source.to_params()
