"""LLM-DataDist's descriptors, cache keys and transfer configurations, with upstream's
argument orders; they translate to torch_kvreg's native types and own nothing."""

from __future__ import annotations

import abc
import enum
import threading
from collections.abc import Sequence
from typing import Any

import torch

from .. import types as native
from ..errors import LLMStatusCode, param_invalid, wrong_type
from ..types import DataType, Placement
from .config import UINT32_MAX, UINT64_MAX, check_int, check_type

INVALID_ID = UINT64_MAX  # an unset req_id / prefix_id
KEY_PREFIX = "llm_datadist"


class RegisterMemStatus(enum.Enum):
    OK = 0
    PREPARING = 1
    FAILED = 2


class Memtype(enum.Enum):
    MEM_TYPE_DEVICE = 0
    MEM_TYPE_HOST = 1


class MemInfo:
    """A memory range (kept for programs that name it; remapping needs Ascend hardware)."""

    def __init__(self, mem_type: Memtype, addr: int, size: int):
        check_type("mem_type", mem_type, Memtype)
        self.mem_type, self.addr, self.size = (
            mem_type,
            check_int("addr", addr, 0, UINT64_MAX),
            check_int("size", size, 0, UINT64_MAX),
        )

    def __repr__(self) -> str:
        return f"MemInfo(mem_type={self.mem_type}, addr={self.addr}, size={self.size})"


class CacheDesc:
    """Upstream's cache descriptor: ``CacheDesc(num_tensors, shape, data_type,
    placement=Placement.DEVICE, batch_dim_index=0, seq_len_dim_index=-1, kv_tensor_format=None)``.

    >>> desc = CacheDesc(2, [3, 10], DataType.DT_FLOAT, Placement.HOST)
    >>> desc.batch_size, desc.size
    (3, 120)
    """

    def __init__(
        self,
        num_tensors: int,
        shape: Sequence[int],
        data_type: DataType,
        placement: Placement = Placement.DEVICE,
        batch_dim_index: int = 0,
        seq_len_dim_index: int = -1,
        kv_tensor_format: str | None = None,
    ):
        check_int("num_tensors", num_tensors, 0, UINT32_MAX)
        if isinstance(shape, (str, bytes)) or not isinstance(shape, (list, tuple)):
            raise wrong_type(f"shape must be a list or tuple of ints, got {type(shape).__name__}")
        for dim in shape:
            check_int("shape entry", dim, -(2**63), 2**63 - 1)
        if not isinstance(data_type, DataType):
            raise wrong_type(f"data_type must be a DataType, got {type(data_type).__name__}")
        if not isinstance(placement, Placement):
            raise wrong_type(f"placement must be a Placement, got {type(placement).__name__}")
        check_type("batch_dim_index", batch_dim_index, int)
        if not 0 <= batch_dim_index < max(len(shape), 1):
            raise param_invalid(f"batch_dim_index {batch_dim_index} out of range [0, {len(shape)})")
        if batch_dim_index != 0:
            raise param_invalid(
                "batch_dim_index must be 0 here: torch_kvreg addresses blocks and batch slots along dim 0"
            )
        check_int("seq_len_dim_index", seq_len_dim_index, -1, max(len(shape) - 1, -1))
        if kv_tensor_format is not None:
            check_type("kv_tensor_format", kv_tensor_format, str)
        self._num_tensors = num_tensors
        self._shape = list(shape)
        self._data_type = data_type
        self._placement = placement
        self._batch_dim = batch_dim_index
        self._seq_len_dim_index = seq_len_dim_index
        self._kv_tensor_format = kv_tensor_format

    num_tensors = property(lambda self: self._num_tensors)
    shape = property(lambda self: self._shape)
    data_type = property(lambda self: self._data_type)
    placement = property(lambda self: self._placement)
    batch_dim = property(lambda self: self._batch_dim)
    seq_len_dim_index = property(lambda self: self._seq_len_dim_index)
    kv_tensor_format = property(lambda self: self._kv_tensor_format)

    @property
    def batch_size(self) -> int:
        return self._shape[self._batch_dim]

    @property
    def size(self) -> int:
        """Bytes of one tensor."""
        return self.to_native().tensor_nbytes

    def update_dim(self, dim_index: int, dim_value: int) -> None:
        self._shape[dim_index] = dim_value

    def to_native(self, device_index: int = -1) -> native.CacheDesc:
        """torch_kvreg's CacheDesc (LLM_PARAM_INVALID for shapes it cannot describe)."""
        return native.CacheDesc(self._num_tensors, self._data_type, tuple(self._shape), self._placement, device_index)

    def __repr__(self) -> str:
        return (
            f"CacheDesc(num_tensors={self._num_tensors}, shape={self._shape}, data_type={self._data_type}, "
            f"placement={self._placement}, batch_dim_index={self._batch_dim}, "
            f"seq_len_dim_index={self._seq_len_dim_index}, kv_tensor_format={self._kv_tensor_format})"
        )


class Cache:
    """A registered or allocated cache, as ``CacheManager`` returns it; users do not build it."""

    def __init__(
        self,
        cache_id: int,
        cache_desc: CacheDesc,
        tensor_addrs: Sequence[int],
        *,
        is_blocks_cache: bool,
        is_registered: bool = True,
        tensors: list[torch.Tensor] | None = None,
    ):
        self._cache_id = cache_id
        self._cache_desc = cache_desc
        self._tensor_addrs = list(tensor_addrs)
        self._is_blocks_cache = is_blocks_cache
        self._is_registered = is_registered
        self._tensors = tensors  # allocate_cache's torch tensors (the registry owns them)

    cache_id = property(lambda self: self._cache_id)
    cache_desc = property(lambda self: self._cache_desc)
    tensor_addrs = property(lambda self: self._tensor_addrs)
    is_blocks_cache = property(lambda self: self._is_blocks_cache)

    @property
    def tensors(self) -> list[torch.Tensor] | None:
        """The torch tensors of a cache from ``allocate_cache`` (None for registered memory)."""
        return self._tensors

    def __repr__(self) -> str:
        return (
            f"Cache(cache_id={self._cache_id}, tensor_addrs={len(self._tensor_addrs)}, "
            f"is_blocks_cache={self._is_blocks_cache})"
        )


def _key_args(args: tuple, kwargs: dict[str, Any], names: Sequence[str], limit: int) -> dict[str, Any]:
    if len(args) + len(kwargs) > limit:
        raise param_invalid("too many arguments")
    values = dict(zip(names, args))
    for key, value in kwargs.items():
        if key not in (*names, "prompt_cluster_id"):
            raise param_invalid(f"unsupported argument {key!r}")
        values["cluster_id" if key == "prompt_cluster_id" else key] = value
    if "cluster_id" not in values:
        raise param_invalid("cluster_id (or prompt_cluster_id) is required")
    return values


class BlocksCacheKey:
    """Names a peer's blocks cache: ``BlocksCacheKey(cluster_id, model_id=0)``; at
    registration the cluster id is ignored (the cache is this process's).

    >>> BlocksCacheKey(0, 1)
    BlocksCacheKey(cluster_id=0, model_id=1)
    """

    def __init__(self, *args: int, **kwargs: int):
        values = _key_args(args, kwargs, ("cluster_id", "model_id"), 2)
        self._cluster_id = check_type("cluster_id", values["cluster_id"], int)
        self._model_id = check_type("model_id", values.get("model_id", 0), int)

    cluster_id = property(lambda self: self._cluster_id)
    prompt_cluster_id = cluster_id
    model_id = property(lambda self: self._model_id)

    def registry_key(self) -> str:
        return f"{KEY_PREFIX}/blocks/{self._model_id}"

    def __repr__(self) -> str:
        return f"BlocksCacheKey(cluster_id={self._cluster_id}, model_id={self._model_id})"


class CacheKey:
    """Names one batch slot of a peer's cache by request: ``CacheKey(cluster_id, req_id,
    model_id=0, prefix_id=2**64-1)``; exactly one of req_id and prefix_id is set.

    >>> CacheKey(0, 12).registry_key()
    'llm_datadist/req/12/0'
    """

    def __init__(self, *args: int, **kwargs: int):
        values = _key_args(args, kwargs, ("cluster_id", "req_id", "model_id", "prefix_id"), 4)
        if "req_id" not in values:
            raise param_invalid("req_id is required")
        self._cluster_id = check_int("cluster_id", values["cluster_id"], 0, UINT64_MAX)
        self._req_id = check_int("req_id", values["req_id"], 0, UINT64_MAX)
        self._model_id = check_int("model_id", values.get("model_id", 0), 0, UINT64_MAX)
        self._prefix_id = check_int("prefix_id", values.get("prefix_id", INVALID_ID), 0, UINT64_MAX)

    cluster_id = property(lambda self: self._cluster_id)
    prompt_cluster_id = cluster_id
    req_id = property(lambda self: self._req_id)
    model_id = property(lambda self: self._model_id)
    prefix_id = property(lambda self: self._prefix_id)

    def is_placeholder(self) -> bool:
        """req_id 2**64-1 (and no prefix): an unused batch slot in ``cache_keys``."""
        return self._req_id == INVALID_ID and self._prefix_id == INVALID_ID

    def check(self) -> None:
        if (self._req_id == INVALID_ID) == (self._prefix_id == INVALID_ID):
            raise param_invalid(f"exactly one of req_id and prefix_id must be set (< 2**64-1): {self}")

    def registry_key(self) -> str:
        if self._req_id != INVALID_ID:
            return f"{KEY_PREFIX}/req/{self._req_id}/{self._model_id}"
        return f"{KEY_PREFIX}/prefix/{self._prefix_id}/{self._model_id}"

    def __repr__(self) -> str:
        return (
            f"CacheKey(cluster_id={self._cluster_id}, req_id={self._req_id}, prefix_id={self._prefix_id}, "
            f"model_id={self._model_id})"
        )


class CacheKeyByIdAndIndex:
    """Names one batch slot of a peer's cache by its id: ``(cluster_id, cache_id, batch_index=0)``."""

    def __init__(self, cluster_id: int, cache_id: int, batch_index: int = 0):
        self._cluster_id = check_int("cluster_id", cluster_id, 0, UINT64_MAX)
        self._cache_id = check_int("cache_id", cache_id, -(2**63), 2**63 - 1)
        self._batch_index = check_int("batch_index", batch_index, 0, UINT32_MAX)

    cluster_id = property(lambda self: self._cluster_id)
    cache_id = property(lambda self: self._cache_id)
    batch_index = property(lambda self: self._batch_index)

    def __repr__(self) -> str:
        return (
            f"CacheKeyByIdAndIndex(cluster_id={self._cluster_id}, cache_id={self._cache_id}, "
            f"batch_index={self._batch_index})"
        )


def check_layer_range(name: str, layer_range: object, allow_none: bool = True) -> None:
    if layer_range is None and allow_none:
        return
    layer_range_arg(name, layer_range)


def layer_range_arg(name: str, layer_range: object) -> range:
    """``layer_range`` if it is a non-empty range(start, stop) from 0 up with step 1."""
    if not isinstance(layer_range, range):
        raise wrong_type(f"{name} must be a range, got {type(layer_range).__name__}")
    if layer_range.step != 1 or not 0 <= layer_range.start < layer_range.stop:
        raise param_invalid(f"{name} must be range(start, stop) with 0 <= start < stop and step 1, got {layer_range}")
    return layer_range


class LayerSynchronizer(abc.ABC):
    """Tells ``transfer_cache_async`` when a layer's KV is computed."""

    @abc.abstractmethod
    def synchronize_layer(self, layer_index: int, timeout_in_millis: int | None) -> bool:
        """Blocks until layer ``layer_index`` is ready; False (or a timeout) stops the transfer."""


class TransferWithCacheKeyConfig:
    """One destination of ``transfer_cache_async``: a peer's cache by key, layer ranges."""

    def __init__(
        self,
        cache_key: BlocksCacheKey | CacheKeyByIdAndIndex,
        src_layer_range: range | None = None,
        dst_layer_range: range | None = None,
        src_batch_index: int = 0,
    ):
        if not isinstance(cache_key, (BlocksCacheKey, CacheKeyByIdAndIndex)):
            raise wrong_type(
                f"cache_key must be a BlocksCacheKey or CacheKeyByIdAndIndex, got {type(cache_key).__name__}"
            )
        src_range = layer_range_arg("src_layer_range", src_layer_range)
        dst_range = layer_range_arg("dst_layer_range", dst_layer_range)
        if len(src_range) != len(dst_range):
            raise param_invalid("src_layer_range and dst_layer_range must have the same length")
        check_int("src_batch_index", src_batch_index, 0, UINT32_MAX)
        if isinstance(cache_key, BlocksCacheKey) and src_batch_index != 0:
            raise param_invalid("src_batch_index must be 0 with a BlocksCacheKey")
        self.cache_key = cache_key
        self.src_layer_range = src_range
        self.dst_layer_range = dst_range
        self.src_batch_index = src_batch_index
        self.dst_cluster_id = cache_key.cluster_id

    def __repr__(self) -> str:
        return (
            f"TransferWithCacheKeyConfig(cache_key={self.cache_key}, src_layer_range={self.src_layer_range}, "
            f"dst_layer_range={self.dst_layer_range}, src_batch_index={self.src_batch_index})"
        )


class TransferConfig:
    """A destination by raw peer addresses: accepted for construction; transferring to
    addresses the peer did not register is refused (LLM_FEATURE_NOT_ENABLED)."""

    def __init__(
        self,
        dst_cluster_id: int,
        dst_addrs: Sequence[int],
        src_layer_range: range | None = None,
        src_batch_index: int = 0,
    ):
        self.dst_cluster_id = check_int("dst_cluster_id", dst_cluster_id, 0, UINT64_MAX)
        if not isinstance(dst_addrs, (list, tuple)):
            raise wrong_type("dst_addrs must be a list of ints")
        self.dst_addrs = [check_int("dst_addrs entry", a, 0, UINT64_MAX) for a in dst_addrs]
        check_layer_range("src_layer_range", src_layer_range)
        self.src_layer_range = src_layer_range
        self.src_batch_index = check_int("src_batch_index", src_batch_index, 0, UINT32_MAX)
        self.dst_layer_range = None


class CacheTask:
    """The handle of ``transfer_cache_async``: one status per transfer config."""

    def __init__(self, count: int):
        self._statuses: list[LLMStatusCode] = [LLMStatusCode.LLM_SUCCESS] * count
        self._done = threading.Event()

    def _finish(self) -> None:
        self._done.set()

    def _wait(self, timeout_in_millis: int | None) -> bool:
        if timeout_in_millis is not None:
            check_int("timeout_in_millis", timeout_in_millis, 0, UINT32_MAX)
        return self._done.wait(None if timeout_in_millis is None else timeout_in_millis / 1000)

    def synchronize(self, timeout_in_millis: int | None = None) -> LLMStatusCode:
        """The first failure, LLM_SUCCESS, or LLM_TIMEOUT when not done within the timeout."""
        if not self._wait(timeout_in_millis):
            return LLMStatusCode.LLM_TIMEOUT
        failures = [s for s in self._statuses if s != LLMStatusCode.LLM_SUCCESS]
        return failures[0] if failures else LLMStatusCode.LLM_SUCCESS

    def get_results(self, timeout_in_millis: int | None = None) -> list[LLMStatusCode]:
        """One status per transfer config (LLM_TIMEOUT for each when not done in time)."""
        if not self._wait(timeout_in_millis):
            return [LLMStatusCode.LLM_TIMEOUT] * len(self._statuses)
        return list(self._statuses)
