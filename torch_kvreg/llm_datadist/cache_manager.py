"""LLM-DataDist's CacheManager over torch_kvreg's registry and remote engine: it translates
names, keys and layer ranges, and keeps no registration state of its own."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import torch

from .. import registry, remote, transfer
from .. import verify as verification
from ..allocate import allocate_kv_cache
from ..errors import LLMException, LLMStatusCode, make_error, param_invalid, raises_llm, wrong_type
from ..types import Placement, RegisterCfg
from .config import UINT32_MAX, check_int
from .session import Session
from .types import (
    BlocksCacheKey,
    Cache,
    CacheDesc,
    CacheKey,
    CacheKeyByIdAndIndex,
    CacheTask,
    LayerSynchronizer,
    TransferConfig,
    TransferWithCacheKeyConfig,
    check_layer_range,
)

log = logging.getLogger("torch_kvreg.llm_datadist")
TENSORS_PER_LAYER = 2


def _not_enabled(what: str, why: str) -> LLMException:
    return make_error(LLMStatusCode.LLM_FEATURE_NOT_ENABLED, f"{what} {why}")


def _cache(value: object, name: str = "cache") -> Cache:
    if not isinstance(value, Cache):
        raise wrong_type(f"{name} must be a Cache, got {type(value).__name__}")
    return value


def _int_list(value: object, name: str) -> list[int]:
    if not isinstance(value, (list, tuple)):
        raise wrong_type(f"{name} must be a list or tuple of ints, got {type(value).__name__}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int):
            raise wrong_type(f"{name} entries must be ints, got {type(item).__name__}")
    return list(value)


def _remote_accessible(value: object) -> bool:
    """Caches registered through CacheManager are remotely reachable unless the caller says
    False: upstream's rule for DEVICE caches, applied to HOST too, since CPU tensors stand in
    for device memory here."""
    if value is None:
        return True
    if not isinstance(value, bool):
        raise wrong_type(f"remote_accessible must be a bool or None, got {type(value).__name__}")
    return value


def _tensors_per_layer(value: int) -> int:
    return check_int("tensor_num_per_layer", value, 1, UINT32_MAX)


class CacheManager:
    """Registration, allocation and transfers of caches, as ``LLMDataDist.cache_manager``."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def _check(self) -> None:
        self._session.check("this CacheManager belongs to a finalized LLMDataDist; call init() again")

    # --- registration -----------------------------------------------------------------
    def _register(
        self, cache_desc: CacheDesc, addrs: Sequence[int], keys: list[str], remote_accessible: bool | None, blocks: bool
    ) -> Cache:
        self._check()
        if not isinstance(cache_desc, CacheDesc):
            raise wrong_type(f"cache_desc must be a llm_datadist CacheDesc, got {type(cache_desc).__name__}")
        addr_list = _int_list(addrs, "addrs")
        if not addr_list:
            raise param_invalid("addrs can not be empty")
        cfg = RegisterCfg(remote_accessible=_remote_accessible(remote_accessible))
        native = registry.register_kv_cache(cache_desc.to_native(), addr_list, cfg, keys=keys)
        log.info("registered cache %d (%s)", native.cache_id, "blocks" if blocks else "batch")
        return Cache(native.cache_id, cache_desc, native.tensor_addrs, is_blocks_cache=blocks)

    @raises_llm
    def register_cache(
        self,
        cache_desc: CacheDesc,
        addrs: Sequence[int],
        cache_keys: Sequence[CacheKey] = (),
        remote_accessible: bool | None = None,
    ) -> Cache:
        """Registers memory as a cache of batch slots; ``cache_keys[i]`` names slot i for
        peers' ``pull_cache(CacheKey(...))`` (a key with req_id 2**64-1 leaves a slot unnamed)."""
        if not isinstance(cache_keys, (list, tuple)):
            raise wrong_type(f"cache_keys must be a list or tuple of CacheKey, got {type(cache_keys).__name__}")
        keys = []
        for key in cache_keys:
            if not isinstance(key, CacheKey):
                raise wrong_type(f"cache_keys entries must be CacheKey, got {type(key).__name__}")
            keys.append("" if key.is_placeholder() else key.registry_key())
        return self._register(cache_desc, addrs, keys, remote_accessible, blocks=False)

    @raises_llm
    def register_blocks_cache(
        self,
        cache_desc: CacheDesc,
        addrs: Sequence[int],
        blocks_cache_key: BlocksCacheKey | None = None,
        remote_accessible: bool | None = None,
    ) -> Cache:
        """Registers memory as a blocks cache; peers reach it by ``BlocksCacheKey(our id, model_id)``."""
        if blocks_cache_key is not None and not isinstance(blocks_cache_key, BlocksCacheKey):
            raise wrong_type(f"blocks_cache_key must be a BlocksCacheKey, got {type(blocks_cache_key).__name__}")
        keys = [] if blocks_cache_key is None else [blocks_cache_key.registry_key()]
        return self._register(cache_desc, addrs, keys, remote_accessible, blocks=True)

    @raises_llm
    def unregister_cache(self, cache_id: int) -> None:
        self._check()
        if isinstance(cache_id, bool) or not isinstance(cache_id, int):
            raise wrong_type(f"cache_id must be an int, got {type(cache_id).__name__}")
        registry.unregister_kv_cache(cache_id)

    def _allocate(self, cache_desc: CacheDesc, keys: list[str], blocks: bool) -> Cache:
        self._check()
        if not isinstance(cache_desc, CacheDesc):
            raise wrong_type(f"cache_desc must be a llm_datadist CacheDesc, got {type(cache_desc).__name__}")
        native_desc = cache_desc.to_native()
        if native_desc.placement == Placement.DEVICE:
            if not torch.cuda.is_available():
                raise _not_enabled("allocate_cache", "with Placement.DEVICE needs a CUDA device; none is available")
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        dtype = native_desc.data_type.to_torch()
        cfg = RegisterCfg(remote_accessible=True)
        if device.type == "cpu":
            # Shared memory: a same-host peer maps it and its pulls are local copies.
            native, tensors = allocate_kv_cache(native_desc.num_tensors, native_desc.shape, dtype, cfg, keys=keys)
        else:
            try:
                tensors = [
                    torch.empty(native_desc.shape, dtype=dtype, device=device) for _ in range(native_desc.num_tensors)
                ]
            except (RuntimeError, MemoryError) as exc:
                raise make_error(
                    LLMStatusCode.LLM_DEVICE_OUT_OF_MEMORY, f"cannot allocate {native_desc!r}: {exc}"
                ) from None
            native = registry.register_kv_cache(tensors, cfg, keys=keys)
        return Cache(
            native.cache_id,
            cache_desc,
            native.tensor_addrs,
            is_blocks_cache=blocks,
            is_registered=False,
            tensors=tensors,
        )

    @raises_llm
    def allocate_cache(self, cache_desc: CacheDesc, cache_keys: Sequence[CacheKey] = ()) -> Cache:
        """A new cache in torch memory that the registry owns until ``deallocate_cache``."""
        if not isinstance(cache_keys, (list, tuple)):
            raise wrong_type(f"cache_keys must be a list or tuple of CacheKey, got {type(cache_keys).__name__}")
        for key in cache_keys:
            if not isinstance(key, CacheKey):
                raise wrong_type(f"cache_keys entries must be CacheKey, got {type(key).__name__}")
        keys = ["" if key.is_placeholder() else key.registry_key() for key in cache_keys]
        return self._allocate(cache_desc, keys, blocks=False)

    @raises_llm
    def allocate_blocks_cache(self, cache_desc: CacheDesc, blocks_cache_key: BlocksCacheKey | None = None) -> Cache:
        if blocks_cache_key is not None and not isinstance(blocks_cache_key, BlocksCacheKey):
            raise wrong_type(f"blocks_cache_key must be a BlocksCacheKey, got {type(blocks_cache_key).__name__}")
        keys = [] if blocks_cache_key is None else [blocks_cache_key.registry_key()]
        return self._allocate(cache_desc, keys, blocks=True)

    def _deallocate(self, cache: Cache, blocks: bool) -> None:
        self._check()
        cache = _cache(cache)
        if cache.is_blocks_cache != blocks:
            raise param_invalid(f"{cache} is {'' if cache.is_blocks_cache else 'not '}a blocks cache")
        registry.unregister_kv_cache(cache.cache_id)
        cache._tensors = None
        cache._tensor_addrs = []

    @raises_llm
    def deallocate_cache(self, cache: Cache) -> None:
        self._deallocate(cache, blocks=False)

    @raises_llm
    def deallocate_blocks_cache(self, cache: Cache) -> None:
        self._deallocate(cache, blocks=True)

    @raises_llm
    def remove_cache_key(self, cache_key: CacheKey) -> None:
        """Peers can no longer pull the slot this key named; the cache stays."""
        self._check()
        if not isinstance(cache_key, CacheKey):
            raise wrong_type(f"cache_key must be a CacheKey, got {type(cache_key).__name__}")
        registry.remove_cache_key(cache_key.registry_key())

    # --- local copies -----------------------------------------------------------------
    @raises_llm
    def copy_cache(
        self,
        dst: Cache,
        src: Cache,
        dst_batch_index: int = 0,
        src_batch_index: int = 0,
        offset: int = 0,
        size: int = -1,
        req_id: int | None = None,
        *,
        verify: bool = False,
    ) -> None:
        """Copies a batch slot (destination first, as upstream). ``verify`` (torch_kvreg's
        extension, here and on every copy, pull and push of this class): CRC-32C of each
        block compared once it landed, see torch_kvreg.verify; option llm.VerifyTransfers
        verifies every transfer."""
        self._check()
        dst, src = _cache(dst, "dst"), _cache(src, "src")
        check_int("dst_batch_index", dst_batch_index, 0, UINT32_MAX)
        check_int("src_batch_index", src_batch_index, 0, UINT32_MAX)
        if size != -1 and check_int("size", size, 1, 2**63 - 1) <= 0:
            raise param_invalid(f"size must be -1 or > 0, got {size}")
        transfer.copy_kv_cache(
            src.cache_id, dst.cache_id, src_batch_index, dst_batch_index, offset, size, verify=verify
        )

    @raises_llm
    def copy_blocks(self, cache: Cache, copy_block_info: Mapping[int, Sequence[int]], *, verify: bool = False) -> None:
        """Within one blocks cache: ``{src_block: [dst_block, ...]}``."""
        self._check()
        cache = _cache(cache)
        if not cache.is_blocks_cache:
            raise param_invalid("copy_blocks needs a blocks cache")
        if not isinstance(copy_block_info, Mapping):
            raise wrong_type(f"copy_block_info must be a dict, got {type(copy_block_info).__name__}")
        src_blocks, dst_blocks = [], []
        for src, dsts in copy_block_info.items():
            for dst in _int_list(dsts, "copy_block_info values"):
                src_blocks.append(src)
                dst_blocks.append(dst)
        transfer.copy_kv_blocks(cache.cache_id, cache.cache_id, src_blocks, dst_blocks, verify=verify)

    @raises_llm
    def swap_blocks(
        self, src_cache: Cache, dst_cache: Cache, src_to_dst: Mapping[int, int], *, verify: bool = False
    ) -> None:
        """``{src_block: dst_block}`` between two blocks caches (any placements here)."""
        self._check()
        src_cache, dst_cache = _cache(src_cache, "src_cache"), _cache(dst_cache, "dst_cache")
        if not (src_cache.is_blocks_cache and dst_cache.is_blocks_cache):
            raise param_invalid("swap_blocks needs two blocks caches")
        transfer.swap_blocks(src_cache.cache_id, dst_cache.cache_id, src_to_dst, verify=verify)

    # --- between processes ------------------------------------------------------------
    @staticmethod
    def _layers(kwargs: dict) -> tuple:
        unknown = set(kwargs) - {"src_layer_range", "dst_layer_range", "tensor_num_per_layer"}
        if unknown:
            raise wrong_type(f"unexpected keyword arguments {sorted(unknown)}")
        src, dst = kwargs.get("src_layer_range"), kwargs.get("dst_layer_range")
        check_layer_range("src_layer_range", src)
        check_layer_range("dst_layer_range", dst)
        return src, dst, _tensors_per_layer(kwargs.get("tensor_num_per_layer", TENSORS_PER_LAYER))

    @raises_llm
    def pull_blocks(
        self,
        src_cache_key: BlocksCacheKey,
        dst_cache: Cache,
        src_blocks: Sequence[int] = (),
        dst_blocks: Sequence[int] = (),
        *,
        verify: bool = False,
        **kwargs: Any,
    ) -> None:
        """Reads blocks of a peer's blocks cache (``BlocksCacheKey``) into ``dst_cache``."""
        self._check()
        verification.wanted(verify)
        dst_cache = _cache(dst_cache, "dst_cache")
        src_layers, dst_layers, per_layer = self._layers(kwargs)
        src_blocks, dst_blocks = _int_list(src_blocks, "src_blocks"), _int_list(dst_blocks, "dst_blocks")
        if not dst_cache.is_blocks_cache:
            raise param_invalid("dst_cache must be a blocks cache")
        if not dst_blocks:
            raise param_invalid("dst_blocks can not be empty")
        if isinstance(src_cache_key, (CacheKey, CacheKeyByIdAndIndex)):
            raise _not_enabled(
                "pull_blocks from a batch cache (CacheKey, CacheKeyByIdAndIndex)",
                "is not supported; register the prompt's cache as a blocks cache",
            )
        if not isinstance(src_cache_key, BlocksCacheKey):
            raise wrong_type(f"src_cache_key must be a BlocksCacheKey, got {type(src_cache_key).__name__}")
        if not src_blocks:
            raise param_invalid("src_blocks can not be empty with a BlocksCacheKey")
        remote.transfer_blocks(
            "READ",
            registry.get_cache(dst_cache.cache_id),
            src_cache_key.cluster_id,
            src_cache_key.registry_key(),
            src_blocks,
            dst_blocks,
            dst_layers,
            src_layers,
            per_layer,
            verify=verify,
        )

    @raises_llm
    def push_blocks(
        self,
        dst_cache_key: BlocksCacheKey,
        src_cache: Cache,
        src_blocks: Sequence[int] = (),
        dst_blocks: Sequence[int] = (),
        src_layer_range: range | None = None,
        dst_layer_range: range | None = None,
        tensor_num_per_layer: int = TENSORS_PER_LAYER,
        *,
        verify: bool = False,
    ) -> None:
        """Writes blocks of ``src_cache`` into a peer's blocks cache (``BlocksCacheKey``)."""
        self._check()
        verification.wanted(verify)
        if not isinstance(dst_cache_key, BlocksCacheKey):
            raise wrong_type(f"dst_cache_key must be a BlocksCacheKey, got {type(dst_cache_key).__name__}")
        src_cache = _cache(src_cache, "src_cache")
        src_blocks, dst_blocks = _int_list(src_blocks, "src_blocks"), _int_list(dst_blocks, "dst_blocks")
        src_layers, dst_layers, per_layer = self._layers(
            {
                "src_layer_range": src_layer_range,
                "dst_layer_range": dst_layer_range,
                "tensor_num_per_layer": tensor_num_per_layer,
            }
        )
        if not src_cache.is_blocks_cache:
            raise param_invalid("src_cache must be a blocks cache")
        if not dst_blocks:
            raise param_invalid("dst_blocks can not be empty")
        remote.transfer_blocks(
            "WRITE",
            registry.get_cache(src_cache.cache_id),
            dst_cache_key.cluster_id,
            dst_cache_key.registry_key(),
            src_blocks,
            dst_blocks,
            src_layers,
            dst_layers,
            per_layer,
            verify=verify,
        )

    @raises_llm
    def pull_cache(
        self,
        cache_key: CacheKey | CacheKeyByIdAndIndex,
        cache: Cache,
        batch_index: int = 0,
        size: int = -1,
        *,
        verify: bool = False,
        **kwargs: Any,
    ) -> None:
        """Reads a peer's batch slot (``CacheKey`` or ``CacheKeyByIdAndIndex``) into slot
        ``batch_index`` of ``cache``."""
        self._check()
        verification.wanted(verify)
        cache = _cache(cache)
        src_layers, dst_layers, per_layer = self._layers(kwargs)
        check_int("batch_index", batch_index, 0, UINT32_MAX)
        check_int("size", size, -1, 2**63 - 1)
        if size == 0:
            raise param_invalid("size must be -1 or > 0")
        if cache.is_blocks_cache:
            raise param_invalid("cache can not be a blocks cache")
        local = registry.get_cache(cache.cache_id)
        if isinstance(cache_key, CacheKey):
            cache_key.check()
            remote.transfer_slice(
                "READ",
                local,
                cache_key.cluster_id,
                cache_key.registry_key(),
                None,
                batch_index,
                size,
                dst_layers,
                src_layers,
                per_layer,
                verify=verify,
            )
        elif isinstance(cache_key, CacheKeyByIdAndIndex):
            remote.transfer_slice(
                "READ",
                local,
                cache_key.cluster_id,
                cache_key.cache_id,
                cache_key.batch_index,
                batch_index,
                size,
                dst_layers,
                src_layers,
                per_layer,
                verify=verify,
            )
        else:
            raise wrong_type(f"cache_key must be a CacheKey or CacheKeyByIdAndIndex, got {type(cache_key).__name__}")

    @raises_llm
    def push_cache(
        self,
        dst_cache_key: CacheKeyByIdAndIndex,
        src_cache: Cache,
        src_batch_index: int = 0,
        src_layer_range: range | None = None,
        dst_layer_range: range | None = None,
        size: int = -1,
        tensor_num_per_layer: int = TENSORS_PER_LAYER,
        *,
        verify: bool = False,
    ) -> None:
        """Writes slot ``src_batch_index`` of ``src_cache`` into a peer's slot."""
        self._check()
        verification.wanted(verify)
        if not isinstance(dst_cache_key, CacheKeyByIdAndIndex):
            raise wrong_type(f"dst_cache_key must be a CacheKeyByIdAndIndex, got {type(dst_cache_key).__name__}")
        src_cache = _cache(src_cache, "src_cache")
        check_int("src_batch_index", src_batch_index, 0, UINT32_MAX)
        if size != -1:
            raise param_invalid(f"size must be -1 for push_cache, got {size}")
        src_layers, dst_layers, per_layer = self._layers(
            {
                "src_layer_range": src_layer_range,
                "dst_layer_range": dst_layer_range,
                "tensor_num_per_layer": tensor_num_per_layer,
            }
        )
        if src_cache.is_blocks_cache:
            raise param_invalid("src_cache can not be a blocks cache")
        remote.transfer_slice(
            "WRITE",
            registry.get_cache(src_cache.cache_id),
            dst_cache_key.cluster_id,
            dst_cache_key.cache_id,
            dst_cache_key.batch_index,
            src_batch_index,
            -1,
            src_layers,
            dst_layers,
            per_layer,
            verify=verify,
        )

    def transfer_cache_async(
        self,
        src_cache: Cache,
        layer_synchronizer: LayerSynchronizer,
        transfer_configs: Sequence[TransferWithCacheKeyConfig],
        src_block_indices: Sequence[int] | None = None,
        dst_block_indices: Sequence[int] | None = None,
        dst_block_memory_size: int | None = None,
    ) -> CacheTask:
        """Pushes ``src_cache`` to every config's peer cache layer by layer: layer i moves
        only after ``layer_synchronizer.synchronize_layer(i, timeout)`` returned True; a
        False or a timeout fails the task (LLM_TIMEOUT) and moves no later layer."""
        raises_llm(self._check)()
        src_cache = raises_llm(_cache)(src_cache, "src_cache")
        if not isinstance(layer_synchronizer, LayerSynchronizer):
            raise wrong_type(f"layer_synchronizer must be a LayerSynchronizer, got {type(layer_synchronizer).__name__}")
        if not isinstance(transfer_configs, (list, tuple)) or not transfer_configs:
            raise wrong_type("transfer_configs must be a non-empty list of TransferWithCacheKeyConfig")
        for config in transfer_configs:
            if isinstance(config, TransferConfig):
                raise _not_enabled(
                    "transfer_cache_async to raw peer addresses (TransferConfig)",
                    "is not supported; use TransferWithCacheKeyConfig",
                )
            if not isinstance(config, TransferWithCacheKeyConfig):
                raise wrong_type(
                    f"transfer_configs entries must be TransferWithCacheKeyConfig, got {type(config).__name__}"
                )
        src_blocks = None if src_block_indices is None else _int_list(src_block_indices, "src_block_indices")
        dst_blocks = None if dst_block_indices is None else _int_list(dst_block_indices, "dst_block_indices")
        if (src_blocks is None) != (dst_blocks is None):
            raise param_invalid("give both src_block_indices and dst_block_indices, or neither")
        if dst_block_memory_size is not None:
            check_int("dst_block_memory_size", dst_block_memory_size, 1, 2**63 - 1)
            if dst_block_memory_size != src_cache.cache_desc.to_native().block_nbytes:
                raise param_invalid("dst_block_memory_size must equal the source block size")
        local = raises_llm(registry.get_cache)(src_cache.cache_id)
        wait_ms = int(registry.option("llm.SyncKvCacheWaitTime") or 1000)
        task = CacheTask(len(transfer_configs))
        layers = sorted({layer for config in transfer_configs for layer in config.src_layer_range})

        def push_layer(config: TransferWithCacheKeyConfig, layer: int) -> None:
            dst_layer = config.dst_layer_range[layer - config.src_layer_range.start]
            key = config.cache_key
            if isinstance(key, BlocksCacheKey):
                blocks = list(range(local.cache_desc.shape[0])) if src_blocks is None else src_blocks
                targets = blocks if dst_blocks is None else dst_blocks
                remote.transfer_blocks(
                    "WRITE",
                    local,
                    key.cluster_id,
                    key.registry_key(),
                    blocks,
                    targets,
                    range(layer, layer + 1),
                    range(dst_layer, dst_layer + 1),
                    TENSORS_PER_LAYER,
                )
            else:
                remote.transfer_slice(
                    "WRITE",
                    local,
                    key.cluster_id,
                    key.cache_id,
                    key.batch_index,
                    config.src_batch_index,
                    -1,
                    range(layer, layer + 1),
                    range(dst_layer, dst_layer + 1),
                    TENSORS_PER_LAYER,
                )

        def run() -> None:
            try:
                for layer in layers:
                    try:
                        ready = layer_synchronizer.synchronize_layer(layer, wait_ms)
                    except Exception as exc:  # the user's synchronizer failed
                        log.warning("synchronize_layer(%d) raised %r", layer, exc)
                        ready = False
                    if not ready:
                        for i, status in enumerate(task._statuses):
                            if status == LLMStatusCode.LLM_SUCCESS:
                                task._statuses[i] = LLMStatusCode.LLM_TIMEOUT
                        return
                    for i, config in enumerate(transfer_configs):
                        if layer not in config.src_layer_range or task._statuses[i] != LLMStatusCode.LLM_SUCCESS:
                            continue
                        try:
                            raises_llm(push_layer)(config, layer)
                        except LLMException as exc:
                            task._statuses[i] = exc.status_code
                        except Exception as exc:
                            log.warning("transfer_cache_async layer %d failed: %r", layer, exc)
                            task._statuses[i] = LLMStatusCode.LLM_FAILED
            finally:
                task._finish()

        threading.Thread(target=run, name="kvreg-transfer-cache", daemon=True).start()
        return task

    def remap_registered_memory(self, mem_infos: object) -> NoReturn:
        raise _not_enabled(
            "remap_registered_memory",
            "remaps Ascend device memory after a fault; it has no meaning for CPU or CUDA memory",
        )
