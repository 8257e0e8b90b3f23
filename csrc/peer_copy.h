// Copies between this process and another process of the same host (process_vm_readv /
// process_vm_writev, or plain copies from a peer's memory mapped here), run by a pool of
// native threads that never touch the GIL.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace kvreg::peer_copy {

// One contiguous run: `nbytes` at `local` in this process and at `remote` in the peer.
struct Piece {
  uint64_t local = 0;
  uint64_t remote = 0;
  uint64_t nbytes = 0;
};

// Job states as Job::state()/wait() report them; a failed job reports -errno of its first
// failure (ESRCH: the peer is gone; EFAULT: memory not mapped there; EPERM: not allowed).
constexpr int64_t kRunning = 0;
constexpr int64_t kDone = 1;
constexpr int64_t kCancelled = -125;  // -ECANCELED

// One copy of `pieces` (read: peer -> here, else here -> peer), started when it is made; the
// pool's threads split the bytes between them. The handle shares the job's state with the
// threads copying for it: destroying the handle cancels a job still running and never frees
// what a thread still uses (the state goes with the last of them). The memory the pieces
// name must stay mapped until state() is no longer kRunning, cancelled or not.
class Job {
 public:
  // A `watched` job's end counts in ends() and ends wait_ends(). Raises LLM_PARAM_INVALID
  // for a pid below 1 or a piece that wraps the address space.
  Job(int64_t pid, bool read, std::vector<Piece> pieces, bool watched = true);
  // A copy between this process's memory and a peer's memory mapped into it (each piece's
  // `remote` is an address of that mapping): the kernels of copy_kv_blocks, no system
  // call. The job holds `mapping` until its last task has ended, so that dropping every
  // other reference never unmaps memory under a running copy.
  Job(std::shared_ptr<const void> mapping, bool read, std::vector<Piece> pieces, bool watched = true);
  // A copy of `nbytes` that `bodies` make in this process, one task on the pool each (a
  // transfer between geometries moving boxes of tokens over a peer's memory mapped here,
  // its boxes split into ranges): the pool's threads and a caller in help() take them as
  // they take a block copy's tasks. A body returns 0 or -errno; none runs once the job is
  // cancelled or another has failed. The job holds `mapping` until its last task has ended.
  Job(std::shared_ptr<const void> mapping, uint64_t nbytes, std::vector<std::function<int64_t()>> bodies,
      bool watched = true);
  ~Job();
  Job(const Job&) = delete;
  Job& operator=(const Job&) = delete;

  // kRunning, kDone or -errno. Raises LLM_PARAM_INVALID for a job made by the process this
  // one was forked from (its threads are not here).
  int64_t state() const;
  // Waits up to timeout_ms (< 0: without bound) for the job to end; its state then.
  int64_t wait(int64_t timeout_ms) const;
  // wait() for a caller that would rather work: runs queued tasks (the job's and those
  // before it) while there are any, then waits for the workers to finish the job, until it
  // has ended or timeout_ms (< 0: no bound) has passed; the job's state then.
  int64_t help(int64_t timeout_ms) const;
  // Asks the job to stop before its next system call; it ends cancelled unless already done.
  void cancel() const;
  // Bytes its pieces name in all.
  uint64_t nbytes() const;
  // Tasks it was split into (tests: a large job is spread over the threads).
  int64_t tasks() const;

  struct Shared;  // what the handle and the threads copying for it hold

 private:
  std::shared_ptr<Shared> shared_;
};

// Piece j of tensor t (tensor-major): lengths[j] bytes at local_bases[t] + local_offsets[j]
// here and remote_bases[t] + remote_offsets[j] there.
std::vector<Piece> segment_pieces(
    const std::vector<uint64_t>& local_bases, const std::vector<uint64_t>& remote_bases, size_t count,
    const uint64_t* local_offsets, const uint64_t* remote_offsets, const uint64_t* lengths);

// Bytes per task for a job of `nbytes` (about four tasks per worker, 256 KiB to 4 MiB):
// enough for a waiting caller to take some (help()), small enough that a deadline passes
// between two. Starts the pool's settings as threads() does.
uint64_t task_bytes(uint64_t nbytes);

// Ends wait_ends() calls early: their caller has other work.
void wake();
// How many times wake() was called: a caller reads it before it looks at its work, so that
// a wake() between that look and its wait_ends() is not lost.
int64_t wakes();
// How many watched jobs have ended so far.
int64_t ends();
// Waits up to timeout_ms (< 0: no bound) until a watched job ends or wake() is called after
// ends() and wakes() returned these counts; false on timeout. Whoever watches jobs (the
// engine's progress thread) needs no wake for a job submitted after it looked.
bool wait_ends(int64_t ends_seen, int64_t wakes_seen, int64_t timeout_ms);
// Makes wait_ends() return (true) delay_ms from now, or sooner if asked sooner, without
// waking its caller before then: the engine's progress thread looks at a burst's copies
// then rather than at once, when it would take the GIL from the thread starting them. One
// watch ends one wait_ends(). Raises LLM_PARAM_INVALID for a negative delay.
void watch(int64_t delay_ms);
// Jobs whose state is still held: by a handle, or by a thread still copying for a job
// whose handle is gone.
int64_t live_jobs();

// Reads `nbytes` (at most 4096) at `address` of process `pid` into `out`: 0, or -errno
// (-EPERM: not allowed to copy from it; -ESRCH: no such process; -EFAULT: not mapped).
int64_t peek(int64_t pid, uint64_t address, size_t nbytes, std::string& out);

// Worker threads (TORCH_KVREG_PEER_COPY_THREADS, 1 to 64; default: the cores but one, 1 to 4).
// The pool starts on the first job or call of these functions; a malformed setting makes
// that call raise LLM_PARAM_INVALID (and the next one try again).
int64_t threads();

}  // namespace kvreg::peer_copy
