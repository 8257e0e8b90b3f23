"""Waiting for completion notices: ``wait_notices`` blocks, without the GIL, until a peer's
notice lands.

Peers send a transfer's notice on the control link once its bytes have landed (jobs.py);
the link's reader thread queues it in the native box (csrc/notices.cpp), whose condition
variable wakes every waiter. Nothing polls: a waiting decoder takes no CPU from the prefill
and copies beside it, and learns of a layer within the link's latency rather than a poll's
period.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from .. import _C, lifecycle
from ..errors import param_invalid, wrong_type
from ..registry import require_initialized
from ..types import Cache
from . import api

# The longest wait one call takes (about 24.8 days): longer timeouts are refused rather
# than overflowing the native clock.
MAX_WAIT_MS = 2**31 - 1
WOKEN = -1  # what _C.notices_wait returns when notices_wake() or finalize ended it


def wait_notices(timeout_ms: int | None = None) -> list[api.Notification]:
    """Waits until a peer's completion notice has arrived, then drains and returns every
    notice received (as ``get_notifications()`` does, oldest first); ``[]`` once
    ``timeout_ms`` (0 to 2**31 - 1; None: no limit) passes with none, or when torch_kvreg
    is finalized meanwhile. The GIL is released while it waits: other threads run, and it
    wakes as soon as a notice lands, whether the transfer went through NIXL or a same-host
    copy. (A notice that a NIXL agent other than torch_kvreg's sends through NIXL itself is
    returned too, but only once something else wakes the wait or it times out.) A bad
    ``timeout_ms`` is LLM_PARAM_INVALID; before ``initialize()``, LLM_FAILED.

    >>> import torch_kvreg as kv
    >>> kv.initialize()
    >>> kv.wait_notices(timeout_ms=5)
    []
    >>> kv.finalize()
    """
    if timeout_ms is not None:
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int):
            raise wrong_type(f"timeout_ms must be an int or None, got {type(timeout_ms).__name__}")
        if not 0 <= timeout_ms <= MAX_WAIT_MS:
            raise param_invalid(f"timeout_ms must be 0 to {MAX_WAIT_MS}, got {timeout_ms}")
    require_initialized()
    until = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
    while True:
        received = api.get_notifications()
        if received:
            return received
        if until is None:
            left_ms = -1
        else:
            left = until - time.monotonic()
            if left <= 0:
                return []
            left_ms = max(1, int(left * 1000 + 0.999))  # (rounded up: never wakes early to nothing)
        if _C.notices_wait(left_ms) == WOKEN:
            return api.get_notifications()  # finalize (or notices_wake) ended the wait


class _NoticesLifecycle:
    """finalize empties the box (notices from before never reach the next initialize) and
    ends every wait_notices() in progress. Subscribed after the engine's own subscriber,
    so it runs once the links that fill the box are closed."""

    def initialized(self, options: Mapping[str, str]) -> None:
        pass

    def registered(self, cache: Cache) -> None:
        pass

    def unregistering(self, cache_id: int) -> None:
        pass

    def finalizing(self) -> None:
        _C.notices_clear()


lifecycle.subscribe(_NoticesLifecycle())
