// Same-host routes: a transfer's block lists planned and started as one copy job.
#include "peer_route.h"

#include "copy_plan.h"
#include "status.h"

#include <exception>
#include <utility>

namespace kvreg::peer_copy {

Route::Route(
    int64_t pid, bool read, std::vector<uint64_t> local_bases, std::vector<uint64_t> remote_bases,
    CacheDesc src, int64_t src_id, CacheDesc dst, int64_t dst_id, int64_t max_segment_bytes)
    : pid_(pid),
      read_(read),
      local_bases_(std::move(local_bases)),
      remote_bases_(std::move(remote_bases)),
      src_(std::move(src)),
      dst_(std::move(dst)),
      src_id_(src_id),
      dst_id_(dst_id),
      max_segment_bytes_(max_segment_bytes) {
  KVREG_CHECK_ARG(
      local_bases_.size() == remote_bases_.size() &&
          static_cast<int64_t>(local_bases_.size()) == src_.num_tensors &&
          src_.num_tensors == dst_.num_tensors,
      "peer route: ", local_bases_.size(), " local and ", remote_bases_.size(),
      " remote tensors for descs of ", src_.num_tensors, " and ", dst_.num_tensors);
  // The descs must suit each other: plan an empty transfer once (it raises otherwise).
  plan_blocks(src_, src_id_, dst_, dst_id_, false, {}, {}, max_segment_bytes_);
}

std::unique_ptr<Job> Route::start(
    std::vector<int64_t> src_blocks, std::vector<int64_t> dst_blocks, bool watched) const {
  std::vector<Segment> segments;
  try {
    segments = plan_blocks(
        src_, src_id_, dst_, dst_id_, false, std::move(src_blocks), std::move(dst_blocks),
        max_segment_bytes_);
  } catch (const std::exception&) {
    return nullptr;
  }
  if (segments.empty()) {
    return nullptr;
  }
  std::vector<uint64_t> local(segments.size());
  std::vector<uint64_t> remote(segments.size());
  std::vector<uint64_t> lengths(segments.size());
  for (size_t j = 0; j < segments.size(); ++j) {
    const auto src_offset = static_cast<uint64_t>(segments[j].src_offset);
    const auto dst_offset = static_cast<uint64_t>(segments[j].dst_offset);
    local[j] = read_ ? dst_offset : src_offset;
    remote[j] = read_ ? src_offset : dst_offset;
    lengths[j] = static_cast<uint64_t>(segments[j].nbytes);
  }
  return std::make_unique<Job>(
      pid_, read_,
      segment_pieces(
          local_bases_, remote_bases_, segments.size(), local.data(), remote.data(), lengths.data()),
      watched);
}

}  // namespace kvreg::peer_copy
