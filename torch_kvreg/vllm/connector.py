"""TorchKvregConnector: vLLM's KVConnectorBase_V1 over torch_kvreg (see __init__.py)."""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
)

from ..errors import LLMStatusCode, make_error, param_invalid
from .allocation import SharedKvCacheAllocation
from .scheduler import SchedulerSide
from .settings import ROLES, ConnectorSettings, LoadSpec, ProducerAddress
from .stats import TorchKvregPromMetrics, TorchKvregStats
from .worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig


@dataclasses.dataclass
class TorchKvregHandshake(KVConnectorHandshakeMetadata):
    """Worker -> its scheduler at start-up: where this worker's KV can be read, and its
    cache's geometry (what a decoder plans token loads by)."""

    address: ProducerAddress


@dataclasses.dataclass
class TorchKvregMetadata(KVConnectorMetadata):
    """Scheduler -> workers, each step: loads to start, sends to keep blocks for."""

    loads: dict[str, LoadSpec] = dataclasses.field(default_factory=dict)
    sends: dict[str, float] = dataclasses.field(default_factory=dict)


class TorchKvregConnector(KVConnectorBase_V1):
    """Disaggregated prefill/decode over torch_kvreg, in NixlConnector's kv_transfer_params
    flow: a ``kv_producer`` keeps a finished ``do_remote_decode`` request's blocks and returns
    where they are; a ``kv_consumer`` given those params reads the blocks asynchronously
    (same-host copies on one host, NIXL across hosts) and generates from them."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config, role, kv_cache_config)  # type: ignore[arg-type]
        config = self._kv_transfer_config
        if config.kv_role not in ROLES:
            raise param_invalid(f"kv_role {config.kv_role!r} is not one of {', '.join(ROLES)}")
        settings = ConnectorSettings.from_extra_config(config.kv_connector_extra_config)
        parallel = vllm_config.parallel_config
        if parallel.pipeline_parallel_size != 1:
            raise make_error(
                LLMStatusCode.LLM_FEATURE_NOT_ENABLED, "TorchKvregConnector supports pipeline parallel size 1"
            )
        tp_size = int(parallel.tensor_parallel_size)
        if kv_cache_config is not None and len(kv_cache_config.kv_cache_groups) > 1:
            raise make_error(
                LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
                "TorchKvregConnector supports models with one KV-cache group (no hybrid attention)",
            )
        producer, consumer = bool(config.is_kv_producer), bool(config.is_kv_consumer)
        block_size = int(vllm_config.cache_config.block_size)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._address: ProducerAddress | None = None  # the worker's, once its caches are registered
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(
                settings, engine_id=str(config.engine_id), producer=producer, consumer=consumer, block_size=block_size
            )
        else:
            tp_rank = 0
            if tp_size > 1:  # the worker's rank, known once vLLM set up its process groups
                from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

                tp_rank = get_tensor_model_parallel_rank()
            self._worker = WorkerSide(
                settings, producer=producer, consumer=consumer, block_size=block_size, tp_size=tp_size, tp_rank=tp_rank
            )

    # --- worker side ------------------------------------------------------------------------
    def get_mem_pool_context(self) -> AbstractContextManager | None:
        """vLLM allocates the KV cache inside this (at worker start-up): a CPU cache lands in
        shared memory that a same-host peer maps (allocation.py); a GPU one is left alone."""
        if self._worker is None or torch.cuda.is_available():
            return None
        return SharedKvCacheAllocation()

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._address = self._worker.register(kv_caches)

    def get_handshake_metadata(self) -> TorchKvregHandshake | None:
        return None if self._address is None else TorchKvregHandshake(self._address)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        assert self._worker is not None
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, TorchKvregMetadata)
        if metadata.sends:
            self._worker.add_sends(metadata.sends)
        if metadata.loads:
            self._worker.start_loads(metadata.loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads are whole and asynchronous: a request runs once its load ended

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return None  # decoders read; a producer keeps the blocks (request_finished)

    def wait_for_save(self) -> None:
        return None

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self._worker is not None
        sending, recving = self._worker.finished()
        return sending or None, recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self._worker is not None
        return self._worker.load_errors()

    def get_kv_connector_stats(self) -> TorchKvregStats | None:
        if self._worker is None:
            return None
        figures = self._worker.take_figures()
        return None if figures is None else TorchKvregStats(data=figures.to_dict())

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()

    # --- scheduler side ---------------------------------------------------------------------
    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        assert self._scheduler is not None
        self._scheduler.set_addresses(
            {
                int(rank): handshake.address
                for rank, handshake in metadata.items()
                if isinstance(handshake, TorchKvregHandshake)
            }
        )

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> TorchKvregMetadata:
        assert self._scheduler is not None
        loads, sends = self._scheduler.take_step()
        return TorchKvregMetadata(loads=loads, sends=sends)

    def request_finished(self, request: Any, block_ids: Any) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return self._scheduler.request_finished(request, block_ids)

    # --- stats ------------------------------------------------------------------------------
    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> TorchKvregStats | None:
        return TorchKvregStats(data=dict(data)) if data is not None else TorchKvregStats()

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> TorchKvregPromMetrics:
        return TorchKvregPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
