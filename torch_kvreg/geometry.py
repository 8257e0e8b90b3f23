"""Transfers between caches of different geometry: block size, layout, tensor-parallel split.

A ``KVGeometry`` says how a registered cache holds its KV: tokens per block, the model's KV
heads and which of them this cache holds (its tensor-parallel rank), the head dim, and the
layout of one block. A layout is a preset name or an axis order, outer to inner, over ``t``
(token slot), ``h`` (KV head), ``d`` (head dim) and, when K and V share a block, ``k`` (K then
V); without ``k`` each layer is two registered tensors, K then V. ``"K-order/V-order"`` lays
K out differently from V (with ``k``, the two agree up to it).

===================  =======  ===================================================================
preset               order    what registers that way
===================  =======  ===================================================================
flash_attn           thd      ``register_layer_caches`` of ``(2, N, B, H, D)`` (NHD): K, V tensors
flash_attn_hnd       htd      the same with blocks ``(H, B, D)`` (HND)
flashinfer           kthd     ``(N, 2, B, H, D)``: one tensor per layer
flashinfer_hnd       khtd     ``(N, 2, H, B, D)``
vllm_cpu             hkdt/    vLLM's CPU attention ``(N, H, B, 2 * D)``: per head a K tile stored
                     hktd     transposed (dim-major), then a V tile (its ``vec`` kernels)
vllm_flash_attn      htkd     vLLM 0.32 FlashAttention ``(N, H, B, 2 * D)``: K and V halves of each row
vllm_flash_attn_nhd  thkd     the same under ``VLLM_KV_CACHE_LAYOUT=LBNHC``: ``(N, B, H, 2 * D)``
===================  =======  ===================================================================

The plan (csrc/geometry.cpp) is made and checked natively before any byte moves (a local
copy between HOST caches then moves each piece of tokens that lies in one source and one
destination block as a box, csrc/geometry_copy.cpp): geometries
that cannot map (another dtype or head dim, a tensor-parallel size that does not divide the
heads, no head in common, tokens that do not fit the blocks) raise LLM_PARAM_INVALID.
"""

from __future__ import annotations

import dataclasses

import torch

from . import _C
from .errors import param_invalid, raises_llm, wrong_type
from .layouts import detect_layout
from .registry import cache_id_of, get_cache
from .transfer import _counted_local_copy
from .types import Blocks, Cache, CacheDesc, as_int, block_tensor

LAYOUTS = {
    "flash_attn": "thd",
    "flash_attn_hnd": "htd",
    "flashinfer": "kthd",
    "flashinfer_hnd": "khtd",
    "vllm_cpu": "hkdt/hktd",
    "vllm_flash_attn": "htkd",
    "vllm_flash_attn_nhd": "thkd",
}
# Local copies split runs longer than this, so that threads share long runs evenly.
LOCAL_SEGMENT_BYTES = 1 << 20

# (num_tokens, src_offset, dst_offset, src_first_layer, dst_first_layer, num_layers,
#  first_head, num_heads), as the native planner takes it.
Selection = tuple[int, int, int, int, int, int, int, int]


@dataclasses.dataclass(frozen=True)
class KVGeometry:
    """How one cache holds its KV (see the module docstring for ``layout``).

    >>> g = KVGeometry("flashinfer_hnd", block_size=32, num_kv_heads=8, head_dim=64, tp_size=2, tp_rank=1)
    >>> g.order, g.tensors_per_layer, g.heads, g.block_shape
    ('khtd', 1, range(4, 8), (2, 4, 32, 64))
    >>> KVGeometry("vllm_cpu", 32, 8, 64).orders
    ('hkdt', 'hktd')
    """

    layout: str
    block_size: int
    num_kv_heads: int
    head_dim: int
    tp_size: int = 1
    tp_rank: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.layout, str):
            raise wrong_type(f"layout must be a str, got {type(self.layout).__name__}")
        for name in ("block_size", "num_kv_heads", "head_dim", "tp_size", "tp_rank"):
            object.__setattr__(self, name, as_int(getattr(self, name), name))

    @property
    def order(self) -> str:
        """The axis order of one block, outer to inner."""
        return LAYOUTS.get(self.layout, self.layout)

    @property
    def orders(self) -> tuple[str, str]:
        """The orders of K and of V."""
        k_order, _, v_order = self.order.partition("/")
        return k_order, v_order or k_order

    @property
    def kv_differ(self) -> bool:
        """Whether K is laid out differently from V."""
        return self.orders[0] != self.orders[1]

    @property
    def tensors_per_layer(self) -> int:
        return 1 if "k" in self.orders[0] else 2

    @property
    def heads(self) -> range:
        """The model's KV heads this cache holds."""
        held = self.num_kv_heads // max(self.tp_size, 1)
        return range(self.tp_rank * held, (self.tp_rank + 1) * held)

    @property
    def block_shape(self) -> tuple[int, ...]:
        """One block's memory as a shape in V's order (``tensor.view(N, *block_shape)``)."""
        return self.part_shape(1)

    def part_shape(self, kv: int) -> tuple[int, ...]:
        """One block's memory as a shape in K's (``kv`` 0) or V's (1) order."""
        sizes = {"k": 2, "t": self.block_size, "h": len(self.heads), "d": self.head_dim}
        return tuple(sizes.get(axis, 0) for axis in self.orders[kv])

    def fields(self) -> tuple[str, int, int, int, int, int]:
        """What the native planner takes."""
        return (self.order, self.block_size, self.num_kv_heads, self.head_dim, self.tp_size, self.tp_rank)


@dataclasses.dataclass(frozen=True)
class TokenPlan:
    """A checked plan: for every lane (src tensor + shift, dst tensor + shift: a layer's K or
    V, alternately) the same byte segments (src offset, dst offset, length), runs merged; when
    either side lays K and V out differently, ``v_segments`` serve the V lanes (else empty)."""

    lanes: torch.Tensor
    segments: torch.Tensor
    v_segments: torch.Tensor
    num_tokens: int
    heads: range
    num_layers: int

    @property
    def nbytes(self) -> int:
        k_bytes = int(self.segments[:, 2].sum())
        v_bytes = int(self.v_segments[:, 2].sum()) if len(self.v_segments) else k_bytes
        return (k_bytes + v_bytes) * (len(self.lanes) // 2)


def layer_geometry(tensor: torch.Tensor, layout: str | None = None) -> KVGeometry:
    """The geometry of a serving engine's layer tensor, as ``register_layer_caches``
    registers it, holding every KV head it has (tensor parallelism 1). A 4-D layer is
    vLLM's ``(N, H, B, 2 * D)``: its CPU layout on the CPU, FlashAttention's elsewhere.

    >>> layer_geometry(torch.zeros(4, 2, 32, 128))
    KVGeometry(layout='vllm_cpu', block_size=32, num_kv_heads=2, head_dim=64, tp_size=1, tp_rank=0)
    >>> layer_geometry(torch.zeros(2, 4, 2, 16, 8).transpose(2, 3)).layout  # an HND view
    'flash_attn_hnd'
    """
    kind = layout or detect_layout(tensor)
    if kind in ("flash_attn", "flashinfer"):
        _, _, block_size, heads, head_dim = tensor.shape
        return KVGeometry(kind if tensor.is_contiguous() else kind + "_hnd", block_size, heads, head_dim)
    if kind == "vllm_cpu":
        _, heads, block_size, both = tensor.shape
        return KVGeometry(
            "vllm_cpu" if tensor.device.type == "cpu" else "vllm_flash_attn", block_size, heads, both // 2
        )
    raise param_invalid(f"{kind} layers hold no KV heads to map between geometries")


def checked_geometry(value: object, name: str) -> KVGeometry:
    """``value`` if it is a KVGeometry, else the TypeError-type LLMException."""
    if not isinstance(value, KVGeometry):
        raise wrong_type(f"{name} must be a KVGeometry, got {type(value).__name__}")
    return value


def _span(value: object, name: str) -> range | None:
    if value is None:
        return None
    if not isinstance(value, range):
        raise wrong_type(f"{name} must be a range, got {type(value).__name__}")
    if value.step != 1 or len(value) == 0:
        raise param_invalid(f"{name} must be a non-empty range with step 1, got {value}")
    return value


def selection(
    num_tokens: int,
    src_offset: int,
    dst_offset: int,
    layers: range | None,
    dst_layers: range | None,
    heads: range | None,
) -> Selection:
    """The native planner's selection fields, type-checked (values are checked natively)."""
    layers, dst_layers, heads = _span(layers, "layers"), _span(dst_layers, "dst_layers"), _span(heads, "heads")
    if dst_layers is None:
        dst_layers = layers
    if layers is None and dst_layers is not None:
        layers = range(len(dst_layers))
    if layers is not None and dst_layers is not None and len(layers) != len(dst_layers):
        raise param_invalid(f"layers {layers} and dst_layers {dst_layers} differ in length")
    return (
        as_int(num_tokens, "num_tokens"),
        as_int(src_offset, "src_offset"),
        as_int(dst_offset, "dst_offset"),
        0 if layers is None else layers.start,
        0 if dst_layers is None else dst_layers.start,
        -1 if layers is None else len(layers),
        -1 if heads is None else heads.start,
        -1 if heads is None else len(heads),
    )


def _desc(side: Cache | CacheDesc | int, name: str) -> CacheDesc:
    if isinstance(side, CacheDesc):
        return side
    return get_cache(cache_id_of(side, name)).cache_desc


def fields(desc: CacheDesc) -> _C.DescFields:
    return (desc.num_tensors, int(desc.data_type), list(desc.shape), int(desc.placement), desc.device_index)


def native_plan(
    src: CacheDesc | _C.DescFields,
    src_geometry: KVGeometry,
    dst: CacheDesc | _C.DescFields,
    dst_geometry: KVGeometry,
    src_blocks: torch.Tensor,
    dst_blocks: torch.Tensor,
    chosen: Selection,
    max_segment_bytes: int,
) -> TokenPlan:
    """The native planner's plan for these descs (or their fields)."""
    plan = _C.plan_geometry(
        fields(src) if isinstance(src, CacheDesc) else src,
        src_geometry.fields(),
        fields(dst) if isinstance(dst, CacheDesc) else dst,
        dst_geometry.fields(),
        src_blocks,
        dst_blocks,
        chosen,
        max_segment_bytes,
    )
    heads = range(plan.first_head, plan.first_head + plan.num_heads)
    return TokenPlan(plan.lanes, plan.segments, plan.v_segments, plan.num_tokens, heads, plan.num_layers)


@raises_llm
def plan_kv_tokens(
    src: Cache | CacheDesc | int,
    dst: Cache | CacheDesc | int,
    src_blocks: Blocks,
    dst_blocks: Blocks,
    num_tokens: int = -1,
    *,
    src_geometry: KVGeometry,
    dst_geometry: KVGeometry,
    src_offset: int = 0,
    dst_offset: int = 0,
    layers: range | None = None,
    dst_layers: range | None = None,
    heads: range | None = None,
    max_segment_bytes: int = LOCAL_SEGMENT_BYTES,
) -> TokenPlan:
    """The checked plan of a ``copy_kv_tokens`` with these arguments, moving nothing (caches,
    their ids, or bare descs).

    >>> import torch_kvreg as kv
    >>> prefill = kv.KVGeometry("flash_attn", block_size=16, num_kv_heads=2, head_dim=4)
    >>> decode = kv.KVGeometry("flash_attn", block_size=32, num_kv_heads=2, head_dim=4)
    >>> src = kv.CacheDesc(2, kv.DataType.DT_FLOAT, (8, 16, 2, 4), kv.Placement.HOST)
    >>> dst = kv.CacheDesc(2, kv.DataType.DT_FLOAT, (4, 32, 2, 4), kv.Placement.HOST)
    >>> plan = kv.plan_kv_tokens(src, dst, [5, 2], [3], src_geometry=prefill, dst_geometry=decode)
    >>> plan.num_tokens, plan.segments.tolist()  # block 5 -> first half of 3, block 2 -> second half
    (32, [[2560, 3072, 512], [1024, 3584, 512]])
    """
    src_desc, dst_desc = _desc(src, "src"), _desc(dst, "dst")
    return native_plan(
        src_desc,
        checked_geometry(src_geometry, "src_geometry"),
        dst_desc,
        checked_geometry(dst_geometry, "dst_geometry"),
        block_tensor(src_blocks, "src_blocks"),
        block_tensor(dst_blocks, "dst_blocks"),
        selection(num_tokens, src_offset, dst_offset, layers, dst_layers, heads),
        as_int(max_segment_bytes, "max_segment_bytes"),
    )


@raises_llm
def copy_kv_tokens(
    src: Cache | int,
    dst: Cache | int,
    src_blocks: Blocks,
    dst_blocks: Blocks,
    num_tokens: int = -1,
    *,
    src_geometry: KVGeometry,
    dst_geometry: KVGeometry,
    src_offset: int = 0,
    dst_offset: int = 0,
    layers: range | None = None,
    dst_layers: range | None = None,
    heads: range | None = None,
) -> int:
    """Copies ``num_tokens`` tokens (-1: every slot of ``src_blocks`` from ``src_offset``)
    between two caches of different geometry; returns the bytes moved. Token i sits in slot
    ``(src_offset + i) % B`` of block ``src_blocks[(src_offset + i) // B]`` (B: the source's
    block size) and lands the same way in ``dst_blocks`` after ``dst_offset``. ``layers``:
    source layers (default all), ``dst_layers``: where they go (default the same numbers);
    ``heads``: model KV heads (default every head both caches hold). Everything is checked
    before any byte moves.

    >>> import torch, torch_kvreg as kv
    >>> kv.initialize()
    >>> nhd = kv.KVGeometry("flash_attn", block_size=4, num_kv_heads=2, head_dim=8)
    >>> hnd = kv.KVGeometry("flash_attn_hnd", block_size=8, num_kv_heads=2, head_dim=8)
    >>> k, v = torch.randn(6, 4, 2, 8), torch.randn(6, 4, 2, 8)  # (blocks, tokens, heads, dim)
    >>> k2, v2 = torch.zeros(3, 2, 8, 8), torch.zeros(3, 2, 8, 8)  # (blocks, heads, tokens, dim)
    >>> a, b = kv.register_kv_cache([k, v]), kv.register_kv_cache([k2, v2])
    >>> kv.copy_kv_tokens(a, b, [4, 1], [2], src_geometry=nhd, dst_geometry=hnd)
    1024
    >>> torch.equal(k2[2].transpose(0, 1), torch.cat([k[4], k[1]]))
    True
    >>> kv.finalize()
    """
    chosen = selection(num_tokens, src_offset, dst_offset, layers, dst_layers, heads)
    src_geometry = checked_geometry(src_geometry, "src_geometry")
    dst_geometry = checked_geometry(dst_geometry, "dst_geometry")
    src_list, dst_list = block_tensor(src_blocks, "src_blocks"), block_tensor(dst_blocks, "dst_blocks")
    with _counted_local_copy() as counted:
        counted.nbytes = _C.copy_geometry(
            cache_id_of(src, "src"),
            src_geometry.fields(),
            cache_id_of(dst, "dst"),
            dst_geometry.fields(),
            src_list,
            dst_list,
            chosen,
        )
    return counted.nbytes
