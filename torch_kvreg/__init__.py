"""torch_kvreg: KV-cache registration and block transfer for PyTorch, LLM-DataDist style."""

from .errors import (
    LLMException,
    LLMIndexError,
    LLMKVCacheNotExistError,
    LLMParamInvalidError,
    LLMStatusCode,
    LLMTypeError,
)
from .registry import (
    finalize,
    get_cache,
    initialize,
    is_initialized,
    limits,
    register_kv_cache,
    registered_caches,
    unregister_kv_cache,
    usage,
)
from .remote import (
    link_clusters,
    listen_address,
    pull_kv_blocks,
    pull_kv_cache,
    push_kv_blocks,
    unlink_clusters,
)
from .transfer import copy_kv_blocks, copy_kv_cache, swap_blocks
from .types import (
    Cache,
    CacheDesc,
    CacheIndex,
    ClusterInfo,
    DataType,
    Limits,
    LlmRole,
    LLMRole,
    Placement,
    RegisterCfg,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "Cache",
    "CacheDesc",
    "CacheIndex",
    "ClusterInfo",
    "DataType",
    "LLMException",
    "LLMIndexError",
    "LLMKVCacheNotExistError",
    "LLMParamInvalidError",
    "LLMRole",
    "LLMStatusCode",
    "LLMTypeError",
    "Limits",
    "LlmRole",
    "Placement",
    "RegisterCfg",
    "Usage",
    "copy_kv_blocks",
    "copy_kv_cache",
    "finalize",
    "get_cache",
    "initialize",
    "is_initialized",
    "limits",
    "link_clusters",
    "listen_address",
    "pull_kv_blocks",
    "pull_kv_cache",
    "push_kv_blocks",
    "register_kv_cache",
    "registered_caches",
    "swap_blocks",
    "unlink_clusters",
    "unregister_kv_cache",
    "usage",
]
