# Types of the native module torch_kvreg._C (csrc/bindings.cpp). Importing it also defines
# torch.ops.llm. Keep this in step with bindings.cpp: tests/test_typing.py compares the two.
from collections.abc import Callable, Sequence

import numpy as np
import torch

# (num_tensors, data_type, shape, placement, device_index), as CacheDesc holds it.
DescFields = tuple[int, int, Sequence[int], int, int]

# Records the functions below return: read-only fields, made only by the module.
class Limits:
    """The caps of the registry (kvreg::Limits)."""

    @property
    def max_addrs(self) -> int: ...
    @property
    def max_device_bytes(self) -> int: ...
    @property
    def max_host_bytes(self) -> int: ...

class Usage:
    """What is registered (kvreg::Usage)."""

    @property
    def num_caches(self) -> int: ...
    @property
    def num_addrs(self) -> int: ...
    @property
    def device_bytes(self) -> int: ...
    @property
    def host_bytes(self) -> int: ...

class InitConfig:
    """What initialize() was given (kvreg::InitConfig)."""

    @property
    def cluster_id(self) -> int: ...
    @property
    def role(self) -> int: ...
    @property
    def device_id(self) -> int: ...
    @property
    def options(self) -> dict[str, str]: ...
    @property
    def limits(self) -> Limits: ...
    @property
    def wait_ms(self) -> int: ...

class CacheRecord:
    """One registration (kvreg::CacheRecord)."""

    @property
    def cache_id(self) -> int: ...
    @property
    def num_tensors(self) -> int: ...
    @property
    def data_type(self) -> int: ...
    @property
    def shape(self) -> list[int]: ...
    @property
    def placement(self) -> int: ...
    @property
    def device_index(self) -> int: ...
    @property
    def addrs(self) -> list[int]: ...
    @property
    def remote_accessible(self) -> bool: ...
    @property
    def keys(self) -> list[str]: ...
    @property
    def layer_names(self) -> list[str]: ...
    @property
    def name_layers(self) -> list[int]: ...

with_cuda: bool
with_openmp: bool

def install_remote_hooks() -> None: ...
def clear_remote_hooks() -> None: ...
def cuda_available() -> bool: ...
def initialize(
    cluster_id: int,
    role: int,
    device_id: int,
    options: dict[str, str],
    max_addrs: int,
    max_device_bytes: int,
    max_host_bytes: int,
    wait_ms: int,
) -> None: ...
def upstream_options(options: dict[str, str]) -> dict[str, str]: ...
def finalize() -> int: ...
def orphans() -> int: ...
def is_initialized() -> bool: ...
def config() -> InitConfig: ...
def limits() -> Limits: ...
def default_limits() -> Limits: ...
def usage() -> Usage: ...
def hold(cache_id: int, /) -> None: ...
def unhold(cache_id: int, /) -> None: ...
def in_flight(cache_id: int, /) -> int: ...
def cache_ids() -> list[int]: ...
def get_cache(cache_id: int, /) -> CacheRecord: ...
def copy_blocks(
    src_cache_id: int, dst_cache_id: int, src_blocks: torch.Tensor, dst_blocks: torch.Tensor, /
) -> None: ...
def copy_blocks_of_tensors(
    src_cache_id: int,
    dst_cache_id: int,
    src_blocks: torch.Tensor,
    dst_blocks: torch.Tensor,
    src_tensors: Sequence[int],
    dst_tensors: Sequence[int],
    /,
) -> None: ...

# Same-host copies between processes (csrc/peer_copy.h): states 0 running, 1 done, -errno.
class PeerCopyJob:
    """A same-host copy under way or ended. Dropping the last reference to a running job
    cancels it; the memory it names must stay valid until state() is no longer 0."""

    def state(self) -> int: ...
    def wait(self, timeout_ms: int) -> int:
        """Waits up to timeout_ms (< 0: without bound) for the job to end; its state then."""
    def help(self, timeout_ms: int) -> int:
        """wait(), copying queued pieces on the calling thread while there are any."""
    def cancel(self) -> None: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def tasks(self) -> int:
        """Tasks the pool's threads share it as."""

def peer_copy_start(pid: int, read: bool, rows: torch.Tensor, watched: bool = True) -> PeerCopyJob: ...
def peer_copy_start_segments(
    pid: int,
    read: bool,
    local_addrs: Sequence[int],
    remote_addrs: Sequence[int],
    local_offsets: np.ndarray,
    remote_offsets: np.ndarray,
    lengths: np.ndarray,
    watched: bool = True,
) -> PeerCopyJob: ...

class PeerRoute:
    """Block copies between one local cache and one leased cache of a same-host peer."""

    def __init__(
        self,
        pid: int,
        read: bool,
        local_bases: Sequence[int],
        remote_bases: Sequence[int],
        src: DescFields,
        src_id: int,
        dst: DescFields,
        dst_id: int,
        max_segment_bytes: int,
    ) -> None: ...
    def start_job(self, src_blocks: object, dst_blocks: object, watched: bool) -> PeerCopyJob | None:
        """The started job; None (nothing moved) for lists it does not take or that fail a check."""
    @property
    def block_bytes(self) -> int: ...

class SharedRegion:
    """A memfd mapped here (allocate_kv_cache's memory, or a same-host peer's, mapped to copy
    from and into it). Unmapped when the last reference goes: tensors over it and copies
    under way hold one each."""

    @property
    def name(self) -> str: ...
    @property
    def base(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def fd(self) -> int: ...

def shared_region_create(name: str, nbytes: int) -> SharedRegion:
    """A new sealed memfd of nbytes, mapped here."""

def shared_region_map(fd: int, nbytes: int) -> SharedRegion:
    """Maps another process's memfd (fd opened here, taken over): sealed and at least nbytes, else ValueError."""

def shared_region_bytes(region: SharedRegion, offset: int, nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor over nbytes of the region from offset, keeping the region mapped."""

def mapped_copy_start_segments(
    region: SharedRegion,
    read: bool,
    local_addrs: Sequence[int],
    mapped_addrs: Sequence[int],
    local_offsets: np.ndarray,
    remote_offsets: np.ndarray,
    lengths: np.ndarray,
    watched: bool = True,
) -> PeerCopyJob:
    """peer_copy_start_segments for a peer's cache mapped here: copies with copy_kv_blocks' kernels."""

def shared_regions_live() -> int: ...
def shared_region_find(address: int, nbytes: int) -> SharedRegion | None:
    """The region created here that holds the bytes, else None."""

def peer_copy_live_jobs() -> int: ...
def peer_copy_threads() -> int: ...
def peer_copy_wake() -> None: ...
def peer_copy_watch(delay_ms: int, /) -> None: ...
def peer_copy_wakes() -> int: ...
def peer_copy_ends() -> int: ...
def peer_copy_wait_ends(ends_seen: int, wakes_seen: int, timeout_ms: int, /) -> bool: ...
def peer_copy_peek(pid: int, address: int, nbytes: int, /) -> tuple[int, bytes]: ...
def notices_put(cluster_id: int, message: bytes) -> bool: ...
def notices_take() -> list[tuple[int, bytes]]: ...
def notices_wait(timeout_ms: int) -> int: ...
def notices_wake() -> None: ...
def notices_dropped() -> int: ...
def notices_queued() -> int: ...
def notices_clear() -> None: ...
def crc32c(data: bytes | bytearray | memoryview | np.ndarray, crc: int = 0, portable: bool = False) -> int: ...
def crc32c_implementation() -> str: ...
def _test_force_crc32c_implementation(name: str) -> None: ...
def checksum_blocks(
    cache_id: int, tensors: list[int], blocks: torch.Tensor, offset: int = 0, size: int = -1
) -> torch.Tensor: ...
def copy_blocks_verified(
    src_cache_id: int,
    dst_cache_id: int,
    src_blocks: torch.Tensor,
    dst_blocks: torch.Tensor,
    src_tensors: list[int],
    dst_tensors: list[int],
    slice: bool = False,
    offset: int = 0,
    size: int = -1,
    source_taken: Callable[[int, int], None] | None = None,
    landed: Callable[[int, int], None] | None = None,
) -> torch.Tensor: ...
def copy_strategy() -> str: ...
def set_copy_strategy(name: str, /) -> None: ...
def copy_blocks_with_memcpy(
    src_cache_id: int, dst_cache_id: int, src_blocks: torch.Tensor, dst_blocks: torch.Tensor, /
) -> None: ...
def cache_keys(cache_id: int, /) -> list[str]: ...
def find_key(key: str, /) -> tuple[int, int]: ...
def remove_key(key: str, /) -> None: ...
def register_tensors(
    caches: Sequence[torch.Tensor],
    pin_host_memory: bool,
    remote_accessible: int,
    keys: Sequence[str],
    layer_names: Sequence[str] = ...,
    name_layers: Sequence[int] = ...,
) -> int: ...
def register_addrs(
    num_tensors: int,
    data_type: int,
    shape: Sequence[int],
    placement: int,
    device_index: int,
    addrs: Sequence[int],
    pin_host_memory: bool,
    remote_accessible: int,
    keys: Sequence[str],
    /,
) -> int: ...
def plan_blocks(
    src: DescFields,
    src_id: int,
    dst: DescFields,
    dst_id: int,
    src_blocks: torch.Tensor,
    dst_blocks: torch.Tensor,
    max_segment_bytes: int,
    same_cache: bool = ...,
) -> torch.Tensor: ...
def plan_slice(
    src: DescFields,
    src_id: int,
    dst: DescFields,
    dst_id: int,
    src_batch_index: int,
    dst_batch_index: int,
    offset: int,
    size: int,
    /,
) -> torch.Tensor: ...

# (order, block_size, num_kv_heads, head_dim, tp_size, tp_rank): a KVGeometry.
GeometryFields = tuple[str, int, int, int, int, int]
# (num_tokens, src_offset, dst_offset, src_first_layer, dst_first_layer, num_layers,
#  first_head, num_heads); -1: the default of each that has one.
SelectionFields = tuple[int, int, int, int, int, int, int, int]

class GeometryPlan:
    """A checked plan between caches of different geometry (kvreg::GeometryPlan)."""

    @property
    def lanes(self) -> torch.Tensor:
        """(src_tensor, src_shift, dst_tensor, dst_shift) x M, int64."""
    @property
    def segments(self) -> torch.Tensor:
        """(src_offset, dst_offset, nbytes) x N, int64, the same for every lane."""
    @property
    def v_segments(self) -> torch.Tensor:
        """The V lanes' segments when K and V are laid out differently, else 0 x 3."""
    @property
    def num_tokens(self) -> int: ...
    @property
    def first_head(self) -> int: ...
    @property
    def num_heads(self) -> int: ...
    @property
    def num_layers(self) -> int: ...

def plan_geometry(
    src: DescFields,
    src_geometry: GeometryFields,
    dst: DescFields,
    dst_geometry: GeometryFields,
    src_blocks: torch.Tensor,
    dst_blocks: torch.Tensor,
    selection: SelectionFields,
    max_segment_bytes: int,
) -> GeometryPlan: ...
def copy_geometry(
    src_id: int,
    src_geometry: GeometryFields,
    dst_id: int,
    dst_geometry: GeometryFields,
    src_blocks: torch.Tensor,
    dst_blocks: torch.Tensor,
    selection: SelectionFields,
) -> int: ...
def mapped_geometry_copy_start(
    region: SharedRegion,
    read: bool,
    src: DescFields,
    src_geometry: GeometryFields,
    src_addrs: Sequence[int],
    dst: DescFields,
    dst_geometry: GeometryFields,
    dst_addrs: Sequence[int],
    src_blocks: torch.Tensor,
    dst_blocks: torch.Tensor,
    selection: SelectionFields,
    watched: bool = True,
) -> PeerCopyJob:
    """A transfer between geometries with a same-host peer's cache mapped here (its side's
    addresses in region), as a PeerCopyJob whose tasks (ranges of the plan's boxes) the same-host
    copy threads and a caller in help() share."""

def geometry_box_paths() -> list[int]: ...
def _test_geometry_former_kernels(on: bool) -> None: ...
def _test_geometry_one_task(on: bool) -> None: ...
