"""torch_kvreg: KV-cache registration and block transfer for PyTorch, LLM-DataDist style."""

import importlib.metadata

from . import metrics
from .allocate import allocate_kv_cache
from .counters import reset_stats, stats
from .errors import (
    LLMException,
    LLMIndexError,
    LLMKVCacheNotExistError,
    LLMParamInvalidError,
    LLMStatusCode,
    LLMTypeError,
)
from .geometry import KVGeometry, TokenPlan, copy_kv_tokens, plan_kv_tokens
from .inflight import Transfer
from .layouts import register_layer_caches
from .registry import (
    cache_keys,
    finalize,
    find_cache_key,
    get_cache,
    initialize,
    is_initialized,
    limits,
    register_kv_cache,
    registered_caches,
    registered_caches_table,
    remove_cache_key,
    unregister_kv_cache,
    usage,
)
from .remote import (
    Notification,
    get_notifications,
    link_clusters,
    listen_address,
    pull_kv_blocks,
    pull_kv_blocks_async,
    pull_kv_cache,
    pull_kv_cache_async,
    pull_kv_tokens,
    pull_kv_tokens_async,
    push_kv_blocks,
    push_kv_blocks_async,
    push_kv_tokens,
    push_kv_tokens_async,
    unlink_clusters,
    wait_notices,
)
from .transfer import (
    copy_kv_blocks,
    copy_kv_blocks_async,
    copy_kv_cache,
    copy_strategy,
    set_copy_strategy,
    swap_blocks,
)
from .types import (
    Cache,
    CacheDesc,
    CacheIndex,
    ClusterInfo,
    DataType,
    Limits,
    LLMRole,
    LlmRole,
    Placement,
    RegisterCfg,
    Usage,
)

try:  # the installed distribution's version (wheel or editable install)
    __version__ = importlib.metadata.version("torch_kvreg")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "metrics",
    "registered_caches_table",
    "reset_stats",
    "stats",
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
    "Notification",
    "Placement",
    "RegisterCfg",
    "KVGeometry",
    "TokenPlan",
    "Transfer",
    "Usage",
    "allocate_kv_cache",
    "cache_keys",
    "copy_kv_blocks",
    "copy_kv_blocks_async",
    "copy_strategy",
    "copy_kv_cache",
    "copy_kv_tokens",
    "finalize",
    "find_cache_key",
    "get_cache",
    "get_notifications",
    "initialize",
    "is_initialized",
    "limits",
    "link_clusters",
    "listen_address",
    "plan_kv_tokens",
    "pull_kv_blocks",
    "pull_kv_blocks_async",
    "pull_kv_cache",
    "pull_kv_cache_async",
    "pull_kv_tokens",
    "pull_kv_tokens_async",
    "push_kv_blocks",
    "push_kv_blocks_async",
    "push_kv_tokens",
    "push_kv_tokens_async",
    "register_kv_cache",
    "register_layer_caches",
    "registered_caches",
    "remove_cache_key",
    "set_copy_strategy",
    "swap_blocks",
    "unlink_clusters",
    "unregister_kv_cache",
    "usage",
    "wait_notices",
]
