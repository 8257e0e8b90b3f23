"""The connector's cache geometries: what a worker advertises of its KV cache (layout, block
size, heads and tensor-parallel rank, dtype), how that travels in kv_transfer_params, and
how a decoder plans a load from a producer whose cache differs. No vllm import.

When producer and decoder hold the same geometry a load moves whole blocks; when they differ
in block size, layout or tensor-parallel degree it moves tokens (``pull_kv_tokens``), from
every producer rank that holds heads of the decoder rank, checked by the native planner
before any byte moves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import LLMException, param_invalid, translate
from ..geometry import LAYOUTS, KVGeometry, layer_geometry, native_plan, selection
from ..types import DataType, Placement


@dataclasses.dataclass(frozen=True)
class CacheShape:
    """One worker's KV cache as a transfer sees it: its geometry (its own tensor-parallel
    rank) and its dtype (a DataType name).

    >>> shape = CacheShape(KVGeometry("flash_attn", 16, 8, 64, 2, 1), "DT_BF16")
    >>> CacheShape.from_params(shape.to_params(), rank=1) == shape
    True
    """

    geometry: KVGeometry
    dtype: str

    @classmethod
    def of_layers(cls, tensors: Sequence[torch.Tensor], tp_size: int, tp_rank: int) -> CacheShape | None:
        """The shape of a worker's layer tensors (None for caches without KV heads, such
        as MLA's latent cache: those move as whole blocks only)."""
        try:
            held = layer_geometry(tensors[0])
            dtype = DataType.from_torch(tensors[0].dtype).name
        except LLMException:
            return None
        geometry = KVGeometry(
            held.layout, held.block_size, held.num_kv_heads * tp_size, held.head_dim, tp_size, tp_rank
        )
        return cls(geometry, dtype)

    def rank(self, tp_rank: int) -> CacheShape:
        """The same cache shape on another tensor-parallel rank."""
        return dataclasses.replace(self, geometry=dataclasses.replace(self.geometry, tp_rank=tp_rank))

    def same_blocks(self, other: CacheShape) -> bool:
        """Whether a whole block of one is a whole block of the other (same geometry and
        tensor-parallel split, ranks aside)."""
        return self.dtype == other.dtype and self.geometry == dataclasses.replace(
            other.geometry, tp_rank=self.geometry.tp_rank
        )

    def to_params(self) -> dict[str, Any]:
        g = self.geometry
        return {
            "layout": g.layout,
            "block_size": g.block_size,
            "num_kv_heads": g.num_kv_heads,
            "head_dim": g.head_dim,
            "tp_size": g.tp_size,
            "dtype": self.dtype,
        }

    @classmethod
    def from_params(cls, value: object, rank: int = 0) -> CacheShape:
        """The shape kv_transfer_params' ``remote_geometry`` names (at tensor-parallel rank
        ``rank``); LLM_PARAM_INVALID naming the first field that is wrong."""
        if not isinstance(value, Mapping):
            raise param_invalid(f"kv_transfer_params['remote_geometry'] must be a dict, got {value!r}")
        layout = value.get("layout")
        if not isinstance(layout, str) or not (layout in LAYOUTS or 3 <= len(layout) <= 9):
            raise param_invalid(f"kv_transfer_params['remote_geometry']['layout'] is not a layout: {layout!r}")
        numbers = {}
        for key in ("block_size", "num_kv_heads", "head_dim", "tp_size"):
            number = value.get(key)
            if isinstance(number, bool) or not isinstance(number, int) or number <= 0:
                raise param_invalid(
                    f"kv_transfer_params['remote_geometry'][{key!r}] must be a positive int, got {number!r}"
                )
            numbers[key] = number
        if numbers["num_kv_heads"] % numbers["tp_size"]:
            raise param_invalid(
                f"kv_transfer_params['remote_geometry']: tp_size {numbers['tp_size']} does not divide "
                f"{numbers['num_kv_heads']} KV heads"
            )
        dtype = value.get("dtype")
        if not isinstance(dtype, str) or dtype not in DataType.__members__:
            raise param_invalid(f"kv_transfer_params['remote_geometry']['dtype'] is not a DataType name: {dtype!r}")
        geometry = KVGeometry(layout, tp_rank=rank, **numbers)
        return cls(geometry, dtype)


def _bare_fields(shape: CacheShape) -> tuple[int, int, list[int], int, int]:
    """Desc fields of a one-layer, one-block host cache of this shape (for checks only)."""
    block_elements = 1
    for size in shape.geometry.block_shape:
        block_elements *= size
    return (shape.geometry.tensors_per_layer, int(DataType[shape.dtype]), [1, block_elements], int(Placement.HOST), -1)


def mapping_error(src: CacheShape, dst: CacheShape) -> str | None:
    """Why tokens of a cache of shape ``src`` cannot land in one of shape ``dst`` (the
    native planner's words), or None when they can."""
    empty = torch.zeros(1, dtype=torch.long)
    try:
        native_plan(
            _bare_fields(src),
            src.geometry,
            _bare_fields(dst),
            dst.geometry,
            empty,
            empty,
            selection(0, 0, 0, None, None, None),
            1 << 20,
        )
    except (LLMException, RuntimeError, ValueError, IndexError, TypeError) as exc:
        translated = translate(exc)
        if translated is None:
            raise
        return translated.detail
    return None


def source_ranks(src: CacheShape, dst: CacheShape) -> list[int]:
    """The producer's tensor-parallel ranks that hold heads of the decoder rank ``dst``.

    >>> tp1 = CacheShape(KVGeometry("flash_attn", 16, 8, 64), "DT_FLOAT")
    >>> tp2 = CacheShape(KVGeometry("flash_attn", 32, 8, 64, 2, 1), "DT_FLOAT")
    >>> source_ranks(tp1, tp2), source_ranks(tp2, tp1)
    ([0], [0, 1])
    """
    wanted = dst.geometry.heads
    ranks = []
    for rank in range(src.geometry.tp_size):
        held = src.rank(rank).geometry.heads
        if max(held.start, wanted.start) < min(held.stop, wanted.stop):
            ranks.append(rank)
    return ranks


def readers_per_rank(src: CacheShape, dst: CacheShape) -> int:
    """How many decoder ranks read each producer rank (each sends its own notice)."""
    return max(1, dst.geometry.tp_size // src.geometry.tp_size)


def token_span(
    num_tokens: int, first_local_token: int, num_local_blocks: int, src_block_size: int, dst_block_size: int
) -> tuple[int, int, int]:
    """(first source block index, offset in it, tokens) of a load whose local blocks start
    at token ``first_local_token`` of the prompt (a locally cached prefix before them).

    >>> token_span(70, 32, 2, 16, 32)  # tokens 32..69: source blocks 2.. of 16, two local blocks of 32
    (2, 0, 38)
    """
    count = min(num_tokens - first_local_token, num_local_blocks * dst_block_size)
    return first_local_token // src_block_size, first_local_token % src_block_size, count
