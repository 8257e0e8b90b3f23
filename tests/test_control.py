"""The control server as a stranger sees it: every malformed or hostile request, built with
the project's own encoder and then corrupted field by field, gets the reply it must get and
changes nothing; leases belong to the connection that took them; a decoder that dies holding
one, or a finalize while peers hold them, frees everything within llm.SyncKvCacheWaitTime.
Also the client side: a peer's cache entry at the edges of the address space."""

import json
import socket
import struct
import subprocess
import sys
import time

import pytest
import torch

import torch_kvreg as kv
from torch_kvreg import CacheDesc, DataType, LLMStatusCode, Placement
from torch_kvreg.remote import protocol

pytestmark = pytest.mark.skipif(not kv.remote.nixl_available(), reason="needs the nixl extra")
WAIT_MS = 400


class Client:
    """A raw control connection to this process's own server."""

    def __init__(self):
        host, port = kv.listen_address().split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=5)

    def send(self, data: bytes):
        self.sock.sendall(data)
        return self

    def reply(self):
        """The next response, or None when the server closed the connection."""
        try:
            header = self._exact(4)
            return json.loads(self._exact(protocol.frame_length(header)))
        except ConnectionError:
            return None

    def request(self, message: dict):
        return self.send(protocol.encode(message)).reply()

    def closed(self) -> bool:
        return self.reply() is None

    def _exact(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def close(self):
        self.sock.close()


@pytest.fixture
def prompt():
    kv.initialize(
        cluster_id=5,
        role=kv.LlmRole.PROMPT,
        options={"llm.ListenIpInfo": "127.0.0.1:0", "llm.SyncKvCacheWaitTime": str(WAIT_MS)},
    )
    tensors = [torch.arange(64.0).reshape(8, 8) for _ in range(2)]
    public = kv.register_kv_cache(tensors, kv.RegisterCfg(remote_accessible=True))
    private = kv.register_kv_cache([torch.ones(4, 4)], kv.RegisterCfg(remote_accessible=False))
    default_host = kv.register_kv_cache([torch.ones(4, 4)])  # HOST: private unless asked
    yield {"public": public, "private": private, "default_host": default_host, "tensors": tensors}
    kv.finalize()


def acquired(message: dict) -> tuple:
    reply = protocol.AcquireReply.parse(message)
    return reply.lease, reply.cache, reply.md


def body(message: dict) -> bytes:
    """A frame around JSON the encoder would not make (no version added)."""
    data = json.dumps(message).encode()
    return struct.pack(">I", len(data)) + data


def corrupt(message: dict, **fields) -> bytes:
    """The encoder's frame of ``message`` with fields replaced (None deletes one)."""
    frame = protocol.encode(message)
    decoded = json.loads(frame[4:])
    for key, value in fields.items():
        if value is None:
            decoded.pop(key, None)
        else:
            decoded[key] = value
    return body(decoded)


HELLO = {"op": "hello", "cluster_id": 9, "agent": "stranger"}
ACQUIRE = {"op": "acquire", "cache_id": 1}
RELEASE = {"op": "release", "lease": 1}
PING = {"op": "ping"}
BIG = 2**63
MALFORMED = [
    # sizes
    ("empty frame", struct.pack(">I", 0)),
    ("frame over the cap", struct.pack(">I", protocol.MAX_FRAME + 1) + b"{}"),
    ("frame of 2**32-1", struct.pack(">I", 2**32 - 1) + b"{}"),
    ("not UTF-8", struct.pack(">I", 4) + b"\xff\xfe{}"),
    ("not JSON", struct.pack(">I", 4) + b"[1,2"),
    ("JSON array", body([1, 2])),
    # version
    ("a later version", corrupt(HELLO, v=protocol.VERSION + 1)),
    ("version 1 (a peer without checksums)", corrupt(HELLO, v=1)),
    ("version 0", corrupt(HELLO, v=0)),
    ("version as text", corrupt(HELLO, v="1")),
    ("version true", corrupt(HELLO, v=True)),
    ("version 1.0", corrupt(HELLO, v=1.0)),
    ("no version", corrupt(HELLO, v=None)),
    # op
    ("unknown op", corrupt(HELLO, op="steal")),
    ("op in capitals", corrupt(ACQUIRE, op="ACQUIRE")),
    ("op as number", corrupt(ACQUIRE, op=1)),
    ("no op", corrupt(ACQUIRE, op=None)),
    # hello fields
    ("cluster id -1", corrupt(HELLO, cluster_id=-1)),
    ("cluster id 2**63", corrupt(HELLO, cluster_id=BIG)),
    ("cluster id true", corrupt(HELLO, cluster_id=True)),
    ("cluster id text", corrupt(HELLO, cluster_id="9")),
    ("empty agent", corrupt(HELLO, agent="")),
    ("agent too long", corrupt(HELLO, agent="a" * 257)),
    ("agent not text", corrupt(HELLO, agent=5)),
    # ids
    ("cache id -1", corrupt(ACQUIRE, cache_id=-1)),
    ("cache id 2**63", corrupt(ACQUIRE, cache_id=BIG)),
    ("cache id 2**64", corrupt(ACQUIRE, cache_id=2**64)),
    ("cache id float", corrupt(ACQUIRE, cache_id=1.0)),
    ("cache id true", corrupt(ACQUIRE, cache_id=True)),
    ("cache id text", corrupt(ACQUIRE, cache_id="1")),
    ("no cache id", corrupt(ACQUIRE, cache_id=None)),
    # lease
    ("lease text", corrupt(RELEASE, lease="everything")),
    ("lease -1", corrupt(RELEASE, lease=-1)),
    ("lease 2**63", corrupt(RELEASE, lease=BIG)),
    ("lease list", corrupt(RELEASE, lease=[1, 2])),
    ("no lease", corrupt(RELEASE, lease=None)),
    # ping
    ("ping loaded 1", corrupt(PING, loaded=1)),
    ("ping loaded as text", corrupt(PING, loaded="true")),
    ("ping loaded null", body({"v": protocol.VERSION, **PING, "loaded": None})),
]


def state(prompt):
    engine = kv.remote.current_engine()
    return (kv.usage(), kv.registered_caches(), dict(engine.holds.leases), [t.clone() for t in prompt["tensors"]])


def same_state(a, b):
    return a[:3] == b[:3] and all(torch.equal(x, y) for x, y in zip(a[3], b[3]))


@pytest.mark.parametrize("name,frame", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_request_is_refused_and_disconnected(prompt, name, frame):
    before = state(prompt)
    client = Client().send(frame)
    reply = client.reply()
    assert reply is not None and reply["ok"] is False, reply
    assert reply["status"] == "LLM_PARAM_INVALID"
    assert reply["message"].startswith("malformed request")
    assert client.closed()  # a peer that sends garbage loses its connection
    client.close()
    assert same_state(state(prompt), before)


def test_truncated_frame_gets_no_reply_and_changes_nothing(prompt):
    before = state(prompt)
    client = Client().send(protocol.encode(HELLO)[:-3])
    client.sock.shutdown(socket.SHUT_WR)
    assert client.closed()
    client.close()
    assert same_state(state(prompt), before)


@pytest.mark.parametrize(
    "which,cache_id", [("unknown", 10**6), ("private", "private"), ("default_host", "default_host"), ("id 0", 0)]
)
def test_refused_acquire_keeps_the_connection(prompt, which, cache_id):
    if isinstance(cache_id, str):
        cache_id = prompt[cache_id].cache_id
    before = state(prompt)
    client = Client()
    reply = client.request({"op": "acquire", "cache_id": cache_id})
    assert reply == {
        "v": protocol.VERSION,
        "ok": False,
        "status": "LLM_KV_CACHE_NOT_EXIST",
        "message": reply["message"],
    }
    assert client.request(HELLO)["ok"] is True  # still served
    client.close()
    assert same_state(state(prompt), before)


def test_lease_belongs_to_its_connection(prompt):
    public = prompt["public"]
    owner, stranger = Client(), Client()
    granted = owner.request({"op": "acquire", "cache_id": public.cache_id})
    assert granted["ok"] is True
    lease, entry, _ = acquired(granted)
    assert entry.cache_id == public.cache_id and entry.addrs == public.tensor_addrs
    engine = kv.remote.current_engine()
    assert engine.holds.leases == {lease: public.cache_id}
    # Another connection releasing it: answered, ignored.
    assert stranger.request({"op": "release", "lease": lease}) == {"v": protocol.VERSION, "ok": True}
    assert engine.holds.leases == {lease: public.cache_id}
    with pytest.raises(kv.LLMException) as info:
        kv.unregister_kv_cache(public)  # the owner's lease still holds it
    assert info.value.status_code == LLMStatusCode.LLM_TIMEOUT
    assert public in kv.registered_caches()
    # The owner releasing it: gone; releasing it twice is harmless.
    assert owner.request({"op": "release", "lease": lease})["ok"] is True
    assert owner.request({"op": "release", "lease": lease})["ok"] is True
    assert engine.holds.leases == {}
    kv.unregister_kv_cache(public)
    owner.close()
    stranger.close()


HOLDER = """
import socket, struct, sys, time
sys.path.insert(0, {root!r})
from torch_kvreg.remote import protocol
sock = socket.create_connection(({host!r}, {port}))
sock.sendall(protocol.encode({{"op": "acquire", "cache_id": {cache_id}}}))
header = sock.recv(4)
print("held", len(sock.recv(struct.unpack(">I", header)[0], socket.MSG_WAITALL)), flush=True)
time.sleep(600)
"""


def test_decoder_killed_while_holding_a_lease(prompt):
    import pathlib

    public = prompt["public"]
    host, port = kv.listen_address().split(":")
    code = HOLDER.format(
        root=str(pathlib.Path(kv.__file__).parent.parent), host=host, port=port, cache_id=public.cache_id
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().startswith("held")
        assert list(kv.remote.current_engine().holds.leases.values()) == [public.cache_id]
        holder.kill()
        holder.wait(timeout=30)
        start = time.monotonic()
        kv.unregister_kv_cache(public)  # the dead peer's lease goes with its connection
        assert time.monotonic() - start < WAIT_MS / 1000
        assert kv.remote.current_engine().holds.leases == {}
        assert public not in kv.registered_caches()
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_finalize_while_peers_hold_leases(prompt):
    public = prompt["public"]
    clients = [Client() for _ in range(3)]
    for client in clients:
        assert client.request({"op": "acquire", "cache_id": public.cache_id})["ok"] is True
    assert len(kv.remote.current_engine().holds.leases) == 3
    start = time.monotonic()
    kv.finalize()
    assert time.monotonic() - start < WAIT_MS / 1000 + 2  # waits (bounded) for the leases, then drops them
    assert not kv.is_initialized() and kv.usage() == kv.Usage(0, 0, 0, 0)
    for client in clients:
        assert client.closed()  # peers are disconnected, not left talking to a closed engine
        client.close()


# --- the client side: a peer's cache-table entry ------------------------------------------
def entry(addrs, shape=(8,), data_type=DataType.DT_INT8, num_tensors=None):
    desc = CacheDesc(num_tensors or len(addrs), data_type, shape, Placement.HOST)
    return protocol.cache_entry(3, desc, addrs)


EDGES = [
    ("last bytes of the address space", entry([2**64 - 8]), True),
    ("one byte past the end", entry([2**64 - 7]), False),
    ("address 2**64", entry([2**64]), False),
    ("address 2**64-1, one byte", entry([2**64 - 1], shape=(1,)), True),
    ("address 2**64-1, two bytes", entry([2**64 - 1], shape=(2,)), False),
    ("null address", entry([0]), False),
    ("negative address", entry([-8]), False),
    ("second tensor wraps", entry([4096, 2**64 - 4], shape=(8,)), False),
    ("size of 2**63 bytes", entry([4096], shape=(2**31, 2**32)), False),
    ("size just under 2**63", entry([4096], shape=(2**31 - 1, 2**32)), True),
    ("fewer addresses than tensors", entry([4096], num_tensors=2), False),
    ("address true", entry([True]), False),
]


@pytest.mark.parametrize("name,cache,accepted", EDGES, ids=[e[0] for e in EDGES])
def test_peer_cache_entry_edges(name, cache, accepted):
    message = {"v": protocol.VERSION, "ok": True, "lease": 4, "md": protocol.b64(b"md"), "cache": cache}
    if accepted:
        lease, parsed, md = acquired(message)
        assert (lease, md, parsed.addrs) == (4, b"md", tuple(cache["addrs"]))
        assert all(a + parsed.desc.tensor_nbytes <= 2**64 for a in parsed.addrs)
    else:
        with pytest.raises(protocol.ProtocolError):
            protocol.AcquireReply.parse(message)


@pytest.mark.parametrize(
    "field,value",
    [
        ("lease", -1),
        ("lease", True),
        ("lease", 2**63),
        ("md", "not base64!"),
        ("md", 7),
        ("cache", None),
        ("cache", []),
    ],
)
def test_acquire_response_fields(field, value):
    message = {"v": protocol.VERSION, "ok": True, "lease": 4, "md": protocol.b64(b"md"), "cache": entry([4096])}
    protocol.AcquireReply.parse(message)  # the uncorrupted one parses
    message[field] = value
    with pytest.raises(protocol.ProtocolError):
        protocol.AcquireReply.parse(message)
