// Calls from the C++ API (llm_datadist.cpp) into the Python layer, installed by torch_kvreg._C.
#pragma once

#include "options.h"

#include <cstdint>
#include <string>
#include <vector>

namespace kvreg {

// One remote transfer, as the Python layer's transfer_blocks / transfer_slice take it.
// Layer ranges are half-open [first, stop); stop 0 means every layer.
struct RemoteTransfer {
  bool pull = true;
  bool blocks = true;
  uint64_t cluster_id = 0;
  int64_t remote_cache_id = 0;
  int64_t local_cache_id = 0;
  std::vector<int64_t> src_blocks;
  std::vector<int64_t> dst_blocks;
  int64_t remote_index = 0;
  int64_t local_index = 0;
  int64_t size = -1;
  int64_t local_first_layer = 0, local_stop_layer = 0;
  int64_t remote_first_layer = 0, remote_stop_layer = 0;
  int64_t tensors_per_layer = 2;
  bool verify = false;  // KvCacheExtParam::verify (else the process option decides)
};

// Each returns an LLM status (0: success). A null member: no Python in this process.
// Options are native ones (native_options_from_upstream).
struct RemoteHooks {
  uint32_t (*initialize)(uint64_t cluster_id, int64_t role, const Options& options) = nullptr;
  void (*finalize)() = nullptr;
  uint32_t (*set_role)(int64_t role, const Options& options) = nullptr;
  uint32_t (*link)(uint64_t cluster_id, const std::string& ip, int64_t port, int64_t timeout_ms) = nullptr;
  uint32_t (*unlink)(uint64_t cluster_id, int64_t timeout_ms, bool force) = nullptr;
  uint32_t (*transfer)(const RemoteTransfer& transfer) = nullptr;
};

void set_remote_hooks(const RemoteHooks& hooks);
RemoteHooks remote_hooks();

// Whether at::parallel_for runs on several threads in the core library (OpenMP build).
bool built_with_openmp();

}  // namespace kvreg
