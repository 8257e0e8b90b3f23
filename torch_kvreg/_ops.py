"""Loads the native library, and tells torch.compile how the torch.ops.llm ops behave.

Importing ``torch_kvreg._C`` defines the ``llm`` op library (see csrc/ops.cpp). This module
adds, for every op, a fake (meta) kernel and an ORDERED effect: the ops change state that
no tensor shows, so compiled graphs must keep each call exactly once and in program order,
even when the result is unused.
"""

from __future__ import annotations

import atexit

import torch
from torch import SymInt, Tensor
from torch._subclasses.fake_tensor import FakeTensor

from .errors import LLMStatusCode, raw_error

# A cache or transfer id as compiled code carries it: an int, or a SymInt while tracing.
Id = int | SymInt

# Fails with ImportError (never aborts) if another copy of the library owns the namespace.
from . import _C  # noqa: F401,E402  (defines torch.ops.llm)

# The C++ API (llm_datadist.h) reaches links and transfers through the Python layer while
# this interpreter runs; registered first, the removal runs after finalize at exit.
_C.install_remote_hooks()
atexit.register(_C.clear_remote_hooks)

_EFFECTFUL_OPS = (
    "llm::register_kv_cache",
    "llm::register_kv_cache.addrs",
    "llm::unregister_kv_cache",
    "llm::copy_kv_blocks",
    "llm::copy_kv_cache",
    "llm::pull_kv_blocks",
    "llm::push_kv_blocks",
    "llm::pull_kv_cache",
    "llm::start_pull_kv_blocks",
    "llm::wait_transfer",
)

# The remote ops' kernels are the remote layer's (remote/kernels.py).


def _new_cache_id() -> SymInt:
    # Ids are only known when the op runs; compiled code carries them as unbacked SymInts.
    return torch.library.get_ctx().new_dynamic_size(min=1)


def _reject_meta(tensor: Tensor, name: str) -> None:
    # Fake kernels also serve the Meta key, so real meta tensors arrive here instead of in
    # C++; without this check an eager call with meta tensors would silently do nothing.
    if not isinstance(tensor, FakeTensor):
        raise raw_error(
            ValueError, LLMStatusCode.LLM_PARAM_INVALID, f"{name} is a {tensor.device} tensor and holds no data"
        )


def _register_fakes() -> None:
    @torch.library.register_fake("llm::register_kv_cache")
    def _register_kv_cache_fake(
        caches: list[Tensor], pin_host_memory: bool = True, remote_accessible: int = -1
    ) -> SymInt:
        for i, tensor in enumerate(caches):
            _reject_meta(tensor, f"caches[{i}]")
        return _new_cache_id()

    @torch.library.register_fake("llm::register_kv_cache.addrs")
    def _register_kv_cache_addrs_fake(
        num_tensors: int,
        data_type: int,
        shape: list[int],
        placement: int,
        device_index: int,
        addrs: list[int],
        pin_host_memory: bool = True,
        remote_accessible: int = -1,
    ) -> SymInt:
        return _new_cache_id()

    @torch.library.register_fake("llm::unregister_kv_cache")
    def _unregister_kv_cache_fake(cache_id: Id) -> None:
        return None

    @torch.library.register_fake("llm::copy_kv_blocks")
    def _copy_kv_blocks_fake(src_cache_id: Id, dst_cache_id: Id, src_blocks: Tensor, dst_blocks: Tensor) -> None:
        _reject_meta(src_blocks, "src_blocks")
        _reject_meta(dst_blocks, "dst_blocks")
        return None

    @torch.library.register_fake("llm::copy_kv_cache")
    def _copy_kv_cache_fake(
        src_cache_id: Id,
        dst_cache_id: Id,
        src_batch_index: int = 0,
        dst_batch_index: int = 0,
        offset: int = 0,
        size: int = -1,
    ) -> None:
        return None

    @torch.library.register_fake("llm::pull_kv_blocks")
    def _pull_kv_blocks_fake(
        cluster_id: int, src_cache_id: Id, dst_cache_id: Id, src_blocks: Tensor, dst_blocks: Tensor
    ) -> None:
        _reject_meta(src_blocks, "src_blocks")
        _reject_meta(dst_blocks, "dst_blocks")

    @torch.library.register_fake("llm::push_kv_blocks")
    def _push_kv_blocks_fake(
        src_cache_id: Id, cluster_id: int, dst_cache_id: Id, src_blocks: Tensor, dst_blocks: Tensor
    ) -> None:
        _reject_meta(src_blocks, "src_blocks")
        _reject_meta(dst_blocks, "dst_blocks")

    @torch.library.register_fake("llm::pull_kv_cache")
    def _pull_kv_cache_fake(
        cluster_id: int,
        src_cache_id: Id,
        src_batch_index: int,
        dst_cache_id: Id,
        batch_index: int = 0,
        size: int = -1,
    ) -> None:
        return None

    @torch.library.register_fake("llm::start_pull_kv_blocks")
    def _start_pull_kv_blocks_fake(
        cluster_id: int, src_cache_id: Id, dst_cache_id: Id, src_blocks: Tensor, dst_blocks: Tensor
    ) -> SymInt:
        _reject_meta(src_blocks, "src_blocks")
        _reject_meta(dst_blocks, "dst_blocks")
        return _new_cache_id()  # a transfer id: known only when the op runs

    @torch.library.register_fake("llm::wait_transfer")
    def _wait_transfer_fake(transfer_id: Id) -> None:
        return None

    for name in _EFFECTFUL_OPS:
        _mark_ordered(name)


def _mark_ordered(name: str) -> None:
    """Registers an ORDERED effect; the API moved between torch releases."""
    namespace, _, rest = name.partition("::")
    op_name, _, overload = rest.partition(".")
    op = getattr(getattr(getattr(torch.ops, namespace), op_name), overload or "default")
    register = getattr(torch.library, "_register_effectful_op", None)
    if register is not None:  # recent torch
        from torch._library.effects import EffectType

        register(op, EffectType.ORDERED)
        return
    from torch._higher_order_ops import effects

    ordered = getattr(effects, "_EffectType", None) or effects.EffectType
    effects._register_effectful_op(op, ordered.ORDERED)


# Re-executing this module (importlib.reload in a notebook) registers again; both calls
# replace the earlier registration rather than failing.
_register_fakes()
