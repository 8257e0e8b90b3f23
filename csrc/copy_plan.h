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

// Every check of a block transfer, made before any byte moves, then the segments: pairs
// sorted by source block, runs of consecutive pairs coalesced up to max_segment_bytes.
// Used by the local copy and, through the bindings, by the remote path (whose other side
// is a desc received from a peer). same_cache: src and dst are one cache, so no block may
// be both read and written. Ids only name the caches in messages.
std::vector<Segment> plan_blocks(
    const CacheDesc& src, int64_t src_id, const CacheDesc& dst, int64_t dst_id, bool same_cache,
    std::vector<int64_t> src_blocks, std::vector<int64_t> dst_blocks, int64_t max_segment_bytes);
// copy_kv_cache's form: size bytes (-1: to the end) from byte offset of one slice.
std::vector<Segment> plan_slice(
    const CacheDesc& src, int64_t src_id, const CacheDesc& dst, int64_t dst_id, bool same_cache,
    int64_t src_batch_index, int64_t dst_batch_index, int64_t offset, int64_t size);
// A block list (int32/int64, CPU or device, at most 1-D) as int64 values on the host.
std::vector<int64_t> block_indices(const at::Tensor& blocks, const char* name);
// The record of a cache with just `tensors` of it, in that order (empty: all of them, as
// they are): what a copy or a checksum of a tensor selection reads, so that the plan's
// checks compare the selections. An index out of range: LLM_PARAM_INVALID (IndexError-type)
// naming `name`[i].
CacheRecord select_tensors(const CacheRecord& record, const std::vector<int64_t>& tensors, const char* name);
// Whether this process is a child forked after its parent ran a parallel region: GNU OpenMP
// cannot start one there (the child hangs), so host copies and checksums run on the calling
// thread. One pthread_atfork handler (copy_blocks.cpp) serves every host kernel.
bool in_forked_child();

void run_copy_cpu(const CopyPlan& plan);
// Runs a plan where its memory lies: on the host's threads, or (with CUDA) on the device.
void run_copy(const CopyPlan& plan);

#ifdef KVREG_WITH_CUDA
// Enqueues the whole plan on the current stream of the device involved: one upload of the
// plan and one kernel launch. Host memory on either side must be page-locked.
void run_copy_cuda(const CopyPlan& plan);
// Whether the current CUDA stream is capturing a graph (then nothing may synchronize).
bool current_stream_capturing();
#endif

}  // namespace kvreg
