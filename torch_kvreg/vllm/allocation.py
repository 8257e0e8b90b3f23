"""Where vLLM allocates its KV cache: shared memory that same-host peers can map.

vLLM's worker asks its KV connector for an allocation context at start-up
(``KVConnectorBase_V1.get_mem_pool_context``; vLLM 0.32's ``Worker.initialize_from_config``,
which the CPU worker inherits) and allocates the KV cache inside it: one backing buffer,
``torch.zeros(size, dtype=torch.int8, device=...)`` (``vllm.v1.worker.utils.allocate_kv_cache``),
which every layer's cache is a view of. Inside this context such a CPU buffer comes from
a memfd (torch_kvreg.allocate.shared_bytes) instead, so that a decoder on this host maps
the prefill's cache once and its pulls are local copies. Every other call runs as usual.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from ..allocate import shared_bytes


def _is_cpu(device: object) -> bool:
    if device is None:
        return True
    return isinstance(device, (str, int, torch.device)) and torch.device(device).type == "cpu"


class SharedKvCacheAllocation(TorchFunctionMode):
    """Turns a CPU ``torch.zeros(n, dtype=torch.int8)`` into shared memory while active;
    ``allocated`` counts the buffers it made (read by tests)."""

    def __init__(self) -> None:
        super().__init__()
        self.allocated = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if (
            func is torch.zeros
            and len(args) == 1
            and isinstance(args[0], int)
            and args[0] > 0
            and kwargs.get("dtype") == torch.int8
            and _is_cpu(kwargs.get("device"))
            and set(kwargs) <= {"dtype", "device"}
        ):
            self.allocated += 1
            return shared_bytes(args[0]).view(torch.int8)
        return func(*args, **kwargs)
