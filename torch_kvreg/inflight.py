"""Transfer: the handle of an asynchronous transfer, local or remote, and the table of
transfers that compiled code refers to by id."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence

from . import counters, display
from .errors import LLMException, LLMStatusCode, make_error, param_invalid, wrong_type
from .types import format_bytes

log = logging.getLogger("torch_kvreg")


# Guards the hand-over between a completing thread and a waiter that makes an Event.
_events_lock = threading.Lock()


class Transfer:
    """A transfer in flight: ``done()``, ``wait(timeout_ms=None)``, ``status`` (None until
    done), ``nbytes``, ``elapsed_s``, and ``failed_blocks``: the destination blocks not
    known to be written (after a failure all of them, or only those a verified transfer found
    differing from their source; none after success), for recomputation.

    >>> t = Transfer(nbytes=4096, dst_blocks=[3, 5])
    >>> t.done(), t.status
    (False, None)
    >>> t.succeed(); t.wait(), t.status, t.failed_blocks
    (4096, <LLMStatusCode.LLM_SUCCESS: 0>, [])
    """

    _ids = itertools.count(1)
    # (Slots: a serving engine makes thousands a second, and they are set on its hot path.)
    __slots__ = (
        "transfer_id",
        "path",
        "nbytes",
        "description",
        "_dst_blocks",
        "_started",
        "_finished",
        "_done",
        "_event",
        "_error",
        "status",
        "assist",
        "__weakref__",
    )

    def __init__(
        self, nbytes: int = 0, dst_blocks: Sequence[int] = (), description: str = "transfer", path: str | None = None
    ):
        self.transfer_id = next(Transfer._ids)
        self.path = path  # "local_copy", "pull" or "push": counted in torch_kvreg.stats()
        self.nbytes = int(nbytes)
        self.description = description
        self._dst_blocks = list(dst_blocks)  # (ints: every caller has checked them)
        self._started = time.monotonic()
        self._finished: float | None = None
        # Done is a flag; an Event is made only for a thread that must block on it (most
        # waiters of same-host copies complete their transfer themselves).
        self._done = False
        self._event: threading.Event | None = None
        self._error: LLMException | None = None
        self.status: LLMStatusCode | None = None
        # Work a waiter can do itself before it blocks, given its timeout in ms (-1: none):
        # a same-host copy's pieces no thread has taken yet.
        self.assist: Callable[[int], object] | None = None

    def done(self) -> bool:
        if not self._done and self.assist is not None:
            self.assist(0)  # a same-host copy that has ended is completed here, at once
        return self._done

    @property
    def elapsed_s(self) -> float:
        end = self._finished if self._finished is not None else time.monotonic()
        return end - self._started

    @property
    def failed_blocks(self) -> list[int]:
        if not self.done() or self.status != LLMStatusCode.LLM_SUCCESS:
            named = None if self._error is None else self._error.failed_blocks
            return list(self._dst_blocks if named is None else named)
        return []

    def wait(self, timeout_ms: int | None = None) -> int:
        """Blocks (without holding the GIL) until done; returns the bytes moved. Raises the
        failure's LLMException, or LLM_TIMEOUT when not done in time (it goes on)."""
        if timeout_ms is not None:
            if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int):
                raise wrong_type(f"timeout_ms must be an int or None, got {type(timeout_ms).__name__}")
            if timeout_ms < 0:
                raise param_invalid(f"timeout_ms must be >= 0, got {timeout_ms}")
        until = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        if self.assist is not None and not self._done:
            self.assist(-1 if timeout_ms is None else timeout_ms)
        if not self._done:
            with _events_lock:
                if not self._done and self._event is None:
                    self._event = threading.Event()
                event = self._event
            # What the assist left of the timeout (it may have used it all).
            left = None if until is None else max(0.0, until - time.monotonic())
            if event is not None and not event.wait(left):
                raise make_error(LLMStatusCode.LLM_TIMEOUT, f"{self.description} not done within {timeout_ms} ms")
        if self._error is not None:
            # A fresh exception each time (the stored one keeps its own traceback).
            error = make_error(self._error.status_code, self._error.detail, type(self._error))
            error.failed_blocks = self._error.failed_blocks
            raise error
        return self.nbytes

    # --- completion, by whoever runs the transfer ----------------------------------------
    def succeed(self, nbytes: int | None = None) -> None:
        if nbytes is not None:
            self.nbytes = int(nbytes)
        self._complete(LLMStatusCode.LLM_SUCCESS, None)

    def fail(self, error: LLMException) -> None:
        self._complete(error.status_code, error)

    def _complete(self, status: LLMStatusCode, error: LLMException | None) -> None:
        if self._done:
            return
        self._finished = time.monotonic()
        self._error = error
        self.status = status
        if self.path is not None:
            counters.record(self.path, self.nbytes, self._finished - self._started, status)
        if error is not None:
            log.warning("%s failed: %s", self.description, error)
        elif log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s: %s in %.3f ms", self.description, format_bytes(self.nbytes), (self._finished - self._started) * 1e3
            )
        with _events_lock:
            self._done = True
            event = self._event
        if event is not None:
            event.set()

    def _repr_html_(self) -> str:
        return display.card(
            f"Transfer {self.transfer_id}",
            lambda: [
                ("what", self.description),
                ("state", "in flight" if self.status is None else self.status.name),
                ("bytes", format_bytes(self.nbytes)),
                ("elapsed", f"{self.elapsed_s * 1e3:.2f} ms"),
                (
                    "failed blocks",
                    self.failed_blocks if self.done() and self.status != LLMStatusCode.LLM_SUCCESS else [],
                ),
            ],
        )

    def __repr__(self) -> str:
        state = "in flight" if self.status is None else self.status.name
        return f"Transfer(id={self.transfer_id}, {self.description}, {format_bytes(self.nbytes)}, {state})"


# --- transfers that compiled code names by id ------------------------------------------------
_table: dict[int, Transfer] = {}
_table_lock = threading.Lock()


def remember(transfer: Transfer) -> int:
    with _table_lock:
        _table[transfer.transfer_id] = transfer
    return transfer.transfer_id


def take(transfer_id: int) -> Transfer:
    """The transfer with this id, forgotten here (each id is waited for exactly once)."""
    with _table_lock:
        transfer = _table.pop(int(transfer_id), None)
    if transfer is None:
        raise make_error(
            LLMStatusCode.LLM_PARAM_INVALID,
            f"transfer id {transfer_id} is unknown or was already waited for",
            ValueError,
        )
    return transfer


def completed(nbytes: int = 0, description: str = "transfer") -> Transfer:
    transfer = Transfer(nbytes, (), description)
    transfer.succeed()
    return transfer
