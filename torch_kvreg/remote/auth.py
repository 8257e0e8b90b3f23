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
import secrets
from collections.abc import Mapping
from typing import NoReturn

from ..errors import param_invalid
from ..registry import OPTION_LINK_SECRET

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
    from .protocol import NONCE_BYTES

    return secrets.token_bytes(NONCE_BYTES)
