"""Enums and immutable descriptors of the LLM-DataDist model."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import math
import operator
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch

from . import display
from .errors import LLMStatusCode, make_error, param_invalid, wrong_type


def format_bytes(nbytes: int) -> str:
    """Human units for a byte count.

    >>> format_bytes(3 * 2**30)
    '3.00 GiB'
    """
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def as_int(value: object, name: str) -> int:
    """``value`` as a Python int: ints, numpy ints and SymInts pass; bools and floats do not."""
    if type(value) is int:  # the common case, first: transfers check many ints
        return value
    if isinstance(value, torch.SymInt):
        return value  # type: ignore[return-value]  # an int to every caller, traced or not
    if isinstance(value, bool):
        raise wrong_type(f"{name} must be an int, got bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]  # its TypeError is the check
    except TypeError:
        raise wrong_type(f"{name} must be an int, got {type(value).__name__}") from None


def block_tensor(blocks: Blocks, name: str) -> torch.Tensor:
    """A block list (sequence of ints, or an integer tensor) as a 1-D int64 tensor."""
    if isinstance(blocks, torch.Tensor):
        if blocks.dtype not in (torch.int64, torch.int32):
            raise wrong_type(f"{name} must be an int64 or int32 tensor, got {blocks.dtype}")
        if blocks.dim() > 1:
            raise param_invalid(f"{name} must be 1-D, got shape {tuple(blocks.shape)}")
        return blocks.reshape(-1)
    if isinstance(blocks, int) and not isinstance(blocks, bool):
        blocks = [blocks]
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence):
        raise wrong_type(f"{name} must be a sequence of ints or an int tensor, got {type(blocks).__name__}")
    if isinstance(blocks, (list, tuple)) and set(map(type, blocks)) == {int}:
        # The common case, without a Python step per block (a layer's push names hundreds):
        # plain ints only (bool is not int here); one out of int64's range falls through to
        # the loop below, which names it.
        with contextlib.suppress(OverflowError):
            return torch.from_numpy(np.array(blocks, dtype=np.int64))
    values = []
    for j, block in enumerate(blocks):
        if isinstance(block, bool) or not hasattr(block, "__index__"):
            raise wrong_type(f"{name}[{j}] must be an int, got {type(block).__name__}")
        value = block.__index__()
        if not -(2**63) <= value < 2**63:
            raise make_error(LLMStatusCode.LLM_PARAM_INVALID, f"{name}[{j}] = {value} is out of range", IndexError)
        values.append(value)
    return torch.tensor(values, dtype=torch.int64)


class Placement(enum.IntEnum):
    """Where a cache lives.

    >>> Placement.DEVICE
    <Placement.DEVICE: 1>
    """

    HOST = 0
    DEVICE = 1


class LlmRole(enum.IntEnum):
    """The role of this process in disaggregated serving.

    >>> int(LlmRole.DECODER)
    2
    """

    PROMPT = 1
    DECODER = 2
    MIX = 3


LLMRole = LlmRole


class DataType(enum.IntEnum):
    """CANN GE data types, with their torch equivalents.

    >>> DataType.from_torch(torch.float16), DataType.DT_BF16.to_torch()
    (<DataType.DT_FLOAT16: 1>, torch.bfloat16)
    """

    DT_FLOAT = 0
    DT_FLOAT16 = 1
    DT_INT8 = 2
    DT_INT32 = 3
    DT_UINT8 = 4
    DT_INT16 = 6
    DT_UINT16 = 7
    DT_UINT32 = 8
    DT_INT64 = 9
    DT_UINT64 = 10
    DT_DOUBLE = 11
    DT_BOOL = 12
    DT_BF16 = 27
    DT_UNDEFINED = 28
    DT_FLOAT8_E5M2 = 35
    DT_FLOAT8_E4M3FN = 36

    @classmethod
    def from_torch(cls, dtype: torch.dtype) -> DataType:
        if not isinstance(dtype, torch.dtype):
            raise wrong_type(f"expected a torch.dtype, got {type(dtype).__name__}")
        try:
            return _FROM_TORCH[dtype]
        except KeyError:
            raise param_invalid(f"dtype {dtype} has no LLM DataType") from None

    def to_torch(self) -> torch.dtype:
        try:
            return _TO_TORCH[self]
        except KeyError:
            raise param_invalid(f"{self.name} has no torch dtype") from None

    @property
    def itemsize(self) -> int:
        return self.to_torch().itemsize


_TO_TORCH = {
    DataType.DT_FLOAT: torch.float32,
    DataType.DT_FLOAT16: torch.float16,
    DataType.DT_INT8: torch.int8,
    DataType.DT_INT32: torch.int32,
    DataType.DT_UINT8: torch.uint8,
    DataType.DT_INT16: torch.int16,
    DataType.DT_UINT16: torch.uint16,
    DataType.DT_UINT32: torch.uint32,
    DataType.DT_INT64: torch.int64,
    DataType.DT_UINT64: torch.uint64,
    DataType.DT_DOUBLE: torch.float64,
    DataType.DT_BOOL: torch.bool,
    DataType.DT_BF16: torch.bfloat16,
    DataType.DT_FLOAT8_E5M2: torch.float8_e5m2,
    DataType.DT_FLOAT8_E4M3FN: torch.float8_e4m3fn,
}
_FROM_TORCH = {dtype: data_type for data_type, dtype in _TO_TORCH.items()}


E = TypeVar("E", bound=enum.Enum)

# Block indices as every transfer takes them: ints (or one int), or a 1-D integer tensor.
Blocks = Sequence[int] | torch.Tensor | int


def _enum_value(enum_cls: type[E], value: object, name: str) -> E:
    if type(value) is enum_cls:
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise wrong_type(f"{name} must be a {enum_cls.__name__}, got {type(value).__name__}")
    try:
        return enum_cls(value)
    except ValueError:
        raise param_invalid(f"{name} {value!r} is not a {enum_cls.__name__}") from None


@dataclasses.dataclass(frozen=True)
class CacheDesc:
    """The shape of a KV cache: ``num_tensors`` tensors of ``shape`` and ``data_type``.

    Dim 0 is the block (or batch) dimension.

    >>> d = CacheDesc(2, DataType.DT_FLOAT16, (16, 4, 8))
    >>> d.block_nbytes, d.tensor_nbytes, d.nbytes
    (64, 1024, 2048)
    """

    num_tensors: int
    data_type: DataType
    shape: tuple[int, ...]
    placement: Placement = Placement.DEVICE
    device_index: int = -1

    def __post_init__(self) -> None:
        set_field = object.__setattr__
        set_field(self, "num_tensors", as_int(self.num_tensors, "num_tensors"))
        set_field(self, "data_type", _enum_value(DataType, self.data_type, "data_type"))
        if isinstance(self.shape, (str, bytes)) or not isinstance(self.shape, Sequence):
            if not isinstance(self.shape, torch.Size):
                raise wrong_type(f"shape must be a sequence of ints, got {type(self.shape).__name__}")
        set_field(self, "shape", tuple(as_int(d, "shape entry") for d in self.shape))
        set_field(self, "placement", _enum_value(Placement, self.placement, "placement"))
        set_field(self, "device_index", as_int(self.device_index, "device_index"))

    @classmethod
    def from_tensors(cls, tensors: torch.Tensor | Sequence[torch.Tensor]) -> CacheDesc:
        """The desc that registering ``tensors`` would give.

        >>> CacheDesc.from_tensors([torch.zeros(4, 2), torch.zeros(4, 2)])
        CacheDesc(num_tensors=2, data_type=DT_FLOAT, shape=(4, 2), placement=HOST, device_index=-1, nbytes=64 B)
        """
        tensors = tensor_list(tensors)
        if not tensors:
            raise param_invalid("no tensors given")
        first = tensors[0]
        for i, tensor in enumerate(tensors):
            if tensor.dtype != first.dtype or tensor.shape != first.shape or tensor.device != first.device:
                raise param_invalid(
                    f"tensors[{i}] is {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}, "
                    f"tensors[0] is {first.dtype} {tuple(first.shape)} on {first.device}"
                )
        on_host = first.device.type == "cpu"
        return cls(
            len(tensors),
            DataType.from_torch(first.dtype),
            tuple(first.shape),
            Placement.HOST if on_host else Placement.DEVICE,
            -1 if on_host else (first.device.index if first.device.index is not None else 0),
        )

    # Cached (the desc is frozen): every transfer asks for them.
    @functools.cached_property
    def block_nbytes(self) -> int:
        """Bytes of one dim-0 slice of one tensor."""
        return math.prod(self.shape[1:]) * self.data_type.itemsize

    @functools.cached_property
    def tensor_nbytes(self) -> int:
        return math.prod(self.shape) * self.data_type.itemsize

    @property
    def nbytes(self) -> int:
        return self.tensor_nbytes * self.num_tensors

    def _repr_html_(self) -> str:
        return display.card(
            "CacheDesc",
            lambda: [
                ("tensors", self.num_tensors),
                ("dtype", self.data_type.name),
                ("shape", tuple(self.shape)),
                ("placement", self.placement.name),
                ("device index", self.device_index),
                ("block", format_bytes(self.block_nbytes)),
                ("per tensor", format_bytes(self.tensor_nbytes)),
                ("in all", format_bytes(self.nbytes)),
            ],
        )

    def __repr__(self) -> str:
        return (
            f"CacheDesc(num_tensors={self.num_tensors}, data_type={self.data_type.name}, "
            f"shape={self.shape}, placement={self.placement.name}, "
            f"device_index={self.device_index}, nbytes={format_bytes(self.nbytes)})"
        )


@dataclasses.dataclass(frozen=True)
class RegisterCfg:
    """Registration options.

    ``pin_host_memory``: page-lock HOST caches for the accelerator (CUDA builds).
    ``remote_accessible``: reachable by remote pull/push; None means DEVICE yes, HOST no.

    >>> RegisterCfg(pin_host_memory=False)
    RegisterCfg(pin_host_memory=False, remote_accessible=None)
    """

    pin_host_memory: bool = True
    remote_accessible: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pin_host_memory, bool):
            raise wrong_type("RegisterCfg.pin_host_memory must be a bool")
        if self.remote_accessible is not None and not isinstance(self.remote_accessible, bool):
            raise wrong_type("RegisterCfg.remote_accessible must be a bool or None")


@dataclasses.dataclass(frozen=True)
class Cache:
    """A registered cache: its id, desc and one address per tensor.

    >>> Cache(1, CacheDesc(1, DataType.DT_INT8, (4,), Placement.HOST), (4096,))  # doctest: +ELLIPSIS
    Cache(cache_id=1, CacheDesc(num_tensors=1, data_type=DT_INT8, shape=(4,), ...), tensor_addrs=[0x1000])
    """

    cache_id: int
    cache_desc: CacheDesc
    tensor_addrs: tuple[int, ...]
    # Serving-engine layer names (register_layer_caches): name i names registered layer
    # name_layers[i] (tensors layer*tpl .. (layer+1)*tpl-1); empty for other caches.
    layer_names: tuple[str, ...] = ()
    name_layers: tuple[int, ...] = ()

    @property
    def tensors_per_layer(self) -> int:
        """Tensors per registered layer (2 for K,V; 1 for one tensor per layer); 0 without
        layer names."""
        if not self.layer_names:
            return 0
        return self.cache_desc.num_tensors // (max(self.name_layers) + 1)

    def layer(self, name: str) -> int:
        """The registered layer that ``name`` names (LLM_PARAM_INVALID for an unknown name)."""
        if name not in self.layer_names:
            raise param_invalid(f"cache {self.cache_id} has no layer named {name!r}")
        return self.name_layers[self.layer_names.index(name)]

    def _repr_html_(self) -> str:
        def fields() -> list[tuple[str, object]]:
            from . import _C

            try:
                registered = "yes" if _C.get_cache(self.cache_id).addrs == list(self.tensor_addrs) else "no (id reused)"
            except Exception:  # noqa: BLE001  (unregistered, or the registry finalized)
                registered = "no (unregistered)"
            desc = self.cache_desc
            rows = [
                ("cache id", self.cache_id),
                ("registered", registered),
                ("tensors", desc.num_tensors),
                ("dtype", desc.data_type.name),
                ("shape", tuple(desc.shape)),
                ("placement", desc.placement.name),
                ("bytes", format_bytes(desc.nbytes)),
                (
                    "addresses",
                    ", ".join(hex(a) for a in self.tensor_addrs[:4])
                    + (f", ... ({len(self.tensor_addrs)} in all)" if len(self.tensor_addrs) > 4 else ""),
                ),
            ]
            if self.layer_names:
                rows.append(
                    (
                        "layers",
                        f"{len(set(self.name_layers))} x {self.tensors_per_layer} tensors: "
                        + ", ".join(self.layer_names[:4])
                        + (", ..." if len(self.layer_names) > 4 else ""),
                    )
                )
            return rows

        return display.card(f"Cache {self.cache_id}", fields)

    def __repr__(self) -> str:
        addrs = self.tensor_addrs
        shown = ", ".join(hex(a) for a in addrs[:2]) + (f", ... ({len(addrs)} in all)" if len(addrs) > 2 else "")
        layers = (
            f", layers={len(set(self.name_layers))} ({self.tensors_per_layer} tensors each)" if self.layer_names else ""
        )
        return f"Cache(cache_id={self.cache_id}, {self.cache_desc!r}, tensor_addrs=[{shown}]{layers})"


@dataclasses.dataclass(frozen=True)
class CacheIndex:
    """Addresses a cache of a (possibly remote) cluster.

    >>> CacheIndex(cluster_id=1, cache_id=3)
    CacheIndex(cluster_id=1, cache_id=3, batch_index=0)
    """

    cluster_id: int
    cache_id: int
    batch_index: int = 0


@dataclasses.dataclass(frozen=True)
class Limits:
    """Caps on what may be registered, cumulative over live registrations.

    >>> Limits(240, 50 * 2**30, 20 * 2**30)
    Limits(max_addrs=240, max_device_bytes=50.00 GiB, max_host_bytes=20.00 GiB)
    """

    max_addrs: int
    max_device_bytes: int
    max_host_bytes: int

    def _repr_html_(self) -> str:
        return display.card(
            "Limits",
            lambda: [
                ("addresses", self.max_addrs),
                ("device bytes", format_bytes(self.max_device_bytes)),
                ("host bytes", format_bytes(self.max_host_bytes)),
            ],
        )

    def __repr__(self) -> str:
        return (
            f"Limits(max_addrs={self.max_addrs}, max_device_bytes={format_bytes(self.max_device_bytes)}, "
            f"max_host_bytes={format_bytes(self.max_host_bytes)})"
        )


@dataclasses.dataclass(frozen=True)
class Usage:
    """What is registered now.

    >>> Usage(1, 64, 2**31, 0)
    Usage(num_caches=1, num_addrs=64, device_bytes=2.00 GiB, host_bytes=0 B)
    """

    num_caches: int
    num_addrs: int
    device_bytes: int
    host_bytes: int

    def _repr_html_(self) -> str:
        return display.card(
            "Usage",
            lambda: [
                ("caches", self.num_caches),
                ("addresses", self.num_addrs),
                ("device bytes", format_bytes(self.device_bytes)),
                ("host bytes", format_bytes(self.host_bytes)),
            ],
        )

    def __repr__(self) -> str:
        return (
            f"Usage(num_caches={self.num_caches}, num_addrs={self.num_addrs}, "
            f"device_bytes={format_bytes(self.device_bytes)}, host_bytes={format_bytes(self.host_bytes)})"
        )


@dataclasses.dataclass(frozen=True)
class ClusterInfo:
    """A remote cluster to link to.

    >>> ClusterInfo(1, "127.0.0.1", 26000)
    ClusterInfo(remote_cluster_id=1, remote_ip='127.0.0.1', remote_port=26000)
    """

    remote_cluster_id: int
    remote_ip: str
    remote_port: int


def tensor_list(tensors: object) -> list[torch.Tensor]:
    """A tensor or a sequence of tensors as a list; anything else is a wrong type."""
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    if isinstance(tensors, (str, bytes)) or not isinstance(tensors, Sequence):
        raise wrong_type(f"expected a Tensor or a sequence of Tensors, got {type(tensors).__name__}")
    out = list(tensors)
    for i, tensor in enumerate(out):
        if not isinstance(tensor, torch.Tensor):
            raise wrong_type(f"tensors[{i}] is a {type(tensor).__name__}, not a Tensor")
    return out


def layer_tensors(layers: range | None, tensors_per_layer: int, num_tensors: int, name: str = "layers") -> list[int]:
    """Tensor indices of ``layers`` (layer i is tensors i*tpl .. (i+1)*tpl-1); None: all.

    >>> layer_tensors(range(1, 3), 2, 8)
    [2, 3, 4, 5]
    """
    tensors_per_layer = as_int(tensors_per_layer, "tensors_per_layer")
    if tensors_per_layer <= 0:
        raise param_invalid(f"tensors_per_layer must be positive, got {tensors_per_layer}")
    if layers is None:
        return list(range(num_tensors))
    if not isinstance(layers, range):
        raise wrong_type(f"{name} must be a range, got {type(layers).__name__}")
    if layers.step != 1 or not 0 <= layers.start < layers.stop:
        raise param_invalid(f"{name} must be a non-empty range(start, stop) with 0 <= start, step 1, got {layers}")
    if layers.stop * tensors_per_layer > num_tensors:
        raise param_invalid(
            f"{name}={layers} with {tensors_per_layer} tensors per layer needs "
            f"{layers.stop * tensors_per_layer} tensors; the cache has {num_tensors}"
        )
    return list(range(layers.start * tensors_per_layer, layers.stop * tensors_per_layer))
