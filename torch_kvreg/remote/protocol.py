"""The control-path protocol between torch_kvreg processes: small, versioned, validated.

Only metadata crosses it (NIXL agent metadata, the table entry of one cache, and the
CRCs of blocks a verified transfer compares); data moves over NIXL. A frame is a 4-byte
big-endian length and a UTF-8 JSON object carrying ``"v": VERSION``. Everything a peer
sends is checked here before use: a malformed or hostile message raises ProtocolError and
never reaches the registry.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import struct
from collections.abc import Sequence
from typing import ClassVar

from ..errors import LLMStatusCode
from ..types import CacheDesc, DataType, Placement

# The protocol's version, and what each version changed: a peer speaking another version
# is refused at its first frame.
VERSION = 4
HISTORY = {
    1: "frames of JSON objects; requests challenge, hello, acquire (by cache id or key), release,"
    " ping, bye and same_host; replies carry ok, errors a status name and a message;"
    " an acquire reply may carry shm (a cache in shared memory; peers that predate it ignore it)",
    2: "adds checksums (CRC-32C of blocks of a cache, for verified transfers) and its reply",
    3: "adds notice (a transfer's completion notice, sent once its data has landed; never answered)",
    4: "a peer loads a linker's NIXL metadata off its reader, answering requests meanwhile; a ping"
    " with loaded: true is answered once that load is done (a failure: LLM_LINK_FAILED, and the"
    " link is dropped), a plain ping at once",
}
MAX_FRAME = 4 << 20  # agent metadata is a few KiB; anything near this is hostile
MAX_TENSORS = 240
MAX_RANK = 32
MAX_KEY = 256
MAX_NOTICE = 1024  # a transfer's notify, as the API caps it
MAX_CHECKSUM_BLOCKS = 1 << 16  # per checksums request (a verified transfer sends several)
_HEADER = struct.Struct(">I")
NONCE_BYTES = 32  # fresh per handshake, from secrets.token_bytes
PROOF_BYTES = 32  # HMAC-SHA256


class ProtocolError(Exception):
    """A peer's message that cannot be trusted."""


@dataclasses.dataclass(frozen=True)
class SharedMemory:
    """Where a cache that allocate_kv_cache made lives in its owner: the memfd's name, the
    owner's descriptor number for it, and the mapping's base address and size there. A
    peer on the same host opens the descriptor through /proc and checks the name."""

    name: str
    fd: int
    base: int
    size: int

    def to_wire(self) -> dict:
        return {"name": self.name, "fd": self.fd, "base": self.base, "size": self.size}

    @classmethod
    def parse(cls, entry: object) -> SharedMemory:
        if not isinstance(entry, dict):
            raise ProtocolError("shared memory entry is not an object")
        base, size = _int(entry, "base", 1, 2**64 - 1), _int(entry, "size", 1, 2**62)
        if base + size > 2**64:
            raise ProtocolError("the shared region wraps around the address space")
        return cls(_str(entry, "name", 64), _int(entry, "fd", 0, 2**31 - 1), base, size)


@dataclasses.dataclass(frozen=True)
class RemoteCache:
    cache_id: int
    desc: CacheDesc
    addrs: tuple[int, ...]
    shared: SharedMemory | None = None  # set for a cache its owner allocated in shared memory


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


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- requests: one record per op; to_wire() gives the frame's object, parse() checks one ---
@dataclasses.dataclass(frozen=True)
class Challenge:
    """A linker with a link secret opens with its nonce."""

    op: ClassVar[str] = "challenge"
    cluster_id: int
    nonce: bytes

    def to_wire(self) -> dict:
        return {"op": self.op, "cluster_id": self.cluster_id, "nonce": b64(self.nonce)}

    @classmethod
    def parse(cls, message: dict) -> Challenge:
        return cls(_int(message, "cluster_id"), _sized(message, "nonce", NONCE_BYTES))


@dataclasses.dataclass(frozen=True)
class Hello:
    """The linker names itself; with its agent metadata (``md``) the peer may transfer to
    it too; ``proof``: its answer to the peer's challenge."""

    op: ClassVar[str] = "hello"
    cluster_id: int
    agent: str
    md: bytes | None = None
    proof: bytes | None = None

    def to_wire(self) -> dict:
        wire: dict = {"op": self.op, "cluster_id": self.cluster_id, "agent": self.agent}
        if self.md is not None:
            wire["md"] = b64(self.md)
        if self.proof is not None:
            wire["proof"] = b64(self.proof)
        return wire

    @classmethod
    def parse(cls, message: dict) -> Hello:
        return cls(
            _int(message, "cluster_id"),
            _str(message, "agent"),
            _bytes(message, "md") if "md" in message else None,
            _sized(message, "proof", PROOF_BYTES) if "proof" in message else None,
        )


@dataclasses.dataclass(frozen=True)
class Acquire:
    """A lease on a cache, named by id or by a key its owner registered it under."""

    op: ClassVar[str] = "acquire"
    cache_id: int | None = None
    key: str | None = None

    @classmethod
    def of(cls, ref: int | str) -> Acquire:
        return cls(key=ref) if isinstance(ref, str) else cls(cache_id=ref)

    def to_wire(self) -> dict:
        return {"op": self.op, "key": self.key} if self.key is not None else {"op": self.op, "cache_id": self.cache_id}

    @classmethod
    def parse(cls, message: dict) -> Acquire:
        if "key" in message:
            return cls(key=_str(message, "key", MAX_KEY))
        return cls(cache_id=_int(message, "cache_id"))


@dataclasses.dataclass(frozen=True)
class Release:
    op: ClassVar[str] = "release"
    lease: int

    def to_wire(self) -> dict:
        return {"op": self.op, "lease": self.lease}

    @classmethod
    def parse(cls, message: dict) -> Release:
        return cls(_int(message, "lease"))


@dataclasses.dataclass(frozen=True)
class SameHost:
    """The linker's nonce, for the peer to show at an address of its own."""

    op: ClassVar[str] = "same_host"
    nonce: bytes

    def to_wire(self) -> dict:
        return {"op": self.op, "nonce": b64(self.nonce)}

    @classmethod
    def parse(cls, message: dict) -> SameHost:
        return cls(_sized(message, "nonce", NONCE_BYTES))


@dataclasses.dataclass(frozen=True)
class Ping:
    """A sign of life. ``loaded`` (the last step of a link's handshake when the linker waits
    for the peer's NIXL metadata load): answered once the peer has loaded the linker's."""

    op: ClassVar[str] = "ping"
    loaded: bool = False

    def to_wire(self) -> dict:
        return {"op": self.op, "loaded": True} if self.loaded else {"op": self.op}

    @classmethod
    def parse(cls, message: dict) -> Ping:
        loaded = message.get("loaded", False)
        if not isinstance(loaded, bool):
            raise ProtocolError("field 'loaded' must be a boolean")
        return cls(loaded)


@dataclasses.dataclass(frozen=True)
class Bye:
    """The peer unlinks in good order."""

    op: ClassVar[str] = "bye"

    def to_wire(self) -> dict:
        return {"op": self.op}

    @classmethod
    def parse(cls, message: dict) -> Bye:
        return cls()


@dataclasses.dataclass(frozen=True)
class Notice:
    """A transfer's completion notice (its ``notify``), sent once the data has landed. One
    way: the peer queues it for get_notifications() and wait_notices() and answers nothing."""

    op: ClassVar[str] = "notice"
    message: bytes

    def to_wire(self) -> dict:
        return {"op": self.op, "message": b64(self.message)}

    @classmethod
    def parse(cls, message: dict) -> Notice:
        body = _bytes(message, "message")
        if len(body) > MAX_NOTICE:
            raise ProtocolError(f"field 'message' holds {len(body)} bytes, at most {MAX_NOTICE}")
        return cls(body)


def _int_list(message: dict, key: str, max_len: int, low: int = 0, high: int = 2**62) -> tuple[int, ...]:
    values = message.get(key)
    if not isinstance(values, list) or len(values) > max_len:
        raise ProtocolError(f"field {key!r} must be a list of at most {max_len} ints")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ProtocolError(f"field {key!r} holds {value!r}, not an int in [{low}, {high}]")
    return tuple(values)


@dataclasses.dataclass(frozen=True)
class Checksums:
    """The CRC-32C of blocks of one of the peer's caches (by id or key; ``key_slice``: of
    the slice the key names, ``blocks`` empty), each over ``size`` bytes (-1: all) of the
    tensors of ``layers`` ((start, stop), None: all tensors). ``landed``: the blocks are a
    transfer's destination, asked for once it landed; else its source, before it moves."""

    op: ClassVar[str] = "checksums"
    cache_id: int | None
    key: str | None
    blocks: tuple[int, ...]
    layers: tuple[int, int] | None
    tensors_per_layer: int
    size: int
    landed: bool
    key_slice: bool = False

    def to_wire(self) -> dict:
        wire: dict = {
            "op": self.op,
            "blocks": list(self.blocks),
            "tensors_per_layer": self.tensors_per_layer,
            "size": self.size,
            "landed": self.landed,
        }
        if self.key is not None:
            wire["key"] = self.key
            wire["key_slice"] = self.key_slice
        else:
            wire["cache_id"] = self.cache_id
        if self.layers is not None:
            wire["layers"] = list(self.layers)
        return wire

    @classmethod
    def parse(cls, message: dict) -> Checksums:
        key = _str(message, "key", MAX_KEY) if "key" in message else None
        cache_id = None if key is not None else _int(message, "cache_id")
        key_slice = message.get("key_slice", False)
        landed = message.get("landed")
        if not isinstance(key_slice, bool) or not isinstance(landed, bool):
            raise ProtocolError("fields 'key_slice' and 'landed' must be booleans")
        layers = _int_list(message, "layers", 2, 0, MAX_TENSORS) if "layers" in message else None
        if layers is not None and len(layers) != 2:
            raise ProtocolError("field 'layers' must be [start, stop]")
        return cls(
            cache_id,
            key,
            _int_list(message, "blocks", MAX_CHECKSUM_BLOCKS),
            None if layers is None else (layers[0], layers[1]),
            _int(message, "tensors_per_layer", 1, MAX_TENSORS),
            _int(message, "size", -1, 2**62),
            landed,
            key_slice,
        )


Request = Challenge | Hello | Acquire | Release | SameHost | Ping | Bye | Checksums | Notice
REQUESTS: dict[str, type[Request]] = {
    kind.op: kind for kind in (Challenge, Hello, Acquire, Release, SameHost, Ping, Bye, Checksums, Notice)
}


def parse_request(message: dict) -> Request:
    """The checked request record of a frame from a peer."""
    op = message.get("op")
    kind = REQUESTS.get(op) if isinstance(op, str) else None
    if kind is None:
        raise ProtocolError(f"unknown op {message.get('op')!r}")
    return kind.parse(message)


# --- replies ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Ok:
    def to_wire(self) -> dict:
        return {"ok": True}


@dataclasses.dataclass(frozen=True)
class Failure:
    """A request that failed, with its status (never LLM_SUCCESS)."""

    status: LLMStatusCode
    message: str

    def to_wire(self) -> dict:
        return {"ok": False, "status": self.status.name, "message": self.message}

    @staticmethod
    def of(message: dict) -> Failure | None:
        """None for an ok reply, else the failure the peer reported."""
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
        return Failure(LLMStatusCode[name], text[:1000])


@dataclasses.dataclass(frozen=True)
class ChallengeReply:
    """The accepting side's nonce and its proof of the secret."""

    nonce: bytes
    proof: bytes

    def to_wire(self) -> dict:
        return {"ok": True, "nonce": b64(self.nonce), "proof": b64(self.proof)}

    @classmethod
    def parse(cls, message: dict) -> ChallengeReply:
        return cls(_sized(message, "nonce", NONCE_BYTES), _sized(message, "proof", PROOF_BYTES))


@dataclasses.dataclass(frozen=True)
class HelloReply:
    """The peer's cluster id, agent name and metadata, and its host identity (None: none
    sent, or a malformed one: the peer is then treated as on another host)."""

    cluster_id: int
    agent: str
    md: bytes
    host: str | None = None

    def to_wire(self) -> dict:
        wire = {"ok": True, "cluster_id": self.cluster_id, "agent": self.agent, "md": b64(self.md)}
        if self.host is not None:
            wire["host"] = self.host
        return wire

    @classmethod
    def parse(cls, message: dict) -> HelloReply:
        try:
            host: str | None = _str(message, "host")
        except ProtocolError:
            host = None
        return cls(_int(message, "cluster_id"), _str(message, "agent"), _bytes(message, "md"), host)


@dataclasses.dataclass(frozen=True)
class AcquireReply:
    """A lease, the cache's table entry, the NIXL metadata of its memory, and the slice a
    cache key names (0 when acquired by id)."""

    lease: int
    cache: RemoteCache
    md: bytes
    index: int = 0
    by_key: bool = False

    def to_wire(self) -> dict:
        wire = {
            "ok": True,
            "lease": self.lease,
            "md": b64(self.md),
            "cache": cache_entry(self.cache.cache_id, self.cache.desc, self.cache.addrs),
        }
        if self.by_key:
            wire["index"] = self.index
        if self.cache.shared is not None:
            wire["shm"] = self.cache.shared.to_wire()
        return wire

    @classmethod
    def parse(cls, message: dict) -> AcquireReply:
        index = _int(message, "index", 0, 2**62) if "index" in message else 0
        cache = parse_cache_entry(message.get("cache"))
        if "shm" in message:
            cache = dataclasses.replace(cache, shared=SharedMemory.parse(message["shm"]))
        return cls(
            _int(message, "lease"),
            cache,
            _bytes(message, "md"),
            index,
            "index" in message,
        )


@dataclasses.dataclass(frozen=True)
class SameHostReply:
    """The peer's pid and the address in it that holds our nonce."""

    pid: int
    address: int

    def to_wire(self) -> dict:
        return {"ok": True, "pid": self.pid, "address": self.address}

    @classmethod
    def parse(cls, message: dict) -> SameHostReply:
        return cls(_int(message, "pid", 1, 2**31 - 1), _int(message, "address", 1, 2**64 - 1))


@dataclasses.dataclass(frozen=True)
class ChecksumsReply:
    """One CRC-32C per block a checksums request named, in its order."""

    crcs: tuple[int, ...]

    def to_wire(self) -> dict:
        return {"ok": True, "crcs": list(self.crcs)}

    @classmethod
    def parse(cls, message: dict, count: int) -> ChecksumsReply:
        crcs = _int_list(message, "crcs", MAX_CHECKSUM_BLOCKS, 0, 2**32 - 1)
        if len(crcs) != count:
            raise ProtocolError(f"{len(crcs)} checksums for {count} blocks")
        return cls(crcs)


Reply = Ok | Failure | ChallengeReply | HelloReply | AcquireReply | SameHostReply | ChecksumsReply


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
