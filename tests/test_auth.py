"""Authenticated links: with llm.LinkSecret (or TORCH_KVREG_LINK_SECRET) set, both sides
prove knowledge of the secret by challenge-response before anything else is served; a peer
without it, with another one, or replaying a recorded handshake gets LLM_LINK_FAILED and no
cache table or NIXL metadata; the secret never crosses the wire or shows in a repr, log or
error. Also: the control server binds only to the address asked for, and the registry's
lifecycle hooks keep the dependency one way (remote -> registry)."""

import logging
import os
import socket
import subprocess
import sys

import pytest
import torch

import torch_kvreg as kv
from torch_kvreg import LLMStatusCode
from torch_kvreg.remote import protocol
from torch_kvreg.remote.control import read_message

from remote_peer import Peer

pytestmark = pytest.mark.skipif(not kv.remote.nixl_available(), reason="needs the nixl extra")
SECRET = "kvreg-test-secret-7f3a9c0e51"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def guarded():
    """A prompt peer (cluster 21) that requires SECRET, with one remote-accessible cache."""
    peer = Peer(cluster_id=21, wait_ms=1000, options={"llm.LinkSecret": SECRET})
    peer.cache_id = peer.call("register", (2, 8, (4, 8), 7, True))
    yield peer
    peer.close()


def start(secret=None, cluster_id=3):
    options = {"llm.SyncKvCacheWaitTime": "1000"}
    if secret is not None:
        options["llm.LinkSecret"] = secret
    kv.initialize(cluster_id=cluster_id, options=options)


class Recorder:
    """A raw control connection that records every frame it sends and receives."""

    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port), timeout=5)
        self.sent, self.received = [], []

    def request(self, message):
        frame = protocol.encode(message)
        self.sent.append(frame)
        self.sock.sendall(frame)
        try:
            reply = read_message(self.sock)
        except (OSError, ConnectionError, protocol.ProtocolError):
            reply = None
        self.received.append(reply)
        return reply

    def replay(self, frames):
        replies = []
        for frame in frames:
            try:
                self.sock.sendall(frame)
                replies.append(read_message(self.sock))
            except (OSError, ConnectionError, protocol.ProtocolError):
                replies.append(None)
        return replies

    def closed_by_peer(self):
        self.sock.settimeout(2)
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def close(self):
        self.sock.close()


def test_the_right_secret_links_and_transfers(guarded):
    start(SECRET)
    try:
        assert kv.link_clusters([guarded.info])[0] == LLMStatusCode.LLM_SUCCESS
        tensors = [torch.zeros(8, 4, 8, dtype=torch.float16) for _ in range(2)]
        mine = kv.register_kv_cache(tensors)
        assert kv.pull_kv_blocks(kv.CacheIndex(21, guarded.cache_id), mine, [1, 2], [5, 6]) > 0
        theirs = guarded.call("read", guarded.cache_id)
        assert all(torch.equal(m[5:7], t[1:3]) for m, t in zip(tensors, theirs))
        assert kv.unlink_clusters([guarded.info])[0] == LLMStatusCode.LLM_SUCCESS
    finally:
        kv.finalize()


@pytest.mark.parametrize("secret", [None, "another-secret-of-some-length"])
def test_a_peer_without_the_secret_gets_link_failed_and_nothing(guarded, secret, caplog):
    start(secret)
    try:
        with caplog.at_level(logging.DEBUG, logger="torch_kvreg"):
            assert kv.link_clusters([guarded.info], timeout_ms=2000)[0] == LLMStatusCode.LLM_LINK_FAILED
        mine = kv.register_kv_cache([torch.zeros(8, 4, 8, dtype=torch.float16) for _ in range(2)])
        with pytest.raises(kv.LLMException) as info:
            kv.pull_kv_blocks(kv.CacheIndex(21, guarded.cache_id), mine, [0], [0])
        assert info.value.status_code == LLMStatusCode.LLM_NOT_YET_LINK
    finally:
        kv.finalize()
    assert SECRET not in caplog.text and (secret is None or secret not in caplog.text)
    assert guarded.call("leases") == {}


def test_a_secret_linker_refuses_a_cluster_that_cannot_prove_it():
    open_peer = Peer(cluster_id=22, wait_ms=1000)  # no secret
    try:
        start(SECRET)
        assert kv.link_clusters([open_peer.info], timeout_ms=2000)[0] == LLMStatusCode.LLM_LINK_FAILED
    finally:
        kv.finalize()
        open_peer.close()


def test_raw_requests_before_the_handshake_get_nothing(guarded):
    for request in (
        {"op": "acquire", "cache_id": guarded.cache_id, "id": 1},
        {"op": "hello", "cluster_id": 4, "agent": "x", "id": 1},
        {"op": "hello", "cluster_id": 4, "agent": "x", "proof": protocol.b64(bytes(32)), "id": 1},
        {"op": "ping", "id": 1},
        {"op": "release", "lease": 1, "id": 1},
        {"op": "same_host", "nonce": protocol.b64(bytes(32)), "id": 1},
    ):
        raw = Recorder(guarded.host, guarded.port)
        reply = raw.request(request)
        assert reply["ok"] is False and reply["status"] == "LLM_LINK_FAILED", reply
        assert not {"md", "cache", "lease", "pid", "address"} & set(reply), reply
        assert raw.closed_by_peer()  # and the connection is dropped
        raw.close()
    assert guarded.call("leases") == {}


def test_a_recorded_handshake_does_not_replay(guarded):
    """Records a good handshake made by hand with the secret, then replays its frames on a
    new connection: the fresh challenge makes the old proof worthless."""
    from torch_kvreg.remote.auth import LinkSecret, new_nonce

    secret = LinkSecret(SECRET)
    good = Recorder(guarded.host, guarded.port)
    nonce = new_nonce()
    answer = good.request({"op": "challenge", "cluster_id": 4, "nonce": protocol.b64(nonce), "id": 1})
    challenged = protocol.ChallengeReply.parse(answer)
    theirs, proof = challenged.nonce, challenged.proof
    assert secret.check(proof, b"accept", nonce, theirs, 4, 21)  # the acceptor proved it
    mine = secret.proof(b"connect", nonce, theirs, 4, 21)
    hello = good.request({"op": "hello", "cluster_id": 4, "agent": "recorder", "proof": protocol.b64(mine), "id": 2})
    assert hello["ok"] is True and "md" in hello  # accepted: the recording is of a good handshake
    assert SECRET.encode() not in b"".join(good.sent) and all(SECRET not in repr(r) for r in good.received)
    good.close()

    replayed = Recorder(guarded.host, guarded.port)
    replies = replayed.replay(good.sent)
    assert replies[0]["ok"] is True and replies[0]["nonce"] != answer["nonce"]  # a fresh challenge
    assert replies[1]["ok"] is False and replies[1]["status"] == "LLM_LINK_FAILED"
    assert "md" not in replies[1] and "cache" not in replies[1]
    assert replayed.closed_by_peer()
    replayed.close()
    # A reflected proof (the acceptor's own, sent back as ours) fails as well.
    reflect = Recorder(guarded.host, guarded.port)
    answer = reflect.request({"op": "challenge", "cluster_id": 4, "nonce": protocol.b64(nonce), "id": 1})
    reply = reflect.request({"op": "hello", "cluster_id": 4, "agent": "r", "proof": answer["proof"], "id": 2})
    assert reply["status"] == "LLM_LINK_FAILED"
    reflect.close()


def test_truncated_and_malformed_handshakes_are_refused(guarded):
    cases = [
        {"op": "challenge", "cluster_id": 4, "nonce": protocol.b64(b"short"), "id": 1},
        {"op": "challenge", "cluster_id": 4, "nonce": "not base64!", "id": 1},
        {"op": "challenge", "cluster_id": -1, "nonce": protocol.b64(bytes(32)), "id": 1},
        {"op": "challenge", "cluster_id": 4, "id": 1},
    ]
    for message in cases:
        raw = Recorder(guarded.host, guarded.port)
        reply = raw.request(message)
        assert reply["ok"] is False and "nonce" not in reply, (message, reply)
        assert raw.closed_by_peer()
        raw.close()
    # Half a frame, then silence: the server is unharmed and serves the next linker.
    raw = socket.create_connection((guarded.host, guarded.port), timeout=5)
    raw.sendall(protocol.encode({"op": "challenge", "cluster_id": 4, "nonce": protocol.b64(bytes(32))})[:9])
    start(SECRET)
    try:
        assert kv.link_clusters([guarded.info])[0] == LLMStatusCode.LLM_SUCCESS
    finally:
        kv.finalize()
        raw.close()


def test_the_secret_never_shows(monkeypatch, caplog):
    from torch_kvreg.remote.auth import LinkSecret

    assert SECRET not in repr(LinkSecret(SECRET)) and SECRET not in str(LinkSecret(SECRET))
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(LinkSecret(SECRET))
    monkeypatch.setenv("TORCH_KVREG_LINK_SECRET", SECRET)
    with caplog.at_level(logging.DEBUG, logger="torch_kvreg"):
        kv.initialize(cluster_id=3, options={"llm.ListenIpInfo": "127.0.0.1:0"})
        try:
            engine = kv.remote.get_engine()
            assert isinstance(engine.secret, LinkSecret)  # read from the environment
            assert kv.registry.option("llm.LinkSecret").startswith("digest:")
            shown = repr(engine.secret) + repr(vars(kv.remote)) + repr(kv.registry._C.config())
            with pytest.raises(kv.LLMException) as info:  # other options than the first call
                kv.initialize(cluster_id=3, options={"llm.ListenIpInfo": "127.0.0.1:0", "llm.LinkSecret": "x" + SECRET})
            shown += str(info.value)
        finally:
            kv.finalize()
    assert SECRET not in shown and SECRET not in caplog.text
    with pytest.raises(kv.LLMParamInvalidError) as info:
        kv.initialize(options={"llm.LinkSecret": ""})
    assert not kv.is_initialized()
    with pytest.raises(kv.LLMParamInvalidError) as info:
        kv.initialize(options={"llm.LinkSecret": "y" * 5000})
    assert "y" * 16 not in str(info.value) and not kv.is_initialized()


def test_the_control_server_binds_only_the_address_asked_for():
    kv.initialize(cluster_id=3, options={"llm.ListenIpInfo": "127.0.0.1:0"})
    try:
        host, port = kv.listen_address().split(":")
        assert host == "127.0.0.1"
        with pytest.raises(OSError):  # 127.0.0.2 is loopback too, but not what was asked for
            socket.create_connection(("127.0.0.2", int(port)), timeout=2).close()
        socket.create_connection(("127.0.0.1", int(port)), timeout=2).close()
    finally:
        kv.finalize()


def test_the_registry_does_not_import_the_remote_layer():
    # torch_kvreg/__init__ imports remote; load registry without the package's __init__,
    # with the remote layer made unimportable: anything registry loads that imports it fails.
    probe = f"""
import importlib.util, sys, types
package = types.ModuleType("torch_kvreg"); package.__path__ = [{os.path.join(ROOT, "torch_kvreg")!r}]
sys.modules["torch_kvreg"] = package
sys.modules["torch_kvreg.remote"] = None  # importing it now raises
import torch_kvreg.registry, torch_kvreg.lifecycle
torch_kvreg.registry.initialize()
torch_kvreg.registry.finalize()
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]
    # And the remote layer is a subscriber like any other.
    from torch_kvreg import lifecycle

    assert any(type(s).__module__ == "torch_kvreg.remote.api" for s in lifecycle.subscribers())
