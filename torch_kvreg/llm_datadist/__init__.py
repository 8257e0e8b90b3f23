"""LLM-DataDist's Python API on torch_kvreg: programs written for ``llm_datadist`` run with
their import changed to ``torch_kvreg.llm_datadist`` (and CPU or CUDA tensors in place of
NPU ones). A facade: the native registry and remote engine hold every fact.

>>> from torch_kvreg.llm_datadist import LLMDataDist, LLMRole, CacheDesc, DataType, Placement
>>> import torch
>>> datadist = LLMDataDist(LLMRole.PROMPT, 0)
>>> datadist.init({})
>>> tensors = [torch.ones(3, 10), torch.ones(3, 10)]
>>> desc = CacheDesc(2, [3, 10], DataType.DT_FLOAT, Placement.HOST)
>>> cache = datadist.cache_manager.register_cache(desc, [t.data_ptr() for t in tensors])
>>> datadist.cache_manager.unregister_cache(cache.cache_id)
>>> datadist.finalize()
"""

from ..errors import LLMException, LLMStatusCode
from ..types import DataType, Placement
from ..types import LlmRole as LLMRole
from .cache_manager import CacheManager
from .config import LLMClusterInfo, LLMConfig, LlmConfig
from .datadist import LLMDataDist
from .types import (
    BlocksCacheKey,
    Cache,
    CacheDesc,
    CacheKey,
    CacheKeyByIdAndIndex,
    CacheTask,
    LayerSynchronizer,
    MemInfo,
    Memtype,
    RegisterMemStatus,
    TransferConfig,
    TransferWithCacheKeyConfig,
)

__all__ = [
    "BlocksCacheKey",
    "Cache",
    "CacheDesc",
    "CacheKey",
    "CacheKeyByIdAndIndex",
    "CacheManager",
    "CacheTask",
    "DataType",
    "LLMClusterInfo",
    "LLMConfig",
    "LLMDataDist",
    "LLMException",
    "LLMRole",
    "LLMStatusCode",
    "LayerSynchronizer",
    "LlmConfig",
    "MemInfo",
    "Memtype",
    "Placement",
    "RegisterMemStatus",
    "TransferConfig",
    "TransferWithCacheKeyConfig",
]
