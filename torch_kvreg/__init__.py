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
    "register_kv_cache",
    "registered_caches",
    "swap_blocks",
    "unregister_kv_cache",
    "usage",
]
