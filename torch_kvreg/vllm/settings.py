"""The connector's settings and the kv_transfer_params it reads and writes; no vllm import.

``kv_connector_extra_config`` keys (all optional):

- ``listen_address``: "ip:port" this instance serves links on (default "127.0.0.1:0": a free
  port on loopback); what a producer puts into ``remote_host`` / ``remote_port``.
- ``link_secret``: the link secret (default: TORCH_KVREG_LINK_SECRET, else none).
- ``link_timeout_ms``: how long a decoder waits for a link (default 3000).
- ``transfer_timeout_ms``: how long one KV load may take (default 10000), torch_kvreg's
  ``llm.SyncKvCacheWaitTime``.
- ``hold_timeout_s``: how long a producer keeps a finished request's blocks for a decoder
  that has not read them (default 120).
- ``max_concurrent_loads``: loads a decoder runs at once (default 4).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

from ..errors import param_invalid, wrong_type
from .shapes import CacheShape

# What a decoder's completion notice starts with; the producer's request id follows.
NOTICE_PREFIX = b"torch_kvreg.vllm:"
TRANSFER_MODE = "torch_kvreg"
ROLES = ("kv_producer", "kv_consumer", "kv_both")


def _positive_number(extra: Mapping[str, Any], key: str, default: float) -> float:
    value = extra.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise wrong_type(f"kv_connector_extra_config[{key!r}] must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise param_invalid(f"kv_connector_extra_config[{key!r}] must be positive, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class ConnectorSettings:
    """What ``kv_connector_extra_config`` sets, checked.

    >>> ConnectorSettings.from_extra_config({"listen_address": "127.0.0.1:0"}).hold_timeout_s
    120.0
    """

    listen_address: str = "127.0.0.1:0"
    link_secret: str | None = None
    link_timeout_ms: int = 3000
    transfer_timeout_ms: int = 10000
    hold_timeout_s: float = 120.0
    max_concurrent_loads: int = 4

    @classmethod
    def from_extra_config(cls, extra: object) -> ConnectorSettings:
        if extra is None:
            extra = {}
        if not isinstance(extra, Mapping):
            raise wrong_type(f"kv_connector_extra_config must be a dict, got {type(extra).__name__}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(str(key) for key in extra if key not in known)
        if unknown:
            raise param_invalid(
                f"kv_connector_extra_config has unknown keys {unknown}; known: {', '.join(sorted(known))}"
            )
        listen = extra.get("listen_address", cls.listen_address)
        if not isinstance(listen, str):
            raise wrong_type(f"kv_connector_extra_config['listen_address'] must be a str, got {type(listen).__name__}")
        from ..registry import parse_listen_address

        parse_listen_address(listen)
        secret = extra.get("link_secret", os.environ.get("TORCH_KVREG_LINK_SECRET") or None)
        if secret is not None and (not isinstance(secret, str) or not secret):
            raise param_invalid("kv_connector_extra_config['link_secret'] must be a non-empty str")
        loads = _positive_number(extra, "max_concurrent_loads", cls.max_concurrent_loads)
        if loads != int(loads):
            raise param_invalid(f"kv_connector_extra_config['max_concurrent_loads'] must be whole, got {loads}")
        return cls(
            listen_address=listen,
            link_secret=secret,
            link_timeout_ms=int(_positive_number(extra, "link_timeout_ms", cls.link_timeout_ms)),
            transfer_timeout_ms=int(_positive_number(extra, "transfer_timeout_ms", cls.transfer_timeout_ms)),
            hold_timeout_s=_positive_number(extra, "hold_timeout_s", cls.hold_timeout_s),
            max_concurrent_loads=int(loads),
        )

    def __repr__(self) -> str:  # the secret never appears in output
        secret = None if self.link_secret is None else "***"
        return (
            f"ConnectorSettings(listen_address={self.listen_address!r}, link_secret={secret}, "
            f"link_timeout_ms={self.link_timeout_ms}, transfer_timeout_ms={self.transfer_timeout_ms}, "
            f"hold_timeout_s={self.hold_timeout_s}, max_concurrent_loads={self.max_concurrent_loads})"
        )


@dataclasses.dataclass(frozen=True)
class ProducerAddress:
    """Where a producer's KV can be read: what its worker tells its scheduler at start-up."""

    host: str
    port: int
    cluster_id: int
    cache_id: int
    block_size: int
    num_blocks: int
    shape: CacheShape | None = None  # None: a cache without KV heads (whole blocks only)


# Where one tensor-parallel rank of a producer is read: (host, port, cluster id, cache id).
RankAddress = tuple[str, int, int, int]


def _int_field(params: Mapping[str, Any], key: str) -> int:
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise param_invalid(f"kv_transfer_params[{key!r}] must be an int, got {value!r}")
    return value


def _ranks(value: object, tp_size: int) -> tuple[RankAddress, ...]:
    """The checked ``remote_ranks`` of a producer with ``tp_size`` ranks (none for one)."""
    if value is None or value == []:
        if tp_size > 1:
            raise param_invalid(f"kv_transfer_params['remote_ranks'] must list the producer's {tp_size} ranks")
        return ()
    if not isinstance(value, (list, tuple)) or len(value) != tp_size:
        raise param_invalid(f"kv_transfer_params['remote_ranks'] must list {tp_size} ranks, got {value!r}")
    out = []
    for rank in value:
        if not isinstance(rank, (list, tuple)) or len(rank) != 4:
            raise param_invalid(f"kv_transfer_params['remote_ranks'] holds {rank!r}, not [host, port, cluster, cache]")
        host, port, cluster_id, cache_id = rank
        numbers_ok = all(not isinstance(n, bool) and isinstance(n, int) for n in (port, cluster_id, cache_id))
        if not isinstance(host, str) or not host or not numbers_ok or not 0 < port < 65536:
            raise param_invalid(f"kv_transfer_params['remote_ranks'] holds {rank!r}, not [host, port, cluster, cache]")
        out.append((host, port, cluster_id, cache_id))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class RemoteSource:
    """The prompt KV a decode request reads: checked out of its ``kv_transfer_params``."""

    engine_id: str
    request_id: str
    host: str
    port: int
    cluster_id: int
    cache_id: int
    block_ids: tuple[int, ...]
    block_size: int
    num_tokens: int
    expires_at: float
    shape: CacheShape | None = None  # the producer's cache (rank 0); None: blocks as they are
    ranks: tuple[RankAddress, ...] = ()  # every rank's address when the producer has several

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> RemoteSource:
        """Raises LLM_PARAM_INVALID (a ValueError) naming the first field that is wrong.

        >>> source = RemoteSource.from_params(RemoteSource("e", "r", "127.0.0.1", 1, 2, 3,
        ...     (4, 5), 32, 40, 1e12).to_params())
        >>> source.block_ids, source.num_tokens
        ((4, 5), 40)
        """
        if not isinstance(params, Mapping):
            raise param_invalid(f"kv_transfer_params must be a dict, got {type(params).__name__}")
        mode = params.get("transfer_mode")
        if mode != TRANSFER_MODE:
            raise param_invalid(f"kv_transfer_params come from transfer_mode {mode!r}, not {TRANSFER_MODE!r}")
        strings = {}
        for key in ("remote_engine_id", "remote_request_id", "remote_host"):
            value = params.get(key)
            if not isinstance(value, str) or not value:
                raise param_invalid(f"kv_transfer_params[{key!r}] must be a non-empty str, got {value!r}")
            strings[key] = value
        port = _int_field(params, "remote_port")
        if not 0 < port < 65536:
            raise param_invalid(f"kv_transfer_params['remote_port'] {port} is not a port")
        blocks = params.get("remote_block_ids")
        if isinstance(blocks, (list, tuple)) and len(blocks) == 1 and isinstance(blocks[0], (list, tuple)):
            blocks = blocks[0]  # one KV-cache group, as vLLM's per-group block lists give it
        if not isinstance(blocks, (list, tuple)) or not blocks:
            raise param_invalid(f"kv_transfer_params['remote_block_ids'] must be a non-empty list, got {blocks!r}")
        for block in blocks:
            if isinstance(block, bool) or not isinstance(block, int) or block < 0:
                raise param_invalid(f"kv_transfer_params['remote_block_ids'] holds {block!r}, not a block id")
        block_size = _int_field(params, "remote_block_size")
        num_tokens = _int_field(params, "remote_num_tokens")
        if block_size <= 0 or num_tokens <= 0:
            raise param_invalid("kv_transfer_params: remote_block_size and remote_num_tokens must be positive")
        if -(-num_tokens // block_size) > len(blocks):
            raise param_invalid(
                f"kv_transfer_params: {num_tokens} tokens need {-(-num_tokens // block_size)} blocks of "
                f"{block_size}, remote_block_ids has {len(blocks)}"
            )
        expires_at = params.get("remote_expires_at")
        if isinstance(expires_at, bool) or not isinstance(expires_at, (int, float)) or not math.isfinite(expires_at):
            raise param_invalid(f"kv_transfer_params['remote_expires_at'] must be a time, got {expires_at!r}")
        shape = None if params.get("remote_geometry") is None else CacheShape.from_params(params["remote_geometry"])
        if shape is not None and shape.geometry.block_size != block_size:
            raise param_invalid(
                f"kv_transfer_params: remote_geometry's block_size {shape.geometry.block_size} is not "
                f"remote_block_size {block_size}"
            )
        ranks = _ranks(params.get("remote_ranks"), 1 if shape is None else shape.geometry.tp_size)
        return cls(
            engine_id=strings["remote_engine_id"],
            request_id=strings["remote_request_id"],
            host=strings["remote_host"],
            port=port,
            cluster_id=_int_field(params, "remote_cluster_id"),
            cache_id=_int_field(params, "remote_cache_id"),
            block_ids=tuple(int(block) for block in blocks),
            block_size=block_size,
            num_tokens=num_tokens,
            expires_at=float(expires_at),
            shape=shape,
            ranks=ranks,
        )

    def to_params(self) -> dict[str, Any]:
        """The kv_transfer_params a producer returns: NixlConnector's names where they exist
        (so proxies pass them on unchanged), torch_kvreg's own beside them."""
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self.engine_id,
            "remote_request_id": self.request_id,
            "remote_block_ids": list(self.block_ids),
            "remote_host": self.host,
            "remote_port": self.port,
            "remote_num_tokens": self.num_tokens,
            "remote_cluster_id": self.cluster_id,
            "remote_cache_id": self.cache_id,
            "remote_block_size": self.block_size,
            "remote_expires_at": self.expires_at,
            "tp_size": 1 if self.shape is None else self.shape.geometry.tp_size,
            "transfer_mode": TRANSFER_MODE,
            "remote_geometry": None if self.shape is None else self.shape.to_params(),
            "remote_ranks": [list(rank) for rank in self.ranks],
        }

    def rank_address(self, rank: int) -> RankAddress:
        """Where the producer's tensor-parallel rank ``rank`` is read."""
        if self.ranks:
            return self.ranks[rank]
        return (self.host, self.port, self.cluster_id, self.cache_id)

    def notice(self, reader: int = 0, readers: int = 1) -> bytes:
        """The completion notice the decoder sends with its read: decoder rank ``reader``
        of the ``readers`` that read one producer rank (its blocks are freed after the last)."""
        tail = b"" if readers == 1 else b"\x00%d/%d" % (reader, readers)
        return NOTICE_PREFIX + self.request_id.encode() + tail


@dataclasses.dataclass(frozen=True)
class LoadSpec:
    """One decode request's load: local blocks ``local_block_ids`` receive the remote blocks
    from the ``first_block``-th on (the blocks before it hold a locally cached prefix)."""

    source: RemoteSource
    local_block_ids: tuple[int, ...]
    first_block: int = 0

    def block_pairs(self) -> tuple[list[int], list[int]]:
        """(remote blocks, local blocks) to move, as many as both sides have.

        >>> source = RemoteSource("e", "r", "h", 1, 2, 3, (7, 8, 9), 32, 80, 1e12)
        >>> LoadSpec(source, (1, 2, 3, 4), first_block=1).block_pairs()
        ([8, 9], [1, 2])
        """
        remote = list(self.source.block_ids[self.first_block :])
        count = min(len(remote), len(self.local_block_ids))
        return remote[:count], list(self.local_block_ids[:count])
