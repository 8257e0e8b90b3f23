"""The one loop that drives and completes jobs (jobs.py), and the one way a waiter helps.

The progress thread posts the NIXL jobs started in the background (in the order started,
a burst of small ones as one request), looks at every job in flight, completes those that
ended or are past their deadline or peer, and runs the engine's housekeeping (leases that
lingered). While NIXL jobs are in flight it polls without sleeping (each look drives UCX),
handing the GIL on between looks; while only same-host copies are, it waits natively,
without the GIL, until a copy with a notice ends, a job arrives, or a deadline is due.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from .. import _C
from .agent import Request
from .jobs import PROC, Completion, Job, NixlJob, SameHostJob

log = logging.getLogger("torch_kvreg.remote")

# Background jobs posted together as one NIXL request carry at most this many descriptors.
MAX_GROUP_DESCRIPTORS = 1 << 16
# How long a thread starting a background job lets go of the GIL when it hands over to the
# progress thread (the sleep lasts at least this long).
HAND_OVER_S = 20e-6
# Same-host copies nobody waits for, and without a notice (whose end wakes the loop), are
# looked at this often.
JOB_SWEEP_S = 0.005
WATCH_MS = max(1, int(JOB_SWEEP_S * 1000))
# After this many looks with nothing landed, a look pauses (threads computing beside a long
# transfer need the GIL between their torch ops).
PATIENT_LOOKS = 2048


class Progress:
    """The jobs in flight, the thread that completes them, and the help waiters give."""

    def __init__(self, completion: Completion, housekeeping: Callable[[], float | None]) -> None:
        self.completion = completion
        # Runs on every turn; returns the seconds until it is due again (None: nothing due).
        self.housekeeping = housekeeping
        # Jobs handed over by other threads: a deque's appends and pops are thread-safe
        # (documented), so a thread starting transfers takes no lock the loop holds.
        self.incoming: collections.deque[Job] = collections.deque()
        self.jobs: dict[int, Job] = {}  # id(job) -> job, in the order started: the loop's own
        self.cond = threading.Lock()  # guards idle, stopping and thread
        self.idle = False  # the thread waits for jobs
        self.stopping = False
        self.thread: threading.Thread | None = None
        # How many same-host jobs each side completed: the loop counts its own, waiters
        # count theirs under a lock of their own. Read by tests and benchmarks.
        self.by_progress = 0
        self.by_waiters = 0
        self.count_lock = threading.Lock()
        # While the thread posts: since when, and how long the post should take at the rate
        # posts have moved bytes so far (UCX may copy everything inside the post).
        self.posting_since: float | None = None
        self.posting_expected_s = 0.0
        self.post_rate = 2e9  # bytes per second
        self.handed_over_at: float | None = None  # the post after which a starter last yielded
        # When the loop's look at same-host jobs that a start last asked for is due: the
        # starts before it need not ask (each ask is a native call and a lock).
        self.look_due = 0.0

    # --- jobs coming in ---------------------------------------------------------------
    def add(self, job: Job, state: str | None = None) -> None:
        """Hands a started job to the loop. ``state``: what a NIXL job's post returned
        (None: the loop posts it)."""
        if type(job) is SameHostJob:
            self.add_copy(job)
            return
        if state not in (None, PROC) and self.claim(job, "starter") and self.completion.complete(job, state):
            return
        self.incoming.append(job)
        with self.cond:  # (after the append: a loop that went idle before it is woken below)
            hand_over = state is None and self.idle
        self.wake()
        posting_since = self.posting_since
        if (
            state is None
            and posting_since is not None
            and posting_since != self.handed_over_at
            and time.monotonic() - posting_since > self.posting_expected_s
        ):
            self.handed_over_at = posting_since  # once per post: each hand-over costs this thread
            hand_over = True
        if hand_over:
            # The first of a burst, or the loop's post has most likely finished and it now
            # waits for the GIL: let it take the GIL and post what waits. Otherwise it waits
            # for the interpreter's switch interval while this thread starts more, and the
            # burst's bytes move only after the last start.
            time.sleep(HAND_OVER_S)

    def add_copy(self, job: SameHostJob) -> None:
        """add() for a same-host copy just started: its waiters help it (``assist``), its
        end wakes the loop if it has a notice, and a waiter completes it otherwise. The loop
        looks JOB_SWEEP_S from now at the latest (a burst's starts set one look): woken at
        once, it would take the GIL from this thread, which is likely starting more. No
        lock the loop takes is taken here."""
        job.helper = self.assist
        job.transfer.assist = job.assist
        self.incoming.append(job)
        if self.thread is None:
            self.wake()
            return
        now = time.monotonic()
        if now >= self.look_due:  # (else the look set earlier comes sooner)
            self.look_due = now + WATCH_MS / 1000
            _C.peer_copy_watch(WATCH_MS)

    def wake(self) -> None:
        with self.cond:
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="kvreg-progress", daemon=True)
                self.thread.start()
        _C.peer_copy_wake()  # it may be waiting on same-host copies natively

    def claim(self, job: Job, by: str) -> bool:
        """True for the one thread (``by``: "progress", "waiter" or "starter") that
        completes ``job`` (the job's own lock decides, never given back); the loop drops a
        job claimed elsewhere from its table at its next look."""
        if not job.claim_lock.acquire(False):
            return False
        if type(job) is SameHostJob:  # (only NIXL jobs are claimed by their starter)
            if by == "progress":
                self.by_progress += 1  # (only the loop claims as "progress")
            else:
                with self.count_lock:
                    self.by_waiters += 1
        return True

    @property
    def completed_by(self) -> collections.Counter[str]:
        """Same-host jobs completed, by who completed them ("progress", "waiter")."""
        counts: collections.Counter[str] = collections.Counter()
        for by, count in (("waiter", self.by_waiters), ("progress", self.by_progress)):
            if count:
                counts[by] = count
        return counts

    def _take_incoming(self) -> None:
        """Moves the jobs handed over into the loop's table (the loop's thread only)."""
        incoming = self.incoming
        while incoming:
            job = incoming.popleft()
            self.jobs[id(job)] = job

    # --- waiters ----------------------------------------------------------------------
    def assist(self, job: SameHostJob, timeout_ms: int) -> None:
        """Transfer.wait's help with a same-host copy: the waiting thread moves queued bytes
        itself and completes the job once they have landed (no hand-over to the loop and
        back per transfer)."""
        if job.claim_lock.locked():  # (claimed)
            return
        state = job.help(timeout_ms)
        if state == PROC:
            return
        if not self.claim(job, "waiter"):
            if job.freeing:
                # Completed (failed) while its copy still ran, which has ended now: its holds
                # go before this waiter returns, as they do when it lands.
                self.completion.free(job)
            return
        if not self.completion.complete(job, state):
            self.incoming.append(job)  # the loop lets go of it later
            self.wake()

    # --- the loop ---------------------------------------------------------------------
    def _run(self) -> None:
        looks = 0  # since a job last landed
        while True:
            # Read before looking at the jobs: a copy that ends, or a wake, after the look
            # is not missed.
            ends, wakes = _C.peer_copy_ends(), _C.peer_copy_wakes()
            due = self.housekeeping()
            self._take_incoming()
            if not self.jobs:
                with self.cond:
                    if self.incoming:
                        continue  # handed over just now
                    if self.stopping:
                        return
                    self.idle = True
            jobs = list(self.jobs.values())
            if not jobs:
                # Natively, without the GIL, until a new job or stop (wake), housekeeping is
                # due, or a same-host job wants a look (peer_copy_watch).
                _C.peer_copy_wait_ends(ends, wakes, -1 if due is None else max(1, int(due * 1000)))
                with self.cond:
                    self.idle = False
                continue
            waiting = [job for job in jobs if isinstance(job, NixlJob) and not job.posted]
            if waiting:
                riders = self._post(waiting)
                if riders:
                    for rider in riders:
                        self.jobs.pop(id(rider), None)
                    gone = {id(rider) for rider in riders}
                    jobs = [job for job in jobs if id(job) not in gone]
            landed = {id(job) for job in jobs if self._look(job)}
            if landed:
                looks = 0
                for key in landed:
                    self.jobs.pop(key, None)
                jobs = [job for job in jobs if id(job) not in landed]
            else:
                looks += 1
            if not jobs:
                continue
            if all(type(job) is SameHostJob and not job.freeing for job in jobs):
                # Copies need no polling, even while some land: spinning here would take the
                # GIL from the threads starting and waiting for them.
                self._wait_for_copies(jobs, due, ends, wakes)
            elif all(job.freeing for job in jobs):
                time.sleep(0.01)  # only handles NIXL has not let go of: no hurry
            elif looks > PATIENT_LOOKS:
                time.sleep(0.0001)
            else:
                # Lets a thread that wants the GIL back (a compute thread between its torch
                # ops, a caller starting transfers) take it now rather than after the
                # interpreter's switch interval.
                time.sleep(0)

    def _look(self, job: Job) -> bool:
        """One look at a job; True once it is completed and has let go of what it held."""
        if job.freeing:  # completed earlier; retry
            return self.completion.free(job)
        if job.claimed:
            return True  # its waiter completes it
        state = job.look()
        if state == PROC and job.link.alive and time.monotonic() <= job.deadline:
            return False
        if not self.claim(job, "progress"):
            return True
        return self.completion.complete(job, state)  # (if not: it stays, and lets go later)

    def _post(self, waiting: list[NixlJob]) -> list[NixlJob]:
        """Posts the jobs started in the background, in the order started. Consecutive
        requests of one kind to one peer become one NIXL request (the first job leads, the
        others ride along and complete with it). A job with a notice ends its group, so the
        notice still follows all of its data. Returns the riders."""
        riders: list[NixlJob] = []
        i = 0
        while i < len(waiting):
            group = [waiting[i]]
            descriptors = len(waiting[i].request)
            i += 1
            while (
                not group[-1].notify
                and i < len(waiting)
                and waiting[i].request.key == group[0].request.key
                and descriptors + len(waiting[i].request) <= MAX_GROUP_DESCRIPTORS
            ):
                group.append(waiting[i])
                descriptors += len(waiting[i].request)
                i += 1
            leader = group[0]
            leader.riders = group[1:]
            riders.extend(leader.riders)
            leader.notify = group[-1].notify
            leader.deadline = min(job.deadline for job in group)
            try:
                leader.handle = Request.handle_of([job.request for job in group])
            except Exception as exc:
                log.warning("NIXL could not prepare a transfer: %s", exc)
                leader.posted, leader.posted_state = True, "ERR"
                continue
            nbytes = sum(job.transfer.nbytes for job in group)
            self.posting_since, self.posting_expected_s = time.monotonic(), nbytes / self.post_rate
            leader.posted_state = leader.post()
            took = time.monotonic() - self.posting_since
            self.posting_since = None
            if took > 0 and nbytes >= 1 << 16:  # a running estimate of how fast posts move bytes
                self.post_rate = 0.7 * self.post_rate + 0.3 * (nbytes / took)
        return riders

    def _wait_for_copies(self, jobs: list[Job], due: float | None, ends: int, wakes: int) -> None:
        """Blocks without the GIL until a same-host copy with a notice ends (one started
        since too: a start need not wake this thread), a job arrives, JOB_SWEEP_S has passed
        (copies nobody waits for), or the first deadline or housekeeping is due. Waking on
        every copy's end would take the GIL from the thread starting them."""
        now = time.monotonic()
        until = min(job.deadline for job in jobs)
        until = min(until, now + JOB_SWEEP_S, until if due is None else now + due)
        _C.peer_copy_wait_ends(ends, wakes, max(1, int((until - now) * 1000)))

    def stop(self, timeout_s: float) -> None:
        """Stops the thread (finalize). Jobs still in flight then fail and let go of what
        they held, so that finalize cannot hang on a peer that never answers."""
        with self.cond:
            self.stopping = True
            thread = self.thread
        _C.peer_copy_wake()  # it waits natively when idle
        if thread is not None:
            thread.join(timeout=timeout_s)
        if thread is not None and thread.is_alive():
            log.warning("finalize: the progress thread did not stop within %.1f s", timeout_s)
        self._take_incoming()
        leftovers = list(self.jobs.values())
        self.jobs.clear()
        for job in leftovers:
            if not job.claimed:
                log.warning("finalize: a transfer with cluster %s was still in flight", job.link.cluster_id)
            self.completion.abandon(job)
