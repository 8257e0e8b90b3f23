"""Transfers in flight, as jobs.

Every transfer in flight is one Job: a NixlJob (a NIXL request, posted by its starter or by
the progress thread) or a SameHostJob (a native copy between two processes of one host).
A job is looked at with ``look()``, stopped with ``cancel()``, and completed once, by
``complete()``, by whichever thread claims it first (progress.py): the state it ended in,
the notice that follows its bytes, what it held let go, and its Transfer succeeded or
failed with the blocks it did not land. A job whose native side still owns memory (NIXL
has not let go of the handle, a cancelled copy's threads have not stopped) keeps what it
held until ``free()`` succeeds; the progress thread retries that.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import _C
from ..errors import LLMException, LLMStatusCode, make_error
from ..inflight import Transfer

if TYPE_CHECKING:
    from .agent import NixlAgent, NixlHandle, Request
    from .control import Link

log = logging.getLogger("torch_kvreg.remote")
# A job's states, as NIXL names them: "PROC" (under way), "DONE", "ERR".
PROC, DONE, ERR = "PROC", "DONE", "ERR"
# A native same-host copy's states (peer_copy.h); failures are -errno.
COPY_RUNNING, COPY_DONE = 0, 1


def _nothing() -> None:
    pass


def _no_help(job: SameHostJob, timeout_ms: int) -> None:
    pass


class Job:
    """One transfer in flight and what it holds until it lands (see the module's text)."""

    __slots__ = ("transfer", "link", "deadline", "notify", "let_go", "claim_lock", "failure", "freeing")

    def __init__(
        self, transfer: Transfer, link: Link, deadline: float, notify: bytes, let_go: Callable[[], None]
    ) -> None:
        self.transfer, self.link, self.deadline, self.notify = transfer, link, deadline, notify
        self.let_go = let_go  # gives back what it held (its local cache, the peer's lease); once
        self.claim_lock = threading.Lock()  # taken, never given back, by the thread completing it
        self.failure = ""  # why it failed, where the native side does not say
        self.freeing = False  # completed, but its native side still owns memory

    @property
    def claimed(self) -> bool:
        """Whether a thread has taken it to complete (Progress.claim)."""
        return self.claim_lock.locked()

    def look(self) -> str:
        """Its state now (one look; a NIXL look also drives the transfer)."""
        raise NotImplementedError

    def cancel(self) -> None:
        """Stops it (past its deadline, or its peer gone); it then completes as failed."""

    def free(self) -> bool:
        """Lets go of its native side; False while that still owns memory (retry later)."""
        return True

    def members(self) -> list[Job]:
        """The jobs that complete with this one (itself, and those posted with it)."""
        return [self]


class NixlJob(Job):
    """A transfer NIXL moves. Posted with others in one NIXL request, it leads them: they
    ride along and complete with it."""

    __slots__ = ("agent", "request", "handle", "riders", "posted", "posted_state")

    def __init__(
        self,
        agent: NixlAgent,
        transfer: Transfer,
        link: Link,
        deadline: float,
        notify: bytes,
        let_go: Callable[[], None],
        request: Request,
    ) -> None:
        super().__init__(transfer, link, deadline, notify, let_go)
        self.agent, self.request = agent, request
        self.handle: NixlHandle = None
        self.riders: list[NixlJob] = []
        self.posted = False  # a background job waits for the progress thread to post it
        self.posted_state: str | None = None  # what its post returned, until looked at

    def post(self) -> str:
        """Hands the request to NIXL; its state."""
        self.posted = True
        try:
            # Its notice goes over the link once NIXL reports it done (complete()): NIXL
            # flushes the endpoint before it says so, so the bytes have landed by then, and
            # a notice on the link wakes the peer's wait_notices() where NIXL's cannot.
            return self.agent.transfer(self.handle)
        except Exception as exc:
            log.warning("NIXL refused to post a transfer: %s", exc)
            return ERR

    def look(self) -> str:
        if self.posted_state is not None:
            state, self.posted_state = self.posted_state, None
            return state
        try:
            return self.agent.check_xfer_state(self.handle)
        except Exception:
            return ERR

    def free(self) -> bool:
        if self.handle is not None:
            try:
                self.agent.release_xfer_handle(self.handle)
            except Exception:
                return False
            self.handle = None
        return True

    def members(self) -> list[Job]:
        return [self, *self.riders]


class SameHostJob(Job):
    """A native copy between this process and a peer on this host (_C.PeerCopyJob). Its
    bytes move on native threads; the thread waiting for it helps (``help``)."""

    __slots__ = ("native", "code", "helper")

    def __init__(
        self,
        transfer: Transfer,
        link: Link,
        deadline: float,
        notify: bytes,
        let_go: Callable[[], None],
        native: _C.PeerCopyJob,
    ) -> None:
        # (Job.__init__'s fields, set here: a routed pull makes one of these per block list)
        self.transfer, self.link, self.deadline, self.notify, self.let_go = transfer, link, deadline, notify, let_go
        self.claim_lock, self.failure, self.freeing = threading.Lock(), "", False
        self.native: _C.PeerCopyJob | None = native  # None once freed
        self.code = COPY_RUNNING
        # What a waiter's help runs (Progress.assist; Progress.add_copy sets it).
        self.helper: Callable[[SameHostJob, int], None] = _no_help

    def assist(self, timeout_ms: int) -> None:
        """Its Transfer's ``assist``: the waiting thread's help (see ``helper``)."""
        self.helper(self, timeout_ms)

    def _state_of(self, code: int) -> str:
        self.code = code
        if code == COPY_RUNNING:
            return PROC
        if code == COPY_DONE:
            return DONE
        self.failure = f"same-host copy ({os.strerror(-code)})"
        return ERR

    def look(self) -> str:
        native = self.native
        return self._state_of(self.code if native is None else native.state())

    def help(self, timeout_ms: int) -> str:
        """Moves queued bytes on this thread, then waits for the rest, up to ``timeout_ms``."""
        native = self.native
        code = self.code if native is None else native.help(timeout_ms)
        if code == COPY_DONE:  # (the usual answer, without a second call)
            self.code = code
            return DONE
        return self._state_of(code)

    def cancel(self) -> None:
        native = self.native
        if native is not None:
            native.cancel()  # its threads stop at their next call

    def stop(self, timeout_ms: int) -> None:
        """Cancels it and waits (bounded) for its threads to stop."""
        native = self.native
        if native is not None:
            native.cancel()
            native.wait(timeout_ms)

    def free(self) -> bool:
        native = self.native
        if native is None:
            return True
        if self.code == COPY_RUNNING and native.state() == COPY_RUNNING:
            return False  # cancelled, or timed out: its threads stop at their next call
        self.native = None
        return True


class Completion:
    """How jobs end, the same for every kind (see the module's text)."""

    def __init__(self, agent: NixlAgent, wait_s: float) -> None:
        self.agent, self.wait_s = agent, wait_s
        self.lock = threading.Lock()

    def complete(self, job: Job, state: str) -> bool:
        """Completes a claimed job that ended in ``state`` (PROC: past its deadline, or its
        peer gone; it is stopped). Its notice goes out once every byte has landed; what it
        held is let go before anyone waiting for it wakes, so that what they do next
        (unregister, ask the peer) finds nothing held. True once everything is let go."""
        if state == PROC:
            job.cancel()
            if not job.link.alive:
                state = ERR
        if state == DONE and job.notify:
            # On the control link, which the peer's reader thread blocks on: its waiters
            # wake when the notice lands (wait_notices), with no polling on either side.
            try:
                job.link.notice(job.notify)
            except Exception as exc:
                state, job.failure = ERR, f"the notice after the transfer ({exc})"
        members = job.members()
        freed = self._free(job, members)
        error = None if state == DONE else self.error(job, state)
        for member in members:
            member.transfer.assist = None
            if error is None:
                member.transfer.succeed()
            else:
                member.transfer.fail(error)
        return freed

    def free(self, job: Job) -> bool:
        """Frees a completed job's native side and lets go of what it and its riders held;
        False (still holding) while the native side owns memory."""
        return self._free(job, job.members())

    def _free(self, job: Job, members: list[Job]) -> bool:
        # Set first: a waiter whose copy ended after the look below sees it and frees the
        # job itself (Progress.assist), so its holds go before it returns.
        job.freeing = True
        if not job.free():
            return False
        job.freeing = False
        with self.lock:  # each hold is let go exactly once, whoever frees the job
            let_go = [member.let_go for member in members]
            for member in members:
                member.let_go = _nothing
        for release in let_go:
            release()
        return True

    def error(self, job: Job, state: str) -> LLMException:
        peer = job.link.cluster_id
        if state == PROC:
            return make_error(
                LLMStatusCode.LLM_TIMEOUT, f"transfer with cluster {peer} not done within {self.wait_s * 1000:.0f} ms"
            )
        reason = job.failure or ("NIXL transfer" if isinstance(job, NixlJob) else "same-host copy (the peer is gone)")
        return make_error(LLMStatusCode.LLM_LINK_FAILED, f"{reason} with cluster {peer} failed")

    def abandon(self, job: Job) -> None:
        """finalize: a job still in flight fails, and its native side is stopped."""
        if isinstance(job, SameHostJob):
            job.stop(int(1000 * self.wait_s) + 1000)
        if job.claim_lock.acquire(False):  # (the progress thread has stopped: nothing is counted)
            error = make_error(LLMStatusCode.LLM_FAILED, "finalized with the transfer in flight")
            for member in job.members():
                member.transfer.assist = None
                member.transfer.fail(error)
        if not self.free(job):  # nothing more can be done at finalize: let go regardless
            if isinstance(job, NixlJob):
                job.handle = None
            elif isinstance(job, SameHostJob):
                job.native = None
            self.free(job)
