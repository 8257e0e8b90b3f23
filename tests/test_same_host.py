"""Same-host copies: the native pool that moves bytes between processes with
process_vm_readv/writev, the pid proof a peer gives when it links, and remote transfers to a
peer on this host, whole, refused, cut by the peer's death, past their deadline, at finalize."""

import errno
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import torch_kvreg as kv
from torch_kvreg import _C, CacheIndex, LLMStatusCode
from torch_kvreg.remote import protocol, same_host

from remote_peer import Peer, linked_to, paged, running_peer

PAUSE = "TORCH_KVREG_PEER_COPY_TEST_PAUSE_US"
BLOCK = (16, 2, 32)  # 2 KiB fp16 blocks
ME = os.getpid()


def rows(pieces):
    """(local address, remote address, bytes) rows as the pool takes them."""
    return torch.tensor(pieces, dtype=torch.int64).reshape(-1, 3)


def spend_pending_watch():
    """A watch an engine's progress thread set and never waited out (it stopped first) ends
    the next wait for ends at once: spent here, so that the timing tests start clean."""
    _C.peer_copy_wait_ends(_C.peer_copy_ends(), _C.peer_copy_wakes(), 20)


def finished(job, timeout_ms=10_000):
    return job.wait(timeout_ms)


# --- the native pool, within this process (a process may copy from itself) -----------------
@pytest.mark.parametrize("read", [True, False])
def test_pieces_of_every_size_land_wherever_the_job_is_split(read):
    rng = np.random.default_rng(7)
    source = torch.from_numpy(rng.integers(0, 256, 48 << 20, dtype=np.uint8))
    target = torch.zeros(96 << 20, dtype=torch.uint8)
    expected = torch.zeros_like(target)
    # Pieces from 1 byte to 3 MiB (tasks are cut at 256 KiB to 4 MiB: many pieces are split
    # between tasks), at scattered offsets, none overlapping on the target side.
    sizes = [int(s) for s in rng.choice([1, 7, 4096, 32 << 10, 300_001, 3 << 20], 120)]
    target_offsets = np.cumsum([0, *sizes[:-1]])
    assert target_offsets[-1] + sizes[-1] <= target.numel()
    pieces = []
    for size, to in zip(sizes, target_offsets):
        at = int(rng.integers(0, source.numel() - size))
        expected[to : to + size] = source[at : at + size]
        here, there = target.data_ptr() + int(to), source.data_ptr() + at
        # read: the peer (this process) is the source; write: we are the source
        pieces += [here, there, size] if read else [there, here, size]
    job = _C.peer_copy_start(ME, read, rows(pieces))
    assert finished(job) == 1
    assert torch.equal(target, expected)
    assert sum(sizes) > 8 * (4 << 20)  # more bytes than one task takes: the job was split
    del job
    assert _C.peer_copy_live_jobs() == 0


def test_a_failed_job_says_why():
    buffer = torch.zeros(1 << 16, dtype=torch.uint8)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # exited and reaped
    cases = {
        -errno.ESRCH: (dead_pid, [[buffer.data_ptr(), buffer.data_ptr(), 64]]),
        -errno.EFAULT: (ME, [[buffer.data_ptr(), 4096, 64]]),  # nothing is mapped at page 1
    }
    for expected, (pid, pieces) in cases.items():
        assert finished(_C.peer_copy_start(pid, True, rows(pieces))) == expected
    # Good pieces before a bad one still land; the job fails.
    good = torch.arange(64, dtype=torch.uint8)
    job = _C.peer_copy_start(ME, True, rows([[buffer.data_ptr(), good.data_ptr(), 64], [buffer.data_ptr(), 8, 64]]))
    assert finished(job) == -errno.EFAULT
    del job
    assert _C.peer_copy_live_jobs() == 0
    assert _C.peer_copy_peek(dead_pid, buffer.data_ptr(), 8)[0] == -errno.ESRCH
    assert _C.peer_copy_peek(ME, 8, 8)[0] == -errno.EFAULT
    assert _C.peer_copy_peek(ME, good.data_ptr(), 4) == (0, bytes([0, 1, 2, 3]))


def test_a_piece_running_into_unmapped_memory_stops_there():
    """The kernel moves the mapped part and stops: the copy goes on from there (where it
    fails) rather than from the start of the piece again."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = mmap.PAGESIZE
    base = libc.mmap(None, 2 * page, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert base not in (None, ctypes.c_void_p(-1).value)
    try:
        ctypes.memset(base, 0x5A, 2 * page)
        assert libc.munmap(base + page, page) == 0  # the second page is gone
        target = torch.zeros(2 * page, dtype=torch.uint8)
        job = _C.peer_copy_start(ME, True, rows([target.data_ptr(), base, 2 * page]))
        assert finished(job) == -errno.EFAULT
        assert torch.all(target[:page] == 0x5A) and torch.all(target[page:] == 0)
    finally:
        libc.munmap(base, page)


def test_bad_jobs_are_refused_and_start_nothing():
    buffer = torch.zeros(64, dtype=torch.uint8)
    live = _C.peer_copy_live_jobs()
    with pytest.raises(ValueError, match="LLM_PARAM_INVALID"):
        _C.peer_copy_start(0, True, rows([buffer.data_ptr(), buffer.data_ptr(), 8]))
    with pytest.raises(ValueError, match="LLM_PARAM_INVALID"):
        _C.peer_copy_start(ME, True, rows([buffer.data_ptr(), -64, 128]))  # wraps the address space
    with pytest.raises(TypeError, match="LLM_PARAM_INVALID"):
        _C.peer_copy_start(ME, True, torch.zeros(1, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="LLM_PARAM_INVALID"):
        _C.peer_copy_start(ME, True, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="LLM_PARAM_INVALID"):
        _C.peer_copy_peek(ME, buffer.data_ptr(), 4097)
    offsets = np.zeros(2, dtype=np.uint64)
    with pytest.raises(ValueError, match="LLM_PARAM_INVALID: peer copy segments"):
        _C.peer_copy_start_segments(ME, True, [buffer.data_ptr()], [], offsets, offsets, offsets, True)
    with pytest.raises(ValueError, match="LLM_PARAM_INVALID: peer copy segments"):
        _C.peer_copy_start_segments(ME, True, [1], [1], offsets, offsets[:1], offsets, True)
    with pytest.raises(ValueError, match="LLM_PARAM_INVALID"):
        _C.peer_copy_start_segments(0, True, [1], [1], offsets, offsets, offsets, True)
    with pytest.raises(TypeError):
        _C.PeerCopyJob()  # made only by the functions that start one
    assert _C.peer_copy_live_jobs() == live


def test_a_slow_job_is_cancelled_waited_for_and_woken_from(monkeypatch):
    monkeypatch.setenv(PAUSE, "20000")  # 20 ms before each system call
    source = torch.ones(32 << 20, dtype=torch.uint8)
    target = torch.zeros_like(source)
    spend_pending_watch()
    job = _C.peer_copy_start(ME, True, rows([target.data_ptr(), source.data_ptr(), source.numel()]))
    assert job.state() == 0 and job.wait(5) == 0  # still running
    ends, wakes = _C.peer_copy_ends(), _C.peer_copy_wakes()
    assert not _C.peer_copy_wait_ends(ends, wakes, 10)  # nothing ended within 10 ms
    waker = threading.Timer(0.05, _C.peer_copy_wake)
    start = time.monotonic()
    waker.start()
    assert _C.peer_copy_wait_ends(ends, wakes, 5000)  # woken, though nothing ended
    assert time.monotonic() - start < 2 and _C.peer_copy_ends() == ends
    job.cancel()
    assert job.wait(5000) == -errno.ECANCELED
    assert _C.peer_copy_ends() == ends + 1 and _C.peer_copy_wait_ends(ends, wakes + 1, 0)
    assert not torch.equal(target, source)  # it stopped before the end
    del job
    assert _C.peer_copy_live_jobs() == 0


def test_a_watch_ends_a_wait_for_ends_at_its_time_not_before():
    """peer_copy_watch(delay): the wait for ends returns then (not at once, and not on an
    unwatched job's end); the earliest of two watches counts; one watch ends one wait."""
    spend_pending_watch()
    ends, wakes = _C.peer_copy_ends(), _C.peer_copy_wakes()
    start = time.monotonic()
    _C.peer_copy_watch(300)
    _C.peer_copy_watch(150)  # the earlier one counts
    source = torch.ones(1 << 20, dtype=torch.uint8)
    target = torch.zeros_like(source)
    job = _C.peer_copy_start(ME, True, rows([target.data_ptr(), source.data_ptr(), source.numel()]), False)
    assert _C.peer_copy_wait_ends(ends, wakes, 5000)  # the unwatched job's end did not end it
    took = time.monotonic() - start
    assert 0.14 <= took < 0.29 and _C.peer_copy_ends() == ends
    assert finished(job) == 1 and torch.equal(target, source)
    assert not _C.peer_copy_wait_ends(ends, wakes, 400)  # the watch was spent: only the timeout
    with pytest.raises(ValueError, match="LLM_PARAM_INVALID"):
        _C.peer_copy_watch(-1)


def test_a_native_route_checks_its_block_lists_and_copies(kv):
    """_C.PeerRoute within this process (its own peer): a start it takes copies the blocks;
    one it does not (not lists of plain ints, or failing a check) returns None and starts no
    job; descs or tensor lists that do not fit are refused when the route is made."""
    source = [torch.arange(i * 8 * 64, (i + 1) * 8 * 64, dtype=torch.float32).reshape(8, 64) for i in range(3)]
    target = [torch.zeros(8, 64) for _ in range(3)]
    src = (3, int(kv.DataType.DT_FLOAT), [8, 64], int(kv.Placement.HOST), -1)
    route = _C.PeerRoute(
        ME, True, [t.data_ptr() for t in target], [t.data_ptr() for t in source], src, 1, src, 2, 64 << 20
    )
    assert route.block_bytes == 3 * 64 * 4
    job = route.start_job([5, 6, 7, 0], [0, 1, 2, 7], False)
    assert job is not None and finished(job) == 1
    for s, t in zip(source, target):
        assert torch.equal(t[[0, 1, 2, 7]], s[[5, 6, 7, 0]])
    jobs = _C.peer_copy_live_jobs()
    refused = [
        ([8], [1]),  # out of range
        ([1], [-1]),
        ([1, 2], [3]),  # lengths differ
        ([1, 2], [3, 3]),  # a block written twice
        ([True], [1]),
        ([1.5], [1]),
        ([2**64], [1]),
        ((1,), [1]),  # a tuple: the general path takes it
        (torch.tensor([1]), [1]),
        ([], []),  # nothing to move: the general path completes it at once
        (None, [1]),
    ]
    for src_blocks, dst_blocks in refused:
        assert route.start_job(src_blocks, dst_blocks, False) is None, (src_blocks, dst_blocks)
    assert _C.peer_copy_live_jobs() == jobs
    with pytest.raises(ValueError, match="peer route"):
        _C.PeerRoute(ME, True, [target[0].data_ptr()], [source[0].data_ptr()], src, 1, src, 2, 64 << 20)
    other = (3, int(kv.DataType.DT_FLOAT), [8, 32], int(kv.Placement.HOST), -1)
    with pytest.raises((ValueError, RuntimeError)):
        _C.PeerRoute(ME, True, [0, 0, 0], [0, 0, 0], src, 1, other, 2, 64 << 20)


def test_the_pool_size_follows_its_setting_and_a_bad_one_is_refused():
    code = "from torch_kvreg import _C; print(_C.peer_copy_threads())"
    default = max(1, min(4, os.cpu_count() - 1))
    for setting, expected in (("3", 3), ("64", 64), ("", default)):
        env = {**os.environ, "TORCH_KVREG_PEER_COPY_THREADS": setting}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        assert int(out.stdout) == expected, (setting, out.stdout)
    # A malformed count: the engine (made when a process first links or listens) refuses
    # to start, with the status and the setting named, and leaves none behind.
    refused = (
        "import torch_kvreg as kv\n"
        "kv.initialize()\n"
        "try:\n"
        "    kv.remote.get_engine()\n"
        "except kv.LLMException as exc:\n"
        "    print(exc.status_code.name, 'TORCH_KVREG_PEER_COPY_THREADS' in str(exc), kv.remote.existing_engine())\n"
    )
    for setting in ("0", "65", "many", "2x"):
        env = {**os.environ, "TORCH_KVREG_PEER_COPY_THREADS": setting}
        out = subprocess.run([sys.executable, "-c", refused], capture_output=True, text=True, env=env, timeout=120)
        assert out.stdout.split() == ["LLM_PARAM_INVALID", "True", "None"], (setting, out.stdout, out.stderr[-500:])


# --- the job class (_C.PeerCopyJob): a handle whose end releases the job ------------------
def wait_for_live_jobs(count, timeout_s=30.0):
    """Whether peer_copy_live_jobs() comes to `count` within the timeout."""
    until = time.monotonic() + timeout_s
    while _C.peer_copy_live_jobs() != count:
        if time.monotonic() > until:
            return False
        time.sleep(0.005)
    return True


@pytest.mark.parametrize("read", [True, False])
def test_a_job_handle_copies_its_pieces_and_reports_its_end(read):
    rng = np.random.default_rng(11)
    source = torch.from_numpy(rng.integers(0, 256, 6 << 20, dtype=np.uint8))
    target = torch.zeros_like(source)
    here, there = (target, source) if read else (source, target)
    half = source.numel() // 2
    pieces = [[here.data_ptr() + half, there.data_ptr(), half], [here.data_ptr(), there.data_ptr() + half, half]]
    live, ends = _C.peer_copy_live_jobs(), _C.peer_copy_ends()
    job = _C.peer_copy_start(ME, read, rows(pieces))
    assert isinstance(job, _C.PeerCopyJob) and job.nbytes == source.numel()
    assert _C.peer_copy_live_jobs() == live + 1
    assert job.wait(10_000) == 1 and job.state() == 1
    assert job.wait(0) == 1 and job.help(0) == 1 and job.help(-1) == 1  # an ended job stays ended
    job.cancel()  # too late to change anything
    assert job.state() == 1 and _C.peer_copy_ends() == ends + 1
    assert torch.equal(target[:half], source[half:]) and torch.equal(target[half:], source[:half])
    del job
    assert _C.peer_copy_live_jobs() == live  # no thread held it once it had ended
    # An unwatched job's end is not counted; an empty job has ended when it is made.
    assert _C.peer_copy_start(ME, read, rows(pieces), watched=False).wait(10_000) == 1
    empty = _C.peer_copy_start(ME, read, torch.zeros(0, 3, dtype=torch.int64))
    assert empty.state() == 1 and empty.nbytes == 0 and _C.peer_copy_ends() == ends + 2


FORKED_CHILD_PEER_COPY = """
import os, sys, numpy as np
from torch_kvreg import _C
source = np.arange(1 << 20, dtype=np.uint8)
target = np.zeros_like(source)
def copy(lo, hi):  # this process's own memory, through the pool: [lo, hi) of source into target
    rows = np.array([[target.ctypes.data + lo, source.ctypes.data + lo, hi - lo]], dtype=np.int64)
    return _C.peer_copy_start_segments(
        os.getpid(), True, [target.ctypes.data], [source.ctypes.data], np.array([lo], dtype=np.uint64),
        np.array([lo], dtype=np.uint64), np.array([hi - lo], dtype=np.uint64), False).wait(20_000)
assert copy(0, 1 << 19) == 1  # the parent's pool and its worker threads are up
pid = os.fork()
if pid == 0:  # the child's pool is its own: the parent's workers are not here to run its tasks
    os._exit(0 if copy(1 << 19, 1 << 20) == 1 and np.array_equal(target, source) else 3)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status), _C.peer_copy_threads() >= 1)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_after_same_host_copies_copies_with_a_pool_of_its_own():
    """The pool is found without a system call (no getpid() per start): a fork handler makes
    the child start a pool of its own, whose workers run the child's copies."""
    done = subprocess.run([sys.executable, "-c", FORKED_CHILD_PEER_COPY], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["child", "0", "True"]


def test_a_job_from_a_plan_copies_each_segment_of_each_tensor():
    """peer_copy_start_segments: segment j of tensor t is lengths[j] bytes at
    local_addrs[t] + local_offsets[j] and remote_addrs[t] + remote_offsets[j]."""
    source = [torch.arange(i * 4096, (i + 1) * 4096, dtype=torch.int32) for i in range(3)]
    target = [torch.zeros(4096, dtype=torch.int32) for _ in range(3)]
    local_offsets = np.array([0, 4 * 1000], dtype=np.uint64)
    remote_offsets = np.array([4 * 3000, 4 * 10], dtype=np.uint64)
    lengths = np.array([4 * 96, 4 * 7], dtype=np.uint64)
    job = _C.peer_copy_start_segments(
        ME,
        True,
        [t.data_ptr() for t in target],
        [s.data_ptr() for s in source],
        local_offsets,
        remote_offsets,
        lengths,
        False,
    )
    assert job.nbytes == 3 * 4 * (96 + 7) and job.help(10_000) == 1
    for s, t in zip(source, target):
        expected = torch.zeros_like(t)
        expected[:96] = s[3000:3096]
        expected[1000:1007] = s[10:17]
        assert torch.equal(t, expected)


def test_a_slow_job_is_helped_waited_for_and_cancelled_through_its_handle(monkeypatch):
    monkeypatch.setenv(PAUSE, "50000")  # 50 ms before each system call
    source = torch.ones(32 << 20, dtype=torch.uint8)
    target = torch.zeros_like(source)
    ends = _C.peer_copy_ends()
    spend_pending_watch()
    job = _C.peer_copy_start(ME, True, rows([target.data_ptr(), source.data_ptr(), source.numel()]))
    assert job.state() == 0 and job.wait(5) == 0  # still running
    start = time.monotonic()
    assert job.help(30) == 0  # its deadline passed with tasks left
    assert time.monotonic() - start < 1.0
    job.cancel()
    assert job.wait(5000) == -errno.ECANCELED and job.state() == -errno.ECANCELED
    assert job.help(0) == -errno.ECANCELED and _C.peer_copy_ends() == ends + 1
    assert not torch.equal(target, source)  # it stopped before the end


def test_help_copies_on_the_calling_thread_while_the_workers_are_busy():
    """With one worker held up by another job, help() moves the job's bytes itself, at once;
    wait() would have waited for the worker."""
    code = f"""
import os, time, torch
from torch_kvreg import _C
def rows(t, s):
    return torch.tensor([[t.data_ptr(), s.data_ptr(), s.numel()]], dtype=torch.int64)
source, target = torch.ones(4096, dtype=torch.uint8), torch.zeros(4096, dtype=torch.uint8)
os.environ["{PAUSE}"] = "2000000"  # 2 s before its only system call
slow = _C.peer_copy_start(os.getpid(), True, rows(torch.zeros_like(source), source))
time.sleep(0.2)  # the worker has taken its only task
del os.environ["{PAUSE}"]
quick = _C.peer_copy_start(os.getpid(), True, rows(target, source))
start = time.monotonic()
state = quick.help(10_000)
print(state, time.monotonic() - start < 1.0, slow.state(), bool(torch.equal(target, source)))
"""
    env = {**os.environ, "TORCH_KVREG_PEER_COPY_THREADS": "1"}
    env.pop(PAUSE, None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["1", "True", "0", "True"], out.stderr[-2000:]


def test_dropping_a_running_jobs_handle_cancels_it_and_its_state_goes_with_its_threads(monkeypatch):
    """The handle's end cancels the job; the threads still copying for it keep its state
    until they stop (no crash, nothing left behind), then it is counted out."""
    source = torch.randint(0, 256, (256 << 20,), dtype=torch.uint8)  # every page written
    target = torch.zeros_like(source)
    live = _C.peer_copy_live_jobs()
    job = _C.peer_copy_start(ME, True, rows([target.data_ptr(), source.data_ptr(), source.numel()]))
    assert job.state() == 0
    del job
    assert wait_for_live_jobs(live)
    # Slowed down, so that the cancellation shows: the copy stops short, its end is counted.
    monkeypatch.setenv(PAUSE, "20000")
    target.zero_()
    ends = _C.peer_copy_ends()
    job = _C.peer_copy_start(ME, True, rows([target.data_ptr(), source.data_ptr(), 32 << 20]))
    assert job.state() == 0 and _C.peer_copy_live_jobs() == live + 1
    del job
    assert wait_for_live_jobs(live) and _C.peer_copy_ends() == ends + 1
    assert not torch.equal(target[: 32 << 20], source[: 32 << 20])


@pytest.mark.parametrize("read", [True, False])
def test_a_native_routes_start_job_copies_its_blocks_or_takes_nothing(kv, read):
    source = [torch.arange(i * 8 * 64, (i + 1) * 8 * 64, dtype=torch.float32).reshape(8, 64) for i in range(3)]
    target = [torch.zeros(8, 64) for _ in range(3)]
    src = (3, int(kv.DataType.DT_FLOAT), [8, 64], int(kv.Placement.HOST), -1)
    here, there = (target, source) if read else (source, target)
    route = _C.PeerRoute(
        ME, read, [t.data_ptr() for t in here], [t.data_ptr() for t in there], src, 1, src, 2, 64 << 20
    )
    live = _C.peer_copy_live_jobs()
    job = route.start_job([5, 6, 7, 0], [0, 1, 2, 7], False)
    assert isinstance(job, _C.PeerCopyJob) and job.nbytes == 4 * route.block_bytes
    assert job.wait(10_000) == 1
    for s, t in zip(source, target):
        assert torch.equal(t[[0, 1, 2, 7]], s[[5, 6, 7, 0]])
        assert torch.all(t[3:7] == 0)
    del job
    assert _C.peer_copy_live_jobs() == live
    for src_blocks, dst_blocks in ([8], [1]), ([1, 2], [3]), ([True], [1]), ((1,), [1]), ([], []), (None, [1]):
        assert route.start_job(src_blocks, dst_blocks, False) is None, (src_blocks, dst_blocks)
    assert _C.peer_copy_live_jobs() == live


# --- the pid proof ---------------------------------------------------------------------------
class FakeLink:
    """Answers the same_host request as ``answer(nonce)`` says; records what was asked."""

    cluster_id = 5

    def __init__(self, answer):
        self.answer, self.asked, self.keep = answer, [], []

    def request(self, message, timeout_s=None):
        self.asked.append(message.op)
        return self.answer(self, message.nonce)


def hello(host):
    return protocol.HelloReply(5, "peer", b"", host)


def show(link, nonce, pid=ME, shown=None):
    buffer = np.frombuffer(nonce if shown is None else shown, dtype=np.uint8).copy()
    link.keep.append(buffer)
    return {"ok": True, "pid": pid, "address": int(buffer.ctypes.data)}


def test_a_peer_proves_the_pid_it_names(kv):
    engine = kv.remote.get_engine()
    host = hello(engine.host)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cases = {
            "honest": (lambda link, nonce: show(link, nonce), ME),
            "wrong bytes": (lambda link, nonce: show(link, nonce, shown=bytes(32)), None),
            "another process": (lambda link, nonce: show(link, nonce, pid=sleeper.pid), None),
            "no such process": (lambda link, nonce: show(link, nonce, pid=2**31 - 1), None),
            "malformed": (lambda link, nonce: {"ok": True, "pid": "me", "address": 1}, None),
            "refused": (
                lambda link, nonce: (_ for _ in ()).throw(kv.LLMException(LLMStatusCode.LLM_FAILED, "no")),
                None,
            ),
        }
        for name, (answer, expected) in cases.items():
            link = FakeLink(answer)
            assert same_host.peer_pid(engine.host, link, host, 1.0) == expected, name
            assert link.asked == ["same_host"], name
        elsewhere = FakeLink(lambda link, nonce: show(link, nonce))
        for response in ({"host": "another|host|entirely"}, {}, {"host": 7}):
            reply = protocol.HelloReply.parse({"ok": True, "cluster_id": 5, "agent": "peer", "md": "", **response})
            assert same_host.peer_pid(engine.host, elsewhere, reply, 1.0) is None
        assert elsewhere.asked == []  # a peer on another host is not even asked
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_nonce_is_shown_only_when_same_host_copies_are_on(monkeypatch):
    monkeypatch.setenv("TORCH_KVREG_SAME_HOST_COPY", "0")
    kv.initialize()
    engine = kv.remote.get_engine()
    assert engine.host is None
    with pytest.raises(kv.LLMException) as refused:
        same_host.show_nonce(engine.host, protocol.SameHost(bytes(32)), FakeLink(None))
    assert refused.value.status_code == LLMStatusCode.LLM_FEATURE_NOT_ENABLED


def test_a_bad_setting_is_refused_and_changes_nothing(monkeypatch):
    monkeypatch.setenv("TORCH_KVREG_SAME_HOST_COPY", "yes")
    kv.initialize()
    with pytest.raises(kv.LLMException) as refused:
        kv.remote.get_engine()
    assert refused.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
    assert "TORCH_KVREG_SAME_HOST_COPY" in str(refused.value)
    assert kv.remote.existing_engine() is None


# --- remote transfers to a peer on this host ----------------------------------------------


@pytest.fixture(scope="module")
def peer():
    with running_peer(13) as p:
        yield p


@pytest.fixture
def decoder(peer):
    with linked_to(peer):
        yield kv.remote.existing_engine()


def mirrored(peer, num_tensors, num_blocks, seed):
    """A peer cache (``seed``'s contents) and a zeroed local one like it: (the peer cache's
    CacheIndex, its contents, the local tensors, the local Cache)."""
    remote_id = peer.call("register", (num_tensors, num_blocks, BLOCK, seed, True))
    mine = [torch.zeros(num_blocks, *BLOCK, dtype=torch.float16) for _ in range(num_tensors)]
    return CacheIndex(13, remote_id), paged(num_tensors, num_blocks, BLOCK, seed), mine, kv.register_kv_cache(mine)


def test_a_peer_on_this_host_is_copied_directly(peer, decoder):
    assert decoder.links[13].peer_pid == peer.process.pid
    remote, theirs, mine, local = mirrored(peer, 4, 16, 21)
    remote_id = remote.cache_id
    block = local.cache_desc.block_nbytes
    assert kv.pull_kv_blocks(remote, local, [3, 4, 5, 9], [0, 1, 2, 15]) == 4 * 4 * block
    for t in range(4):
        assert torch.equal(mine[t][[0, 1, 2, 15]], theirs[t][[3, 4, 5, 9]])
    assert kv.pull_kv_blocks(remote, local, [7], [7], layers=range(1, 2)) == 2 * block  # tensors 2 and 3
    assert torch.equal(mine[2][7], theirs[2][7]) and not torch.equal(mine[0][7], theirs[0][7])
    assert kv.pull_kv_cache(CacheIndex(13, remote_id, 11), local, 12, size=block) == 4 * block
    assert all(torch.equal(mine[t][12], theirs[t][11]) for t in range(4))
    for t in range(4):
        mine[t][6] = 40.0 + t
    kv.push_kv_blocks_async(local, remote, [6], [1], notify="pushed").wait(5000)
    written = peer.call("read", remote_id)
    assert all(torch.all(written[t][1] == 40.0 + t) for t in range(4))
    assert torch.equal(written[0][2], theirs[0][2])  # only that block
    assert decoder.paths == {"same_host": 4}
    assert peer.settled_leases() == {} and _C.in_flight(local.cache_id) == 0
    assert _C.peer_copy_live_jobs() == 0
    peer.call("unregister", remote_id)


def test_waiters_pollers_and_the_progress_thread_each_complete_copies(peer, decoder):
    """Some transfers are waited for and some polled (the caller completes them, racing the
    progress thread), the rest left alone (the progress thread completes them within its
    sweep): each is completed exactly once, whoever gets there first."""
    import random

    remote_id = peer.call("register", (4, 64, BLOCK, 26, True))
    theirs = paged(4, 64, BLOCK, 26)
    mine = [torch.zeros(64, *BLOCK, dtype=torch.float16) for _ in range(4)]
    local = kv.register_kv_cache(mine)
    rng = random.Random(3)
    for _ in range(30):
        blocks = rng.sample(range(64), 30)
        transfers = [kv.pull_kv_blocks_async(CacheIndex(13, remote_id), local, [b], [b]) for b in blocks]
        order = list(range(30))
        rng.shuffle(order)
        for i in order:
            if i % 3 == 0:
                transfers[i].wait(5000)
            elif i % 3 == 1:
                while not transfers[i].done():
                    time.sleep(0)
        deadline = time.monotonic() + 5
        while any(t.status is None for t in transfers) and time.monotonic() < deadline:
            time.sleep(0.001)  # the third left alone: the progress thread completes them
        assert all(t.status == LLMStatusCode.LLM_SUCCESS for t in transfers)
        for mine_t, theirs_t in zip(mine, theirs):
            assert torch.equal(mine_t[blocks], theirs_t[blocks])
    # All three ways completed some (how many each depends on timing).
    assert decoder.progress.completed_by["waiter"] >= 10, decoder.progress.completed_by
    assert decoder.progress.completed_by["progress"] >= 100, decoder.progress.completed_by
    assert sum(decoder.progress.completed_by.values()) == decoder.paths["same_host"] == 30 * 30
    assert _C.peer_copy_live_jobs() == 0 and _C.in_flight(local.cache_id) == 0
    peer.call("unregister", remote_id)


def test_polling_done_completes_an_ended_copy_at_once(peer, monkeypatch):
    """With the progress thread's sweep pushed far out, only done() itself can complete
    the copy this soon."""
    from torch_kvreg.remote import progress

    monkeypatch.setattr(progress, "JOB_SWEEP_S", 30.0)
    with linked_to(peer, wait_ms=30_000):
        remote_id = peer.call("register", (2, 8, BLOCK, 27, True))
        mine = [torch.zeros(8, *BLOCK, dtype=torch.float16) for _ in range(2)]
        local = kv.register_kv_cache(mine)
        # 50 ms before its one system call: the progress thread's first look finds it running
        monkeypatch.setenv(PAUSE, "50000")
        transfer = kv.pull_kv_blocks_async(CacheIndex(13, remote_id), local, [1], [2])
        monkeypatch.delenv(PAUSE)
        start = time.monotonic()
        while not transfer.done() and time.monotonic() - start < 5:
            time.sleep(0.001)
        assert transfer.status == LLMStatusCode.LLM_SUCCESS and time.monotonic() - start < 1
        assert kv.remote.existing_engine().progress.completed_by == {"waiter": 1}
        assert torch.equal(mine[1][2], paged(2, 8, BLOCK, 27)[1][1])
    peer.call("unregister", remote_id)


def test_a_notice_goes_out_when_its_copy_lands_though_nobody_waits(peer, monkeypatch):
    """A push with a notice that nobody waits for or polls: the progress thread is woken by
    its end (the sweep pushed far out cannot be what sends it)."""
    from torch_kvreg.remote import progress

    monkeypatch.setattr(progress, "JOB_SWEEP_S", 30.0)
    with linked_to(peer, wait_ms=30_000):
        remote_id = peer.call("register_zeros", (2, 8, BLOCK))
        peer.call("notifications")  # drain
        mine = [torch.full((8, *BLOCK), 3.0, dtype=torch.float16) for _ in range(2)]
        local = kv.register_kv_cache(mine)
        monkeypatch.setenv(PAUSE, "50000")  # the progress thread's first look finds it running
        transfer = kv.push_kv_blocks_async(local, CacheIndex(13, remote_id), [0], [5], notify="landed")
        monkeypatch.delenv(PAUSE)
        start, received = time.monotonic(), []
        while not received and time.monotonic() - start < 5:
            received = peer.call("notifications")
            time.sleep(0.005)
        assert received == [(2, b"landed")] and time.monotonic() - start < 2
        assert torch.all(peer.call("read", remote_id)[1][5] == 3.0)
        assert transfer.wait(1000) == 2 * mine[0][0].numel() * 2
    peer.call("unregister", remote_id)


def test_a_peer_with_same_host_copies_off_is_reached_over_nixl():
    other = Peer(cluster_id=14, env={"TORCH_KVREG_SAME_HOST_COPY": "0"})
    try:
        kv.initialize(cluster_id=2, options={"llm.SyncKvCacheWaitTime": "1000"})
        assert kv.link_clusters([other.info])[0] == LLMStatusCode.LLM_SUCCESS
        engine = kv.remote.existing_engine()
        assert engine.host is not None and engine.links[14].peer_pid is None
        remote_id = other.call("register", (2, 8, BLOCK, 22, True))
        mine = [torch.zeros(8, *BLOCK, dtype=torch.float16) for _ in range(2)]
        kv.pull_kv_blocks(CacheIndex(14, remote_id), kv.register_kv_cache(mine), [1, 2], [1, 2])
        assert torch.equal(mine[1][2], paged(2, 8, BLOCK, 22)[1][2])
        assert engine.paths == {"nixl": 1}
    finally:
        kv.finalize()
        other.close()


def big_remote(peer, seed):
    """A peer cache of 64 MiB (16 tensors x 64 blocks x 64 KiB) and a local one like it."""
    remote_id = peer.call("register", (16, 64, (32, 8, 128), seed, True))
    mine = [torch.zeros(64, 32, 8, 128, dtype=torch.float16) for _ in range(16)]
    return remote_id, mine, kv.register_kv_cache(mine)


def warm_route(remote, local, routed):
    """routed: one quick pull first, so that the next transfer with these caches starts on
    the route it leaves (Engine.start_routed); returns the engine's route starts so far."""
    if routed:
        kv.pull_kv_blocks(remote, local, [0], [0])
    return kv.remote.existing_engine().routes.starts


def started_on_route(before, routed):
    return kv.remote.existing_engine().routes.starts == before + (1 if routed else 0)


@pytest.mark.parametrize("routed", [False, True])
def test_a_peer_killed_mid_copy_fails_the_transfer_at_once(monkeypatch, routed):
    doomed = Peer(cluster_id=15)
    kv.initialize(cluster_id=2, options={"llm.SyncKvCacheWaitTime": "5000"})
    try:
        assert kv.link_clusters([doomed.info])[0] == LLMStatusCode.LLM_SUCCESS
        remote_id, mine, local = big_remote(doomed, 23)
        starts = warm_route(CacheIndex(15, remote_id), local, routed)
        monkeypatch.setenv(PAUSE, "30000")  # 30 ms before each of its system calls
        transfer = kv.pull_kv_blocks_async(CacheIndex(15, remote_id), local, list(range(64)), list(range(64)))
        assert started_on_route(starts, routed)
        time.sleep(0.05)
        doomed.kill()
        start = time.monotonic()
        with pytest.raises(kv.LLMException) as failed:
            transfer.wait(10_000)
        assert failed.value.status_code == LLMStatusCode.LLM_LINK_FAILED
        assert "same-host copy (" in str(failed.value) and "with cluster 15 failed" in str(failed.value)
        assert time.monotonic() - start < 2  # not the 5 s deadline
        assert transfer.failed_blocks == list(range(64))
        assert _C.in_flight(local.cache_id) == 0
        kv.unregister_kv_cache(local)  # nothing holds it
        assert _C.peer_copy_live_jobs() == 0
    finally:
        kv.finalize()


@pytest.mark.parametrize("routed", [False, True])
def test_a_copy_past_its_deadline_times_out_and_holds_its_memory_until_it_stops(peer, monkeypatch, routed):
    kv.initialize(cluster_id=2, options={"llm.SyncKvCacheWaitTime": "300"})
    assert kv.link_clusters([peer.info])[0] == LLMStatusCode.LLM_SUCCESS
    remote_id, mine, local = big_remote(peer, 24)
    starts = warm_route(CacheIndex(13, remote_id), local, routed)
    monkeypatch.setenv(PAUSE, "250000")  # 250 ms before each system call: far past 300 ms
    transfer = kv.pull_kv_blocks_async(CacheIndex(13, remote_id), local, list(range(64)), list(range(64)))
    monkeypatch.delenv(PAUSE)
    assert started_on_route(starts, routed)
    deadline = time.monotonic() + 5
    while not transfer.done() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert transfer.status == LLMStatusCode.LLM_TIMEOUT
    assert transfer.elapsed_s < 1.5
    held = _C.in_flight(local.cache_id)
    deadline = time.monotonic() + 5
    while _C.in_flight(local.cache_id) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert held == 1 and _C.in_flight(local.cache_id) == 0  # held until its threads stopped
    assert _C.peer_copy_live_jobs() == 0 and peer.settled_leases() == {}
    kv.finalize()
    peer.call("unregister", remote_id)


@pytest.mark.parametrize("routed", [False, True])
def test_finalize_with_a_same_host_copy_in_flight_is_bounded(peer, monkeypatch, routed):
    """finalize waits for a copy in flight up to its deadline, then fails it and returns once
    the copy's threads have stopped (no memory is freed under them)."""
    kv.initialize(cluster_id=2, options={"llm.SyncKvCacheWaitTime": "1000"})
    assert kv.link_clusters([peer.info])[0] == LLMStatusCode.LLM_SUCCESS
    remote_id, mine, local = big_remote(peer, 25)
    starts = warm_route(CacheIndex(13, remote_id), local, routed)
    monkeypatch.setenv(PAUSE, "400000")  # 0.4 s before each of its system calls: seconds in all
    transfer = kv.pull_kv_blocks_async(CacheIndex(13, remote_id), local, list(range(64)), list(range(64)))
    assert started_on_route(starts, routed)
    start = time.monotonic()
    kv.finalize()
    assert time.monotonic() - start < 4
    assert transfer.status in (LLMStatusCode.LLM_TIMEOUT, LLMStatusCode.LLM_FAILED)
    assert _C.peer_copy_live_jobs() == 0
    peer.call("unregister", remote_id)


# --- routes: later transfers between the same caches start in one native call ---------------
def test_transfers_after_the_first_start_on_its_route_and_land(peer, decoder):
    remote, theirs, mine, local = mirrored(peer, 4, 32, 31)
    remote_id = remote.cache_id
    block = local.cache_desc.block_nbytes
    assert kv.pull_kv_blocks(remote, local, [0], [0]) == 4 * block  # the general path: leaves the route
    assert decoder.routes.starts == 0 and len(decoder.routes.table) == 1
    pulls = [kv.pull_kv_blocks_async(remote, local, [b], [b + 15]) for b in range(1, 17)]
    assert kv.pull_kv_blocks(remote, local, [20, 21, 22], [1, 2, 3]) == 3 * 4 * block
    assert [t.wait(5000) for t in pulls] == [4 * block] * 16
    assert decoder.routes.starts == 17
    for t in range(4):
        assert torch.equal(mine[t][16:32], theirs[t][1:17])
        assert torch.equal(mine[t][1:4], theirs[t][20:23])
    # Other layers, or the other direction, are other routes: each starts on the general path once.
    assert kv.pull_kv_blocks(remote, local, [5], [5], layers=range(1, 2)) == 2 * block
    assert kv.pull_kv_blocks(remote, local, [6], [6], layers=range(1, 2)) == 2 * block
    assert decoder.routes.starts == 18
    for t in range(4):
        mine[t][10] = 7.0 + t
    peer.call("notifications")  # drain
    kv.push_kv_blocks(local, remote, [10], [30])
    kv.push_kv_blocks_async(local, remote, [10], [31], notify="routed push").wait(5000)
    assert decoder.routes.starts == 19
    written = peer.call("read", remote_id)
    assert all(torch.all(written[t][30] == 7.0 + t) and torch.all(written[t][31] == 7.0 + t) for t in range(4))
    assert peer.call("notifications") == [(2, b"routed push")]
    assert decoder.paths == {"same_host": 22}
    assert _C.in_flight(local.cache_id) == 0 and _C.peer_copy_live_jobs() == 0
    assert not decoder.routes.busy and peer.settled_leases() == {}
    peer.call("unregister", remote_id)


def routed_error(call):
    try:
        call()
    except kv.LLMException as exc:
        return exc.status_code, str(exc)
    raise AssertionError("no error raised")


@pytest.mark.parametrize(
    "src_blocks, dst_blocks, notify, says",
    [
        ([32], [1], None, "src_blocks[0] = 32 is out of range"),
        ([1], [32], None, "dst_blocks[0] = 32 is out of range"),
        ([-1], [1], None, "src_blocks[0] = -1 is out of range"),
        ([1, 2], [1], None, "src_blocks has 2 entries but dst_blocks has 1"),
        ([1, 2], [3, 3], None, "dst_blocks names block 3 more than once"),
        ([True], [1], None, "src_blocks[0] must be an int, got bool"),
        ([1.0], [1], None, "src_blocks[0] must be an int, got float"),
        ([2**70], [1], None, "is out of range"),
        ([1], [2], "x" * 1025, "notify has 1025 bytes"),
        ([1], [2], 5, "notify must be str, bytes or None"),
    ],
)
def test_bad_input_on_a_route_gets_the_general_paths_error_and_moves_nothing(
    peer, decoder, src_blocks, dst_blocks, notify, says
):
    """A start the native route cannot take falls back to the general path: the same error
    as without any route, and nothing moved, held or left pending."""
    remote_id = peer.call("register", (2, 32, BLOCK, 32, True))
    mine = [torch.zeros(32, *BLOCK, dtype=torch.float16) for _ in range(2)]
    local = kv.register_kv_cache(mine)
    remote = CacheIndex(13, remote_id)

    def start():
        return kv.pull_kv_blocks_async(remote, local, src_blocks, dst_blocks, notify=notify)

    without_route = routed_error(start)
    kv.pull_kv_blocks(remote, local, [0], [0])
    before = [t.clone() for t in mine]
    assert len(decoder.routes.table) == 1 and decoder.routes.starts == 0
    assert routed_error(start) == without_route
    assert without_route[0] == LLMStatusCode.LLM_PARAM_INVALID and says in without_route[1]
    assert decoder.routes.starts == 0 and decoder.paths == {"same_host": 1}
    assert all(torch.equal(a, b) for a, b in zip(mine, before))
    assert _C.in_flight(local.cache_id) == 0 and _C.peer_copy_live_jobs() == 0 and not decoder.routes.busy
    # The route still serves good starts, and block lists it does not take (a tensor) go the
    # general way and land too.
    assert kv.pull_kv_blocks_async(remote, local, [3], [4]).wait(5000) > 0
    assert kv.pull_kv_blocks_async(remote, local, torch.tensor([5]), torch.tensor([6])).wait(5000) > 0
    assert decoder.routes.starts == 1 and decoder.paths == {"same_host": 3}
    theirs = paged(2, 32, BLOCK, 32)
    assert torch.equal(mine[1][4], theirs[1][3]) and torch.equal(mine[1][6], theirs[1][5])
    assert peer.settled_leases() == {}
    peer.call("unregister", remote_id)


def test_a_route_ends_with_its_lease_its_link_or_its_cache(peer, decoder):
    """Routes never outlive what they copy between: once the lease on the peer's cache has
    been given back the peer may unregister it, and the next start asks the peer again (and
    is refused); a new link or an unregistered local cache end their routes too."""
    remote_id = peer.call("register", (2, 16, BLOCK, 33, True))
    mine = [torch.zeros(16, *BLOCK, dtype=torch.float16) for _ in range(2)]
    local = kv.register_kv_cache(mine)
    remote = CacheIndex(13, remote_id)
    kv.pull_kv_blocks(remote, local, [0], [0])
    kv.pull_kv_blocks(remote, local, [1], [1])
    assert decoder.routes.starts == 1
    assert peer.settled_leases() == {}  # the lease lingered out: the route is stale now
    kv.pull_kv_blocks(remote, local, [2], [2])  # leased again on the general path: a new route
    kv.pull_kv_blocks(remote, local, [3], [3])
    assert decoder.routes.starts == 2
    assert peer.settled_leases() == {}
    peer.call("unregister", remote_id)
    before = [t.clone() for t in mine]
    with pytest.raises(kv.LLMException) as gone:
        kv.pull_kv_blocks(remote, local, [4], [4])
    assert gone.value.status_code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
    assert all(torch.equal(a, b) for a, b in zip(mine, before)) and decoder.routes.starts == 2
    assert not decoder.routes.table  # the stale route was dropped on the way

    remote_id = peer.call("register", (2, 16, BLOCK, 34, True))
    remote = CacheIndex(13, remote_id)
    kv.pull_kv_blocks(remote, local, [0], [0])
    assert kv.unlink_clusters([peer.info], force=True)[0] == LLMStatusCode.LLM_SUCCESS
    assert kv.link_clusters([peer.info])[0] == LLMStatusCode.LLM_SUCCESS
    kv.pull_kv_blocks(remote, local, [1], [1])  # a new link: the general path again
    kv.pull_kv_blocks(remote, local, [2], [2])
    assert decoder.routes.starts == 3
    kv.unregister_kv_cache(local)
    with pytest.raises(kv.LLMException) as unregistered:
        kv.pull_kv_blocks(remote, local, [3], [3])
    assert unregistered.value.status_code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
    assert decoder.routes.starts == 3 and _C.peer_copy_live_jobs() == 0
    assert peer.settled_leases() == {}
    peer.call("unregister", remote_id)


@pytest.mark.parametrize("routed", [False, True])
def test_a_wait_with_a_timeout_ends_in_that_time_and_the_copy_goes_on(peer, monkeypatch, routed):
    """wait(timeout_ms) spends its timeout once: helping with the copy counts against it."""
    with linked_to(peer, wait_ms=30_000):
        remote_id, mine, local = big_remote(peer, 36)
        remote = CacheIndex(13, remote_id)
        starts = warm_route(remote, local, routed)
        monkeypatch.setenv(PAUSE, "50000")  # 50 ms before each system call: 16 tasks, 2 threads
        transfer = kv.pull_kv_blocks_async(remote, local, list(range(64)), list(range(64)))
        monkeypatch.delenv(PAUSE)
        assert started_on_route(starts, routed)
        start = time.monotonic()
        with pytest.raises(kv.LLMException) as late:
            transfer.wait(300)
        took = time.monotonic() - start
        assert late.value.status_code == LLMStatusCode.LLM_TIMEOUT
        assert 0.3 <= took < 0.45  # at most one task past it (its waiting twice took 0.6 s)
        assert transfer.wait(30_000) == 64 * 16 * local.cache_desc.block_nbytes
        theirs = paged(16, 64, (32, 8, 128), 36)
        assert all(torch.equal(m, t) for m, t in zip(mine, theirs))
    peer.call("unregister", remote_id)


def test_threads_starting_on_one_route_each_complete_exactly_once(peer, decoder):
    """Four threads start pulls on one route at once (and one pushes on another), each
    waiting for, polling or leaving alone what it started; the route's hold is taken and
    given back many times over. Every transfer lands once, and nothing stays held."""
    import random

    remote, theirs, mine, local = mirrored(peer, 2, 64, 37)
    pushed_id = peer.call("register_zeros", (2, 64, BLOCK))
    # Everything first (the pull route): the threads' pulls then rewrite what is there, so
    # the pushes read settled blocks.
    kv.pull_kv_blocks(remote, local, list(range(64)), list(range(64)))
    kv.push_kv_blocks(local, CacheIndex(13, pushed_id), [0], [0])  # leaves the push route
    errors, transfers, pushed = [], [], set()

    def run(seed, push):
        rng = random.Random(seed)
        try:
            for round_ in range(40):
                block = 1 + (seed * 40 + round_) % 63
                if push:
                    t = kv.push_kv_blocks_async(local, CacheIndex(13, pushed_id), [block], [block])
                    pushed.add(block)
                else:
                    t = kv.pull_kv_blocks_async(remote, local, [block], [block])
                transfers.append(t)
                way = rng.randrange(3)
                if way == 0:
                    t.wait(5000)
                elif way == 1:
                    while not t.done():
                        time.sleep(0)
                if rng.random() < 0.2:
                    time.sleep(0.002)  # the route idles now and then: its hold goes and comes back
        except Exception as exc:  # reported below
            errors.append(exc)

    starts = decoder.routes.starts
    threads = [threading.Thread(target=run, args=(seed, seed == 4)) for seed in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    # (nearly) all on the routes: one whose lease lingered out meanwhile starts over once
    assert len(transfers) == 200 and decoder.routes.starts - starts >= 150
    for t in transfers:
        t.wait(5000)
    assert all(t.status == LLMStatusCode.LLM_SUCCESS for t in transfers)
    assert sum(decoder.progress.completed_by.values()) == decoder.paths["same_host"]
    for t in range(2):
        assert torch.equal(mine[t], theirs[t])
    landed, blocks = peer.call("read", pushed_id), sorted(pushed)
    assert len(blocks) == 40 and all(torch.equal(landed[t][blocks], theirs[t][blocks]) for t in range(2))
    deadline = time.monotonic() + 5
    while (decoder.routes.busy or _C.in_flight(local.cache_id)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not decoder.routes.busy and _C.in_flight(local.cache_id) == 0 and _C.peer_copy_live_jobs() == 0
    assert peer.settled_leases() == {}
    peer.call("unregister", remote.cache_id)
    peer.call("unregister", pushed_id)


@pytest.mark.parametrize("routed", [False, True])
def test_unregister_waits_for_a_same_host_copy_in_flight(peer, monkeypatch, routed):
    """Unregistering the local cache of a copy under way waits for the copy to land (nobody
    else waits for it: the progress thread completes it), then the cache is gone for good."""
    with linked_to(peer, wait_ms=5000):
        remote_id, mine, local = big_remote(peer, 38)
        remote = CacheIndex(13, remote_id)
        starts = warm_route(remote, local, routed)
        monkeypatch.setenv(PAUSE, "100000")  # 0.1 s before each system call: about 0.8 s in all
        transfer = kv.pull_kv_blocks_async(remote, local, list(range(64)), list(range(64)))
        monkeypatch.delenv(PAUSE)
        assert started_on_route(starts, routed)
        start = time.monotonic()
        kv.unregister_kv_cache(local)
        took = time.monotonic() - start
        assert transfer.status == LLMStatusCode.LLM_SUCCESS and 0.3 < took < 4
        assert all(torch.equal(m, t) for m, t in zip(mine, paged(16, 64, (32, 8, 128), 38)))
        with pytest.raises(kv.LLMException) as gone:
            kv.pull_kv_blocks(remote, local, [1], [1])
        assert gone.value.status_code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
        assert _C.peer_copy_live_jobs() == 0
    peer.call("unregister", remote_id)
