"""The control-path protocol between torch_kvreg processes: small, versioned, validated.

Only metadata crosses it (NIXL agent metadata and the table entry of one cache); data
moves over NIXL. A frame is a 4-byte big-endian length and a UTF-8 JSON object carrying
``"v": VERSION``. Everything a peer sends is checked here before use: a malformed or
hostile message raises ProtocolError and never reaches the registry.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import struct
from collections.abc import Sequence

from ..errors import LLMStatusCode
from ..types import CacheDesc, DataType, Placement

VERSION = 1
MAX_FRAME = 4 << 20  # agent metadata is a few KiB; anything near this is hostile
MAX_TENSORS = 240
MAX_RANK = 32
MAX_KEY = 256
_HEADER = struct.Struct(">I")
REQUESTS = ("challenge", "hello", "acquire", "release", "ping", "bye", "same_host")
NONCE_BYTES = 32  # fresh per handshake, from secrets.token_bytes
PROOF_BYTES = 32  # HMAC-SHA256


class ProtocolError(Exception):
    """A peer's message that cannot be trusted."""


@dataclasses.dataclass(frozen=True)
class RemoteCache:
    cache_id: int
    desc: CacheDesc
    addrs: tuple[int, ...]


def encode(message: dict) -> bytes:
    body = json.dumps({"v": VERSION, **message}, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    if len(header) != _HEADER.size:
        raise ProtocolError("truncated frame header")
    (length,) = _HEADER.unpack(header)
    if not 0 < length <= MAX_FRAME:
        raise ProtocolError(f"frame length {length} outside 1..{MAX_FRAME}")
    return length


def decode(body: bytes) -> dict:
    """A frame body as a message dict with a known version."""
    try:
        message = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"not UTF-8 JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("message is not a JSON object")
    version = message.get("v")
    if type(version) is not int or version != VERSION:  # JSON true would equal 1
        raise ProtocolError(f"protocol version {version!r}, expected {VERSION}")
    return message


def _int(message: dict, key: str, low: int = 0, high: int = 2**63 - 1) -> int:
    value = message.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProtocolError(f"field {key!r} must be an int in [{low}, {high}], got {value!r}")
    return value


def _str(message: dict, key: str, max_len: int = 256) -> str:
    value = message.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= max_len:
        raise ProtocolError(f"field {key!r} must be a non-empty str of at most {max_len} chars")
    return value


def _bytes(message: dict, key: str) -> bytes:
    value = message.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"field {key!r} must be base64 text")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ProtocolError(f"field {key!r} is not valid base64") from None


def _sized(message: dict, key: str, size: int) -> bytes:
    value = _bytes(message, key)
    if len(value) != size:
        raise ProtocolError(f"field {key!r} must hold {size} bytes, got {len(value)}")
    return value


def parse_challenge_response(message: dict) -> tuple[bytes, bytes]:
    """(the accepting side's nonce, its proof) from a challenge response."""
    return _sized(message, "nonce", NONCE_BYTES), _sized(message, "proof", PROOF_BYTES)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def parse_request(message: dict) -> tuple[str, dict]:
    """(op, checked fields) of a request from a peer."""
    op = message.get("op")
    if op not in REQUESTS:
        raise ProtocolError(f"unknown op {op!r}")
    if op == "challenge":  # a linker with a link secret opens with its nonce
        return op, {"cluster_id": _int(message, "cluster_id"), "nonce": _sized(message, "nonce", NONCE_BYTES)}
    if op == "hello":
        fields = {"cluster_id": _int(message, "cluster_id"), "agent": _str(message, "agent")}
        if "md" in message:  # the peer's agent metadata: then we may transfer to it too
            fields["md"] = _bytes(message, "md")
        if "proof" in message:  # the linker's answer to our challenge
            fields["proof"] = _sized(message, "proof", PROOF_BYTES)
        return op, fields
    if op == "acquire":
        if "key" in message:  # a cache key the peer registered (LLM-DataDist's cache keys)
            return op, {"key": _str(message, "key", MAX_KEY)}
        return op, {"cache_id": _int(message, "cache_id")}
    if op == "release":
        return op, {"lease": _int(message, "lease")}
    if op == "same_host":  # the linker's nonce, for us to show at an address of ours
        return op, {"nonce": _sized(message, "nonce", NONCE_BYTES)}
    return op, {}


def parse_error(message: dict) -> tuple[LLMStatusCode, str] | None:
    """None for an ok response, else the (status, text) the peer reported."""
    ok = message.get("ok")
    if ok is True:
        return None
    if ok is not False:
        raise ProtocolError("response has no boolean 'ok'")
    name = message.get("status")
    if not isinstance(name, str) or name not in LLMStatusCode.__members__ or name == "LLM_SUCCESS":
        raise ProtocolError(f"error response with unknown status {name!r}")
    text = message.get("message", "")
    if not isinstance(text, str):
        raise ProtocolError("error text is not a str")
    return LLMStatusCode[name], text[:1000]


def parse_hello_response(message: dict) -> tuple[int, str, bytes]:
    """(cluster_id, agent name, agent metadata) from a hello response."""
    return _int(message, "cluster_id"), _str(message, "agent"), _bytes(message, "md")


def parse_host(message: dict) -> str | None:
    """The host identity a hello response carries, None without one (or a malformed one:
    the peer is then treated as on another host)."""
    try:
        return _str(message, "host")
    except ProtocolError:
        return None


def parse_same_host_response(message: dict) -> tuple[int, int]:
    """(the peer's pid, the address in it that holds our nonce)."""
    return _int(message, "pid", 1, 2**31 - 1), _int(message, "address", 1, 2**64 - 1)


def cache_entry(cache_id: int, desc: CacheDesc, addrs: Sequence[int]) -> dict:
    return {
        "cache_id": cache_id,
        "num_tensors": desc.num_tensors,
        "data_type": int(desc.data_type),
        "shape": list(desc.shape),
        "placement": int(desc.placement),
        "device_index": desc.device_index,
        "addrs": list(addrs),
    }


def parse_cache_entry(entry: object) -> RemoteCache:
    """A remote cache-table entry, checked as strictly as a local registration."""
    if not isinstance(entry, dict):
        raise ProtocolError("cache entry is not an object")
    cache_id = _int(entry, "cache_id", 1)
    num_tensors = _int(entry, "num_tensors", 1, MAX_TENSORS)
    data_type = _int(entry, "data_type", 0, 255)
    if data_type not in DataType._value2member_map_ or data_type == DataType.DT_UNDEFINED:
        raise ProtocolError(f"unknown data_type {data_type}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_RANK:
        raise ProtocolError(f"shape must be a list of 1 to {MAX_RANK} ints")
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or not 0 < dim < 2**62:
            raise ProtocolError(f"shape entry {dim!r} is not a positive int")
    placement = _int(entry, "placement", 0, 1)
    device_index = _int(entry, "device_index", -1, 1 << 16)
    addrs = entry.get("addrs")
    if not isinstance(addrs, list) or len(addrs) != num_tensors:
        raise ProtocolError("addrs must be a list with one address per tensor")
    for addr in addrs:
        if isinstance(addr, bool) or not isinstance(addr, int) or not 0 < addr < 2**64:
            raise ProtocolError(f"address {addr!r} is not a non-null 64-bit int")
    desc = CacheDesc(num_tensors, DataType(data_type), tuple(shape), Placement(placement), device_index)
    if desc.tensor_nbytes >= 2**63:
        raise ProtocolError("cache size overflows 63 bits")
    for addr in addrs:
        if addr + desc.tensor_nbytes > 2**64:
            raise ProtocolError("a tensor wraps around the address space")
    return RemoteCache(cache_id, desc, tuple(addrs))


def parse_acquire_index(message: dict) -> int:
    """The slice a cache key names (0 when the cache was acquired by id)."""
    if "index" not in message:
        return 0
    return _int(message, "index", 0, 2**62)


def parse_acquire_response(message: dict) -> tuple[int, RemoteCache, bytes]:
    """(lease id, cache entry, NIXL metadata of the cache's memory)."""
    return _int(message, "lease"), parse_cache_entry(message.get("cache")), _bytes(message, "md")
