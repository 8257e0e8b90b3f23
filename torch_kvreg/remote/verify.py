"""Verified transfers between processes (torch_kvreg.verify): every CRC comes from the
process that holds the bytes. A pull asks the peer for its source blocks' CRCs before it
reads them and compares them with its own destination blocks' once they landed; a push
takes its source blocks' CRCs before it writes them and asks the peer for the destination
blocks' once they landed. Both ask over the link's control channel (protocol.Checksums);
the bytes themselves move as in any transfer (NIXL, or the same-host copy)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, cast

import torch

from .. import verify as verification
from ..errors import LLMStatusCode, make_error, param_invalid, translate
from ..inflight import Transfer
from ..types import Blocks, Cache, block_tensor, layer_tensors
from . import protocol
from .control import Link
from .leases import served_cache


class Engine(Protocol):
    """What this module needs of the engine (engine.py imports this module)."""

    def link_for(self, cluster_id: int) -> Link: ...


# A peer's cache, by id or by a key it registered.
RemoteRef = int | str
F = TypeVar("F", bound=Callable[..., Transfer])


def routable(verify: object) -> bool:
    """Whether a block transfer may start on a same-host route (api._routed): only when
    it is not verified (an argument that is not a bool goes the full way, to be refused).

    >>> routable(False), routable(True), routable(1)
    (True, False, False)
    """
    return verify is False and not verification.always


def checked(start: F, verify: object, engine: Callable[[], Engine]) -> F:
    """``start`` (api.start_blocks or api.start_slice) itself, or, when the transfer is to
    be verified (``verify``, a bool, or the process option), its verified form."""
    if not verification.wanted(verify):
        return start
    return cast(F, functools.partial(_verified, start, engine))


def _verified(start: Callable[..., Transfer], engine: Callable[[], Engine], *args: Any, **kwargs: Any) -> Transfer:
    bound = inspect.signature(start).bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    again = functools.partial(start, *args, **kwargs)
    link = engine().link_for(a["cluster_id"])
    common = (again, link, a["operation"], a["local"], a["remote_ref"])
    layers = (a["local_layers"], a["remote_layers"], a["tensors_per_layer"])
    if "src_blocks" in a:
        return start_blocks(*common, a["src_blocks"], a["dst_blocks"], *layers)
    return start_slice(*common, a["remote_index"], a["local_index"], a["size"], *layers)


def serve(request: protocol.Checksums) -> protocol.ChecksumsReply:
    """A peer's checksums request: CRCs of blocks of a remote-accessible cache of ours."""
    record, cache_id, index = served_cache(request.cache_id, request.key)
    blocks = [index] if request.key_slice else list(request.blocks)
    tensors = None
    if request.layers is not None:
        tensors = layer_tensors(range(*request.layers), request.tensors_per_layer, record.num_tensors)
    take = verification.landed_checksums if request.landed else verification.source_checksums
    try:
        crcs = take(cache_id, tensors, blocks, request.size)
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        error = translate(exc)
        if error is None:
            raise make_error(LLMStatusCode.LLM_FAILED, f"checksums failed: {exc}") from None
        raise error from None
    return protocol.ChecksumsReply(tuple(crcs))


def ask(
    link: Link,
    ref: RemoteRef,
    blocks: Sequence[int],
    layers: range | None,
    tensors_per_layer: int,
    size: int,
    landed: bool,
    key_slice: bool = False,
) -> list[int]:
    """The peer's CRCs of ``blocks`` of its cache ``ref`` (in requests of at most
    protocol.MAX_CHECKSUM_BLOCKS blocks); ``key_slice``: of the slice its key names."""
    wire_layers = None if layers is None else (layers.start, layers.stop)
    chunks = (
        [[]]
        if key_slice
        else [blocks[i : i + protocol.MAX_CHECKSUM_BLOCKS] for i in range(0, len(blocks), protocol.MAX_CHECKSUM_BLOCKS)]
    )
    out: list[int] = []
    for chunk in chunks:
        request = protocol.Checksums(
            ref if isinstance(ref, int) else None,
            ref if isinstance(ref, str) else None,
            tuple(int(block) for block in chunk),
            wire_layers,
            tensors_per_layer,
            size,
            landed,
            key_slice,
        )
        response = link.request(request)
        try:
            out.extend(protocol.ChecksumsReply.parse(response, 1 if key_slice else len(chunk)).crcs)
        except protocol.ProtocolError as exc:
            raise make_error(LLMStatusCode.LLM_FAILED, f"malformed checksums reply: {exc}") from None
    return out


def _layers(layers: range | None, tensors_per_layer: int, num_tensors: int, name: str) -> list[int] | None:
    """The tensors ``layers`` selects (None: all), checked as the transfer checks them."""
    return None if layers is None else layer_tensors(layers, tensors_per_layer, num_tensors, name)


def _not_negative(blocks: Sequence[int] | torch.Tensor, name: str) -> None:
    """Remote blocks below 0 are refused here (LLM_PARAM_INVALID, IndexError-type), as the
    transfer itself refuses them: a checksums request would carry them to the peer, which
    takes a malformed request as a broken link and closes it."""
    values = blocks.tolist() if isinstance(blocks, torch.Tensor) else list(blocks)
    for j, block in enumerate(values):
        if block < 0:
            where = name if name.endswith("index") else f"{name}[{j}] ="
            raise make_error(LLMStatusCode.LLM_PARAM_INVALID, f"{where} {block} is out of range", IndexError)


def start_blocks(
    start: Callable[[], Transfer],
    link: Link,
    operation: str,
    local: Cache,
    remote_ref: RemoteRef,
    src_blocks: Blocks,
    dst_blocks: Blocks,
    local_layers: range | None,
    remote_layers: range | None,
    tensors_per_layer: int,
) -> Transfer:
    """A verified block transfer: ``start()`` starts the transfer that moves the bytes,
    between the source CRCs and the Transfer whose wait compares the destination's."""
    src_list, dst_list = block_tensor(src_blocks, "src_blocks"), block_tensor(dst_blocks, "dst_blocks")
    if src_list.numel() != dst_list.numel():
        raise param_invalid(f"src_blocks has {src_list.numel()} entries but dst_blocks has {dst_list.numel()}")
    if src_list.numel() == 0:
        return start()
    read = operation == "READ"
    local_tensors = _layers(
        local_layers, tensors_per_layer, local.cache_desc.num_tensors, "dst_layer_range" if read else "src_layer_range"
    )
    # The peer checks its layers against its own cache; the form of the range is checked here.
    _layers(remote_layers, tensors_per_layer, 2**31, "src_layer_range" if read else "dst_layer_range")
    _not_negative(src_list if read else dst_list, "src_blocks" if read else "dst_blocks")
    if read:
        expected = ask(link, remote_ref, src_list.tolist(), remote_layers, tensors_per_layer, -1, landed=False)
        inner = start()
        return verification.Checked(
            inner,
            dst_list.tolist(),
            expected,
            lambda: verification.landed_checksums(local.cache_id, local_tensors, dst_list),
        ).outer
    expected = verification.source_checksums(local.cache_id, local_tensors, src_list)
    inner = start()
    dst = dst_list.tolist()
    return verification.Checked(
        inner,
        dst,
        expected,
        lambda: ask(link, remote_ref, dst, remote_layers, tensors_per_layer, -1, landed=True),
    ).outer


def start_slice(
    start: Callable[[], Transfer],
    link: Link,
    operation: str,
    local: Cache,
    remote_ref: RemoteRef,
    remote_index: int | None,
    local_index: int,
    size: int,
    local_layers: range | None,
    remote_layers: range | None,
    tensors_per_layer: int,
) -> Transfer:
    """A verified slice transfer (``remote_index`` None: the slice the remote key names)."""
    read = operation == "READ"
    local_tensors = _layers(
        local_layers, tensors_per_layer, local.cache_desc.num_tensors, "dst_layer_range" if read else "src_layer_range"
    )
    _layers(remote_layers, tensors_per_layer, 2**31, "src_layer_range" if read else "dst_layer_range")
    by_key = remote_index is None
    remote_blocks = [] if remote_index is None else [remote_index]
    _not_negative(remote_blocks, "src_batch_index" if read else "dst_batch_index")

    def remote_sums(landed: bool) -> list[int]:
        return ask(link, remote_ref, remote_blocks, remote_layers, tensors_per_layer, size, landed, by_key)

    if read:
        expected = remote_sums(False)
        inner = start()
        return verification.Checked(
            inner,
            [local_index],
            expected,
            lambda: verification.landed_checksums(local.cache_id, local_tensors, [local_index], size),
        ).outer
    expected = verification.source_checksums(local.cache_id, local_tensors, [local_index], size)
    inner = start()
    # (a slice named by key: its index is the peer's; failed_blocks names the key's slice as 0)
    return verification.Checked(inner, remote_blocks or [0], expected, lambda: remote_sums(True)).outer
