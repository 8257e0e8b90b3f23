"""vLLM's KV connector over torch_kvreg (optional extra ``torch_kvreg[vllm]``).

Load it out of tree::

    kv_transfer_config={"kv_connector": "TorchKvregConnector",
                        "kv_connector_module_path": "torch_kvreg.vllm",
                        "kv_role": "kv_producer"}   # or "kv_consumer", "kv_both"

Importing this module imports vllm; ``import torch_kvreg`` alone never does.
"""

from .connector import TorchKvregConnector, TorchKvregHandshake, TorchKvregMetadata
from .settings import ConnectorSettings, LoadSpec, ProducerAddress, RemoteSource
from .stats import TorchKvregPromMetrics, TorchKvregStats

__all__ = [
    "ConnectorSettings",
    "LoadSpec",
    "ProducerAddress",
    "RemoteSource",
    "TorchKvregConnector",
    "TorchKvregHandshake",
    "TorchKvregMetadata",
    "TorchKvregPromMetrics",
    "TorchKvregStats",
]
