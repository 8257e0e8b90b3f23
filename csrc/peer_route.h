// A cached same-host route: block transfers between one local cache and one leased cache of
// a peer on this host, made into same-host copy jobs.
#pragma once

#include "cache_desc.h"
#include "peer_copy.h"

#include <cstdint>
#include <memory>
#include <vector>

namespace kvreg::peer_copy {

// The tensors and descs of both sides are fixed when the route is made: a start validates
// its block lists with plan_blocks (the checks of every other path) and starts the copy in
// one call. A start it cannot take (block lists that fail a check, or nothing to move)
// returns null and moves nothing: the general path then raises the precise error or
// completes the transfer at once.
class Route {
 public:
  // read: the peer's cache (src) is copied here (dst); else here (src) to the peer (dst).
  // local_bases / remote_bases: each tensor's address here and in the peer. Raises
  // LLM_PARAM_INVALID where the tensor counts or the descs do not suit each other.
  Route(
      int64_t pid, bool read, std::vector<uint64_t> local_bases, std::vector<uint64_t> remote_bases,
      CacheDesc src, int64_t src_id, CacheDesc dst, int64_t dst_id, int64_t max_segment_bytes);

  // The started job, or null: not taken.
  std::unique_ptr<Job> start(
      std::vector<int64_t> src_blocks, std::vector<int64_t> dst_blocks, bool watched) const;

  // Bytes one block moves over all tensors.
  int64_t block_bytes() const { return src_.block_nbytes * src_.num_tensors; }

 private:
  int64_t pid_;
  bool read_;
  std::vector<uint64_t> local_bases_;
  std::vector<uint64_t> remote_bases_;
  CacheDesc src_;
  CacheDesc dst_;
  int64_t src_id_;
  int64_t dst_id_;
  int64_t max_segment_bytes_;
};

}  // namespace kvreg::peer_copy
