"""Link authentication: both sides of a link prove that they know the cluster's link secret,
without sending it.

The linker sends a fresh nonce; the accepting side answers with its own fresh nonce and
HMAC-SHA256(secret, "accept" | both nonces | both cluster ids); the linker checks that, then
sends HMAC-SHA256(secret, "connect" | the same). Each side's nonce is new for every
handshake, so a recorded handshake does not verify again, and the role in the message keeps
one side's proof from being reflected as the other's. Proofs are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Mapping
from typing import NoReturn

from ..errors import LLMException, LLMStatusCode, make_error, param_invalid
from ..registry import OPTION_LINK_SECRET
from ..types import ClusterInfo
from . import protocol
from .control import Link

log = logging.getLogger("torch_kvreg.remote")

_CONTEXT = b"torch_kvreg link v1"


class LinkSecret:
    """A cluster's link secret; it never shows itself (repr, str, logs, errors).

    >>> secret = LinkSecret("correct horse battery staple")
    >>> secret
    LinkSecret(<hidden>)
    >>> a, b = new_nonce(), new_nonce()
    >>> secret.check(secret.proof(b"accept", a, b, 1, 2), b"accept", a, b, 1, 2)
    True
    >>> secret.check(secret.proof(b"accept", a, b, 1, 2), b"connect", a, b, 1, 2)
    False
    """

    __slots__ = ("_key",)

    def __init__(self, secret: str | bytes):
        key = secret.encode() if isinstance(secret, str) else bytes(secret)
        if not key:
            raise param_invalid(f"{OPTION_LINK_SECRET} must not be empty")
        self._key = key

    def __repr__(self) -> str:
        return "LinkSecret(<hidden>)"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("a LinkSecret is not pickled")

    def proof(
        self, role: bytes, linker_nonce: bytes, acceptor_nonce: bytes, linker_cluster: int, acceptor_cluster: int
    ) -> bytes:
        message = b"|".join(
            (_CONTEXT, role, linker_nonce, acceptor_nonce, str(linker_cluster).encode(), str(acceptor_cluster).encode())
        )
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def check(
        self,
        proof: bytes,
        role: bytes,
        linker_nonce: bytes,
        acceptor_nonce: bytes,
        linker_cluster: int,
        acceptor_cluster: int,
    ) -> bool:
        expected = self.proof(role, linker_nonce, acceptor_nonce, linker_cluster, acceptor_cluster)
        return hmac.compare_digest(expected, proof)

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> LinkSecret | None:
        """The secret in ``options`` (initialize already folded the environment in), if any."""
        value = options.get(OPTION_LINK_SECRET)
        return None if value is None else cls(value)


def new_nonce() -> bytes:
    return secrets.token_bytes(protocol.NONCE_BYTES)


# --- the accepting side -------------------------------------------------------------------
def answer_challenge(
    secret: LinkSecret | None, cluster_id: int, request: protocol.Challenge, link: Link
) -> protocol.ChallengeReply:
    """A linker's nonce: our nonce and our proof of the secret (none without a secret: the
    linker, which has one, must not link to a cluster that cannot prove it)."""
    if secret is None:
        raise make_error(LLMStatusCode.LLM_LINK_FAILED, "this cluster has no link secret")
    if link.challenge is not None:
        raise make_error(LLMStatusCode.LLM_LINK_FAILED, "one challenge per connection")
    ours = new_nonce()
    link.challenge = (request.cluster_id, request.nonce, ours)
    proof = secret.proof(b"accept", request.nonce, ours, request.cluster_id, cluster_id)
    return protocol.ChallengeReply(ours, proof)


def check_hello(secret: LinkSecret | None, cluster_id: int, hello: protocol.Hello, link: Link) -> None:
    """The linker's proof, sent with its hello, against the challenge it answered."""
    if secret is None:
        return
    challenge, link.challenge = link.challenge, None  # one try per challenge
    if challenge is None or hello.proof is None or challenge[0] != hello.cluster_id:
        raise make_error(LLMStatusCode.LLM_LINK_FAILED, "this cluster requires a link secret")
    linker, theirs, ours = challenge
    if not secret.check(hello.proof, b"connect", theirs, ours, linker, cluster_id):
        log.warning("a peer claiming cluster %d failed the link secret check", linker)
        raise make_error(LLMStatusCode.LLM_LINK_FAILED, "the link secret check failed")
    link.authenticated = True


# --- the linking side ---------------------------------------------------------------------
def prove(secret: LinkSecret, cluster_id: int, link: Link, info: ClusterInfo, timeout_s: float) -> bytes:
    """Checks the peer's proof of the secret, then returns ours (sent with the hello). The
    peer learns nothing about the secret."""
    ours = new_nonce()
    peer = info.remote_cluster_id
    try:
        reply = protocol.ChallengeReply.parse(link.request(protocol.Challenge(cluster_id, ours), timeout_s))
    except LLMException as exc:
        if exc.status_code == LLMStatusCode.LLM_TIMEOUT:
            raise
        raise make_error(
            LLMStatusCode.LLM_LINK_FAILED, f"cluster {peer} did not take part in the link secret check"
        ) from None
    except protocol.ProtocolError:
        raise make_error(LLMStatusCode.LLM_LINK_FAILED, "malformed challenge response") from None
    if not secret.check(reply.proof, b"accept", ours, reply.nonce, cluster_id, peer):
        log.warning("cluster %d at %s:%d failed the link secret check", peer, info.remote_ip, info.remote_port)
        raise make_error(LLMStatusCode.LLM_LINK_FAILED, f"cluster {peer} failed the link secret check")
    link.authenticated = True
    return secret.proof(b"connect", ours, reply.nonce, cluster_id, peer)
