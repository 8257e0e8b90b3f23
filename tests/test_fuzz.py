"""Fuzzing (hypothesis) of everything that parses data from outside: the control-protocol
parsers, a live control server, and the raw-address register path. No crash, no hang, and
no exception other than ProtocolError / the LLMException family."""

import collections
import json
import os
import socket
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch_kvreg as kv
from torch_kvreg import CacheDesc, DataType, Placement
from torch_kvreg.remote import protocol
from torch_kvreg.remote.control import read_message

LONG = os.environ.get("KVREG_LONG") == "1"
EXAMPLES = 20_000 if LONG else 1_500
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=not LONG)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=30,
)
keys = st.sampled_from(
    [
        "v",
        "op",
        "ok",
        "cluster_id",
        "agent",
        "md",
        "cache_id",
        "lease",
        "cache",
        "status",
        "message",
        "num_tensors",
        "data_type",
        "shape",
        "placement",
        "device_index",
        "addrs",
        "blocks",
        "size",
        "landed",
        "layers",
        "crcs",
    ]
)
messages = st.dictionaries(keys, json_values, max_size=10).map(lambda d: {**d, "v": d.get("v", protocol.VERSION)})


def valid_entry():
    return protocol.cache_entry(3, CacheDesc(2, DataType.DT_FLOAT16, (8, 4), Placement.HOST), [4096, 8192])


entry_mutations = st.tuples(
    st.sampled_from(list(valid_entry().keys())),
    json_values,
)

PARSERS = [
    protocol.parse_request,
    protocol.Failure.of,
    protocol.HelloReply.parse,
    protocol.AcquireReply.parse,
    lambda m: protocol.parse_cache_entry(m.get("cache", m)),
    lambda m: protocol.ChecksumsReply.parse(m, 2),
]


@FUZZ
@given(body=st.binary(max_size=300))
def test_decode_random_bytes(body):
    try:
        protocol.decode(body)
    except protocol.ProtocolError:
        pass


@FUZZ
@given(header=st.binary(min_size=0, max_size=6))
def test_frame_length_random_header(header):
    try:
        length = protocol.frame_length(header)
        assert 0 < length <= protocol.MAX_FRAME
    except protocol.ProtocolError:
        pass


@FUZZ
@given(message=messages)
def test_parsers_random_messages(message):
    body = json.dumps(message).encode()
    version = message.get("v")
    decoded = protocol.decode(body) if version == protocol.VERSION and type(version) is int else message
    for parse in PARSERS:
        try:
            parse(decoded)
        except protocol.ProtocolError:
            pass


@FUZZ
@given(mutations=st.lists(entry_mutations, min_size=1, max_size=3))
def test_cache_entry_mutations(mutations):
    entry = valid_entry()
    for key, value in mutations:
        entry[key] = value
    try:
        parsed = protocol.parse_cache_entry(entry)
    except protocol.ProtocolError:
        return
    # Anything accepted is internally consistent.
    assert len(parsed.addrs) == parsed.desc.num_tensors <= 240
    assert all(0 < a and a + parsed.desc.tensor_nbytes <= 2**64 for a in parsed.addrs)
    assert 1 <= len(parsed.desc.shape) <= 32 and all(d > 0 for d in parsed.desc.shape)


def test_valid_entry_round_trips():
    entry = valid_entry()
    parsed = protocol.parse_cache_entry(json.loads(json.dumps(entry)))
    assert parsed.cache_id == 3 and parsed.addrs == (4096, 8192)
    assert parsed.desc == CacheDesc(2, DataType.DT_FLOAT16, (8, 4), Placement.HOST)


raw_descs = st.tuples(
    st.integers(-2, 250),  # num_tensors
    st.sampled_from([d.value for d in DataType] + [5, 13, 99, -1]),
    st.lists(st.integers(-2, 2**33), min_size=0, max_size=34),
    st.sampled_from([0, 1, 2, -1]),
    st.integers(-3, 3),
)


@FUZZ
@given(desc=raw_descs, addrs=st.lists(st.integers(-(2**64), 2**64), max_size=6))
def test_raw_address_register_path(desc, addrs):
    """Straight into the op, below the Python checks: only LLM-typed errors, nothing half-done."""
    if not kv.is_initialized():
        kv.initialize(limits=kv.Limits(10**6, 2**62, 2**62))
    before = kv.usage()
    num_tensors, data_type, shape, placement, device_index = desc
    try:
        cache_id = torch.ops.llm.register_kv_cache.addrs(
            num_tensors, data_type, shape, placement, device_index, addrs, False, -1
        )
    except (ValueError, IndexError, TypeError, RuntimeError, OverflowError) as exc:
        message = str(exc)
        # Values outside int64 are refused by the op binding itself; everything else is ours.
        assert message.startswith("LLM_") or "int" in message or "overflow" in message.lower(), message
        assert kv.usage() == before
        return
    kv.unregister_kv_cache(int(cache_id))  # accepted: registration touched no memory
    assert kv.usage() == before


def replies_to(host, port, frames, outcomes):
    """Sends frames on one fresh connection, yielding each reply; the first frame that gets
    none (silence, a closed connection, garbage back) counts as "no reply" and ends it."""
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.settimeout(0.05)
        for frame in frames:
            try:
                s.sendall(frame)
                reply = read_message(s)
            except (TimeoutError, OSError, protocol.ProtocolError):
                outcomes["no reply"] += 1
                return
            yield reply


@pytest.mark.skipif(not kv.remote.nixl_available(), reason="needs the nixl extra")
def test_live_control_server_survives_random_frames():
    kv.initialize(cluster_id=5, options={"llm.ListenIpInfo": "127.0.0.1:0"})
    host, port = kv.listen_address().split(":")
    tensors = [torch.arange(64.0).reshape(8, 8)]
    cache = kv.register_kv_cache(tensors, kv.RegisterCfg(remote_accessible=True))
    outcomes = collections.Counter()  # what the server answered
    near_valid = st.fixed_dictionaries(
        {
            "op": st.sampled_from(["acquire", "acquire", "hello", "release", "bye", "bogus", "checksums"]),
            "cache_id": st.sampled_from([cache.cache_id, cache.cache_id + 1, 10**6, 0, -1, 2**63, "1"]),
            "lease": st.integers(-1, 3),
            "blocks": st.lists(st.integers(-1, 9), max_size=3),  # (checksums: the cache has 8)
            "tensors_per_layer": st.integers(0, 2),
            "size": st.integers(-2, 40),
            "landed": st.booleans(),
            "cluster_id": st.integers(-1, 3),
            "agent": st.text(max_size=3),
        }
    ).map(protocol.encode)

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(
        frames=st.lists(
            st.one_of(
                st.binary(max_size=64),
                messages.map(lambda m: protocol.encode({k: v for k, v in m.items() if k != "v"})),
                near_valid,
                near_valid,
                st.builds(lambda n, b: struct.pack(">I", n) + b, st.integers(0, 2**32 - 1), st.binary(max_size=16)),
            ),
            min_size=1,
            max_size=3,
        )
    )
    def fire(frames):
        for reply in replies_to(host, port, frames, outcomes):
            outcomes["ok" if reply.get("ok") is True else reply.get("status")] += 1

    fire()
    # Random frames reached the server's every answer, not only its frame and JSON checks.
    # (Floors well under what runs reach: hypothesis' mix shifts with the tests run before.)
    for outcome in ("ok", "LLM_PARAM_INVALID", "LLM_KV_CACHE_NOT_EXIST", "no reply"):
        assert outcomes[outcome] >= 3, dict(outcomes)
    assert kv.remote.current_engine().holds.leases == {}  # every lease taken went with its connection
    assert kv.registered_caches() == [cache]
    assert torch.equal(tensors[0], torch.arange(64.0).reshape(8, 8))
    # still answers a well-formed hello
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(protocol.encode({"op": "hello", "cluster_id": 9, "agent": "fuzz"}))
        reply = read_message(s)
        assert protocol.HelloReply.parse(reply).cluster_id == 5
    kv.finalize()


@pytest.mark.skipif(not kv.remote.nixl_available(), reason="needs the nixl extra")
def test_a_secret_server_gives_strangers_nothing_whatever_they_send():
    """Random handshakes (challenges and hellos with random nonces, proofs and cluster ids,
    in any order, truncated or garbled) against a server with a link secret: no reply ever
    carries agent metadata, a cache entry or a lease, and the server still links a peer that
    knows the secret afterwards."""
    kv.initialize(cluster_id=5, options={"llm.ListenIpInfo": "127.0.0.1:0", "llm.LinkSecret": "fuzz-secret-0123"})
    host, port = kv.listen_address().split(":")
    cache = kv.register_kv_cache([torch.arange(64.0).reshape(8, 8)], kv.RegisterCfg(remote_accessible=True))
    outcomes = collections.Counter()
    raw32 = st.binary(min_size=32, max_size=32).map(protocol.b64)
    handshake = st.one_of(
        st.fixed_dictionaries(
            {
                "op": st.just("challenge"),
                "cluster_id": st.integers(-1, 9),
                "nonce": st.one_of(raw32, st.binary(max_size=40).map(protocol.b64), st.text(max_size=4)),
            }
        ),
        st.fixed_dictionaries(
            {
                "op": st.just("hello"),
                "cluster_id": st.integers(-1, 9),
                "agent": st.text(max_size=4),
                "proof": st.one_of(raw32, st.binary(max_size=40).map(protocol.b64)),
            }
        ),
        st.fixed_dictionaries(
            {
                "op": st.sampled_from(["acquire", "release", "ping", "bye", "same_host"]),
                "cache_id": st.just(cache.cache_id),
                "lease": st.integers(0, 3),
                "nonce": raw32,
            }
        ),
    ).map(lambda m: protocol.encode({**m, "id": 1}))

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(frames=st.lists(st.one_of(handshake, handshake, st.binary(max_size=24)), min_size=1, max_size=3))
    def fire(frames):
        for reply in replies_to(host, port, frames, outcomes):
            assert not {"md", "cache", "lease", "pid", "address"} & set(reply), reply
            outcomes["answered challenge" if "nonce" in reply else reply.get("status", "ok")] += 1

    try:
        fire()
        # The fuzzing reached the handshake's every answer: challenges answered, hellos and
        # other requests refused with LLM_LINK_FAILED, garbage refused or unanswered.
        for outcome in ("answered challenge", "LLM_LINK_FAILED", "LLM_PARAM_INVALID", "no reply"):
            assert outcomes[outcome] >= 3, dict(outcomes)
        assert kv.remote.current_engine().holds.leases == {} and kv.registered_caches() == [cache]
    finally:
        kv.finalize()
