// Host-to-host copies of runs of bytes with copy_kv_blocks' kernels, for callers that bring
// their own threads (the same-host copy pool, copying from a peer's cache mapped here).
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvreg {

// nbytes at src go to dst.
struct HostRun {
  const char* src;
  char* dst;
  int64_t nbytes;
};

// Copies the runs in order on the calling thread, with the strategy copy_kv_blocks uses
// (copy_strategy(); streaming stores until a large local copy has measured).
void copy_host_runs(const HostRun* runs, size_t count);

}  // namespace kvreg
