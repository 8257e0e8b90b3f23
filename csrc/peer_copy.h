// Copies between this process and another process of the same host (process_vm_readv /
// process_vm_writev), run by a pool of native threads that never touch the GIL.
#pragma once

#include <cstdint>
#include <vector>

namespace kvreg::peer_copy {

// One contiguous run: `nbytes` at `local` in this process and at `remote` in the peer.
struct Piece {
  uint64_t local = 0;
  uint64_t remote = 0;
  uint64_t nbytes = 0;
};

// Job states as state()/wait() report them; a failed job reports -errno of its first
// failure (ESRCH: the peer is gone; EFAULT: memory not mapped there; EPERM: not allowed).
constexpr int64_t kRunning = 0;
constexpr int64_t kDone = 1;
constexpr int64_t kCancelled = -125;  // -ECANCELED

// Starts moving `pieces` (read: peer -> here, else here -> peer) and returns the job's id at
// once; the pool's threads split the bytes between them. Raises LLM_PARAM_INVALID for a
// pid below 1 or a piece that wraps the address space.
int64_t submit(int64_t pid, bool read, std::vector<Piece> pieces);
// The job's state now. Raises LLM_PARAM_INVALID for an unknown job.
int64_t state(int64_t job);
// Waits up to timeout_ms (< 0: without bound) for the job to end; its state then.
int64_t wait(int64_t job, int64_t timeout_ms);
// Waits up to timeout_ms for any of `jobs` to end; the first ended one found, or -1.
int64_t wait_any(const std::vector<int64_t>& jobs, int64_t timeout_ms);
// Asks a job to stop before its next system call; it ends cancelled unless already done.
void cancel(int64_t job);
// Forgets an ended job (a running one is cancelled and forgotten when it ends).
void release(int64_t job);
// Jobs submitted and not released yet.
int64_t live_jobs();

// The address of a word in this process that holds probe_magic(), for a peer to read once
// to learn whether it may copy from this process at all.
uint64_t probe_address();
uint64_t probe_magic();
// Reads the probe word of process `pid` at `address`: 0 if it holds the magic, else -errno
// (-EPERM, -ESRCH, ...) or -EINVAL for a readable word without the magic.
int64_t probe(int64_t pid, uint64_t address);

// Worker threads (TORCH_KVREG_PEER_COPY_THREADS, 1 to 64; default: the cores, 2 to 4).
int64_t threads();

}  // namespace kvreg::peer_copy
