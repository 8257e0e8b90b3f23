// A validated transfer between two registered caches: byte segments applied to every tensor.
#pragma once

#include "registry.h"

#include <cstdint>
#include <vector>

namespace kvreg {

// Bytes [src_offset, src_offset + nbytes) of every src tensor go to
// [dst_offset, dst_offset + nbytes) of the matching dst tensor.
struct Segment {
  int64_t src_offset;
  int64_t dst_offset;
  int64_t nbytes;
};

// Segments longer than this are split so that threads (CPU) or thread blocks (CUDA) share
// a long run of consecutive blocks evenly.
constexpr int64_t kMaxSegmentBytes = int64_t{1} << 20;

struct CopyPlan {
  const CacheRecord* src;
  const CacheRecord* dst;
  std::vector<Segment> segments;
  int64_t total_bytes() const;  // over all tensors
};

void run_copy_cpu(const CopyPlan& plan);

#ifdef KVREG_WITH_CUDA
// Enqueues the whole plan on the current stream of the device involved: one upload of the
// plan and one kernel launch. Host memory on either side must be page-locked.
void run_copy_cuda(const CopyPlan& plan);
// Whether the current CUDA stream is capturing a graph (then nothing may synchronize).
bool current_stream_capturing();
#endif

}  // namespace kvreg
