"""Verified transfers: a CRC-32C of every source block, taken in the process that holds its
bytes before they move, compared with the CRC-32C of the destination block once the bytes
landed. A mismatch fails the transfer (LLM_FAILED) and names the destination blocks that
differ in ``failed_blocks``, on the Transfer and on the raised LLMException, so that a
serving engine recomputes just those.

Asked for per transfer (``verify=True``) or for every transfer of the process (option
``llm.VerifyTransfers`` = ``"1"``). The CRCs are native (csrc/checksum.cpp: PCLMULQDQ
folding, SSE4.2's crc32 instruction on three interleaved streams, tables; the CPU picks,
``_C._test_force_crc32c_implementation`` forces one in tests), one per block, chained over
the block's slices of every tensor that takes part.

>>> import torch, torch_kvreg as kv
>>> kv.initialize()
>>> a = kv.register_kv_cache([torch.arange(8.).reshape(4, 2)])
>>> b = kv.register_kv_cache([torch.zeros(4, 2)])
>>> kv.copy_kv_blocks(a, b, [3, 0], [0, 1], verify=True)
>>> checksums(a.cache_id, None, [3]) == checksums(b.cache_id, None, [0])
True
>>> kv.finalize()
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence

import torch

from . import _C, lifecycle
from .errors import LLMException, LLMStatusCode, make_error, wrong_type
from .inflight import Transfer
from .options import OPTION_VERIFY_TRANSFERS
from .types import Blocks, Cache, block_tensor

# Test hooks, each called with (cache id, blocks) in the process that reads the bytes:
# ``source_checksummed`` once a transfer's source CRCs are taken (the bytes not yet sent),
# ``landing_checked`` once its bytes landed, before their CRCs are taken. Tests overwrite a
# source block or corrupt a landed one there, to see that the comparison catches it.
source_checksummed: Callable[[int, list[int]], None] | None = None
landing_checked: Callable[[int, list[int]], None] | None = None

# Whether the process option asks for every transfer to be verified (kept from initialize).
always = False


class _Option:
    """Keeps ``always`` in step with the options initialize took."""

    def initialized(self, options: Mapping[str, str]) -> None:
        global always
        always = options.get(OPTION_VERIFY_TRANSFERS) == "1"

    def registered(self, cache: Cache) -> None:
        pass

    def unregistering(self, cache_id: int) -> None:
        pass

    def finalizing(self) -> None:
        global always
        always = False


lifecycle.subscribe(_Option())


def wanted(verify: object) -> bool:
    """Whether a transfer given ``verify`` is verified: it asked, or the process option is
    on. LLM_PARAM_INVALID (a TypeError) unless ``verify`` is a bool.

    >>> wanted(True), wanted(False)
    (True, False)
    """
    if type(verify) is not bool:
        raise wrong_type(f"verify must be a bool, got {type(verify).__name__}")
    return verify or always


def checksums(
    cache_id: int, tensors: Sequence[int] | None, blocks: Blocks | torch.Tensor, size: int = -1, offset: int = 0
) -> list[int]:
    """The CRC-32C of each of ``blocks`` of a local cache: ``size`` bytes (-1: to the end)
    from byte ``offset`` of the block in each of ``tensors`` (None: all of the cache's),
    chained in that order."""
    block_list = blocks if isinstance(blocks, torch.Tensor) else block_tensor(blocks, "blocks")
    return _C.checksum_blocks(cache_id, list(tensors or ()), block_list, offset, size).tolist()


def source_checksums(
    cache_id: int, tensors: Sequence[int] | None, blocks: Blocks | torch.Tensor, size: int = -1, offset: int = 0
) -> list[int]:
    """``checksums`` of a transfer's source blocks, taken before the bytes move."""
    sums = checksums(cache_id, tensors, blocks, size, offset)
    hook = source_checksummed
    if hook is not None:
        hook(cache_id, _ints(blocks))
    return sums


def landed_checksums(
    cache_id: int, tensors: Sequence[int] | None, blocks: Blocks | torch.Tensor, size: int = -1, offset: int = 0
) -> list[int]:
    """``checksums`` of a transfer's destination blocks, taken once the bytes landed."""
    hook = landing_checked
    if hook is not None:
        hook(cache_id, _ints(blocks))
    return checksums(cache_id, tensors, blocks, size, offset)


def copied(
    description: str,
    src_id: int,
    dst_id: int,
    src_blocks: torch.Tensor,
    dst_blocks: torch.Tensor,
    tensors: tuple[Sequence[int], Sequence[int]] | None = None,
    slice_bytes: tuple[int, int] | None = None,
) -> None:
    """A verified copy between two HOST caches of this process in one pass (csrc's
    copy_blocks_verified): block by block, the source block's CRC, its copy while it is in
    the cache, the CRC of what landed (read back from the cache); raises ``mismatch``'s
    error. ``tensors``: (source, destination) tensor indices (None: all); ``slice_bytes``:
    (offset, size) of the one slice a copy_kv_cache moves. The test hooks run per block,
    in the window they name (after the block's source CRC; after it landed)."""
    source_hook, landed_hook = source_checksummed, landing_checked
    offset, size = (0, -1) if slice_bytes is None else slice_bytes
    sums = _C.copy_blocks_verified(
        src_id,
        dst_id,
        src_blocks,
        dst_blocks,
        list(tensors[0]) if tensors else [],
        list(tensors[1]) if tensors else [],
        slice_bytes is not None,
        offset,
        size,
        None if source_hook is None else lambda cache_id, block: source_hook(cache_id, [block]),
        None if landed_hook is None else lambda cache_id, block: landed_hook(cache_id, [block]),
    )
    differ = sums[0] != sums[1]
    if bool(differ.any()):
        dst = dst_blocks.reshape(-1).to(torch.long)
        check_landed(description, dst.tolist(), sums[0].tolist(), sums[1].tolist())


def _ints(blocks: Blocks | torch.Tensor) -> list[int]:
    return [int(b) for b in (blocks.tolist() if isinstance(blocks, torch.Tensor) else blocks)]  # type: ignore[union-attr]


def mismatch(
    description: str, dst_blocks: Sequence[int], expected: Sequence[int], landed: Sequence[int]
) -> LLMException | None:
    """The error of a transfer whose destination blocks' CRCs ``landed`` differ from their
    sources' ``expected`` (pairwise), naming those blocks; None when all agree.

    >>> error = mismatch("copy", [4, 5, 6], [1, 2, 3], [1, 9, 3])
    >>> error.failed_blocks, str(error)
    ([5], 'LLM_FAILED: copy: 1 of 3 blocks differ from their source after landing (CRC-32C): destination blocks [5]')
    >>> mismatch("copy", [4], [1], [1]) is None
    True
    """
    if len(expected) != len(dst_blocks) or len(landed) != len(dst_blocks):
        return make_error(
            LLMStatusCode.LLM_FAILED,
            f"{description}: {len(expected)} source and {len(landed)} destination checksums for "
            f"{len(dst_blocks)} blocks",
        )
    failed = [int(block) for block, want, got in zip(dst_blocks, expected, landed) if want != got]
    if not failed:
        return None
    error = make_error(
        LLMStatusCode.LLM_FAILED,
        f"{description}: {len(failed)} of {len(dst_blocks)} blocks differ from their source after landing "
        f"(CRC-32C): destination blocks {failed}",
    )
    error.failed_blocks = failed
    return error


def check_landed(description: str, dst_blocks: Sequence[int], expected: Sequence[int], landed: Sequence[int]) -> None:
    """Raises ``mismatch``'s error, if any."""
    error = mismatch(description, dst_blocks, expected, landed)
    if error is not None:
        raise error


class Checked:
    """The Transfer of a verified transfer: done once ``inner`` (the transfer that moves the
    bytes) is done and ``landed()`` (the destination CRCs) agreed with ``expected``. The
    comparison runs on the thread that waits for it or asks whether it is done, once."""

    def __init__(
        self,
        inner: Transfer,
        dst_blocks: Sequence[int],
        expected: Sequence[int],
        landed: Callable[[], Sequence[int]],
    ):
        self.inner = inner
        self.dst_blocks = [int(block) for block in dst_blocks]
        self.expected = expected
        self.landed = landed
        self.lock = threading.Lock()
        self.outer = Transfer(inner.nbytes, self.dst_blocks, f"verified {inner.description}")
        self.outer.assist = self.assist

    def assist(self, timeout_ms: int) -> None:
        inner = self.inner
        if timeout_ms == 0:
            if not inner.done():
                return
        else:
            try:
                inner.wait(None if timeout_ms < 0 else timeout_ms)
            except LLMException:
                if not inner.done():
                    return  # not done in time: the outer wait says so
        with self.lock:
            if self.outer.status is not None:  # finished already, by another thread
                return
            self.finish()

    def finish(self) -> None:
        outer, inner = self.outer, self.inner
        if inner.status != LLMStatusCode.LLM_SUCCESS:
            try:
                inner.wait(0)
            except LLMException as exc:
                outer.fail(exc)
                return
        try:
            error = mismatch(outer.description, self.dst_blocks, self.expected, self.landed())
        except LLMException as exc:  # the destination's CRCs could not be had
            outer.fail(exc)
            return
        if error is not None:
            outer.fail(error)
        else:
            outer.succeed(inner.nbytes)
