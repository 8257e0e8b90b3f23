"""register_layer_caches: serving engines' per-layer KV-cache tensors as one registration.

Recognised layouts of one layer's tensor (num_blocks = N, block_size = B, heads = H,
head dim = D):

- ``flash_attn``: vLLM's FlashAttention layout ``(2, N, B, H, D)`` (NHD). A view whose
  memory is ``(2, N, H, B, D)`` (HND, as vLLM builds it for some backends) registers that
  physical layout. K and V become two tensors.
- ``flashinfer``: ``(N, 2, B, H, D)`` (or its HND view of ``(N, 2, H, B, D)``): K and V of a
  block are adjacent, so the layer is one tensor whose blocks hold both.
- ``mla``: ``(N, B, D)``, a latent cache: one tensor per layer.
- ``vllm_cpu``: vLLM's CPU attention layout ``(N, H, B, 2 * D)``: within each block and
  head, the K tile (dim-major: element ``d * B + t``, as vLLM's CPU kernels write it) then the
  V tile (token-major); one tensor per layer. Whole blocks move as bytes, so this matters
  only to token-level transfers (``KVGeometry`` preset ``vllm_cpu``). vLLM hands every layer as a view
  of one storage; each view is contiguous, so each layer registers as its own tensor.

Tensors are registered in layer order (K, V per layer for flash_attn); layers given twice
(the same tensor under several names: shared KV) are registered once. Block i of every
registered tensor is block i of the engine's block table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from . import _C
from .errors import param_invalid, raises_llm, wrong_type
from .registry import _cfg_args, get_cache
from .types import Cache, RegisterCfg

LAYOUTS = ("flash_attn", "flashinfer", "mla", "vllm_cpu")
_HND = (0, 1, 3, 2, 4)  # swaps block_size and heads


def _physical(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself when contiguous, or the contiguous tensor an HND view permutes."""
    if tensor.is_contiguous():
        return tensor
    if tensor.dim() == 5:
        physical = tensor.permute(*_HND)
        if physical.is_contiguous():
            return physical
    raise param_invalid(
        f"a layer tensor of shape {tuple(tensor.shape)} and strides {tensor.stride()} is neither "
        "contiguous nor an HND view of a contiguous tensor"
    )


def detect_layout(tensor: torch.Tensor) -> str:
    """The layout of one layer's tensor, by its shape (see the module docstring).

    >>> detect_layout(torch.zeros(2, 16, 4, 2, 8)), detect_layout(torch.zeros(16, 2, 4, 2, 8))
    ('flash_attn', 'flashinfer')
    >>> detect_layout(torch.zeros(16, 4, 64)), detect_layout(torch.zeros(16, 2, 32, 128))
    ('mla', 'vllm_cpu')
    """
    if tensor.dim() == 5 and tensor.shape[0] == 2 and tensor.shape[1] != 2:
        return "flash_attn"
    if tensor.dim() == 5 and tensor.shape[1] == 2 and tensor.shape[0] != 2:
        return "flashinfer"
    if tensor.dim() == 3:
        return "mla"
    if tensor.dim() == 4:
        return "vllm_cpu"
    if tensor.dim() == 5 and tensor.shape[0] == 2 and tensor.shape[1] == 2:
        raise param_invalid(
            f"shape {tuple(tensor.shape)} fits both flash_attn (2, N, ...) and flashinfer (N, 2, ...); pass layout="
        )
    raise param_invalid(
        f"a layer tensor of shape {tuple(tensor.shape)} is no recognised KV-cache layout: "
        "flash_attn (2, N, B, H, D), flashinfer (N, 2, B, H, D), mla (N, B, D) or vllm_cpu (N, H, B, 2*D)"
    )


def _split(tensor: torch.Tensor, layout: str) -> list[torch.Tensor]:
    """The tensors one layer registers as, block dimension first."""
    if layout == "flash_attn":
        if tensor.dim() != 5 or tensor.shape[0] != 2:
            raise param_invalid(f"flash_attn layers are (2, N, B, H, D), got {tuple(tensor.shape)}")
        physical = _physical(tensor)
        return [physical[0], physical[1]]
    if layout == "flashinfer":
        if tensor.dim() != 5 or tensor.shape[1] != 2:
            raise param_invalid(f"flashinfer layers are (N, 2, B, H, D), got {tuple(tensor.shape)}")
        return [_physical(tensor)]
    if layout == "vllm_cpu":
        if tensor.dim() != 4 or tensor.shape[3] % 2:
            raise param_invalid(f"vllm_cpu layers are (N, H, B, 2*D), got {tuple(tensor.shape)}")
        return [_physical(tensor)]
    if tensor.dim() != 3:
        raise param_invalid(f"mla layers are (N, B, D), got {tuple(tensor.shape)}")
    return [_physical(tensor)]


def _named(caches: object) -> list[tuple[str, torch.Tensor]]:
    if isinstance(caches, Mapping):
        items = list(caches.items())
    elif isinstance(caches, Sequence) and not isinstance(caches, (str, bytes)):
        items = [(str(i), tensor) for i, tensor in enumerate(caches)]
    else:
        raise wrong_type(
            f"caches must be a dict of layer name to tensor or a list of tensors, got {type(caches).__name__}"
        )
    if not items:
        raise param_invalid("caches is empty")
    for name, tensor in items:
        if not isinstance(name, str):
            raise wrong_type(f"layer names must be str, got {type(name).__name__}")
        if not isinstance(tensor, torch.Tensor):
            raise wrong_type(f"layer {name!r} is a {type(tensor).__name__}, not a Tensor")
    return items


@raises_llm
def register_layer_caches(
    caches: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    cfg: RegisterCfg | None = None,
    *,
    layout: str | None = None,
) -> Cache:
    """Registers a serving engine's per-layer caches as one cache, K,V per layer in layer
    order; ``Cache.layer_names`` / ``Cache.layer(name)`` map the engine's names to layers.

    >>> import torch, torch_kvreg
    >>> torch_kvreg.initialize()
    >>> layers = {f"model.layers.{i}.attn": torch.zeros(2, 16, 4, 2, 8) for i in range(3)}
    >>> cache = torch_kvreg.register_layer_caches(layers)
    >>> cache.cache_desc.num_tensors, cache.cache_desc.shape, cache.tensors_per_layer
    (6, (16, 4, 2, 8), 2)
    >>> cache.layer("model.layers.2.attn")
    2
    >>> torch_kvreg.finalize()
    """
    items = _named(caches)
    if layout is not None and layout not in LAYOUTS:
        raise param_invalid(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    tensors: list[torch.Tensor] = []
    names: list[str] = []
    name_layers: list[int] = []
    seen: dict[tuple, int] = {}  # (data_ptr, shape, strides) of a layer -> its registered layer
    kinds = set()
    for name, tensor in items:
        if name in names:
            raise param_invalid(f"layer name {name!r} is given twice")
        kind = layout or detect_layout(tensor)
        kinds.add(kind)
        identity = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.device)
        if identity in seen:  # one tensor under two names: shared KV, registered once
            names.append(name)
            name_layers.append(seen[identity])
            continue
        seen[identity] = len(seen)
        names.append(name)
        name_layers.append(seen[identity])
        tensors.extend(_split(tensor, kind))
    if len(kinds) > 1:
        raise param_invalid(f"layers mix layouts {sorted(kinds)}; register each layout separately")
    pin, remote = _cfg_args(cfg)
    cache_id = _C.register_tensors(tensors, pin, remote, [], names, name_layers)
    return get_cache(int(cache_id))
