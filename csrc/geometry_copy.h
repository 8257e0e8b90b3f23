// The host kernels of a transfer between caches of different geometry: the tokens of one
// source block that land in one destination block form a box (tokens x heads x head dim)
// whose bytes are strided differently on the two sides; boxes are copied whole, in
// parallel over the copy threads.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace kvreg {

// Byte strides of a box's token, head and dim axes on each side.
struct BoxStrides {
  int64_t src_t;
  int64_t src_h;
  int64_t src_d;
  int64_t dst_t;
  int64_t dst_h;
  int64_t dst_d;
};

// `tokens` consecutive tokens that sit in one source block and one destination block:
// byte offsets of the first token's first head from the lanes' bases. Or, with first_token
// >= 0, tokens of one destination block gathered from wherever BoxCopy::token_src says
// (src_offset unused): a transpose whose destination is dense along tokens then writes
// whole lines however small the source blocks are.
struct TokenChunk {
  int64_t src_offset;
  int64_t dst_offset;
  int64_t tokens;
  int64_t first_token = -1;
};

// One of K or V: every lane (src base, dst base) gets every chunk, as boxes of
// chunk.tokens x heads x head_dim elements of element_size bytes.
struct BoxCopy {
  std::vector<const char*> src_bases;
  std::vector<char*> dst_bases;
  std::vector<TokenChunk> chunks;
  std::vector<int64_t> token_src;  // gathered chunks: each token's source offset
  BoxStrides strides;
  int64_t heads;
  int64_t head_dim;
  int64_t element_size;
};

// How the kernel moves a box: contiguous rows (a head vector or longer on both sides), a
// tiled transpose (the innermost axes differ), or element by element (neither innermost
// axis is dense on both sides, e.g. K and V interleaved per element).
enum class BoxPath : int { kRows = 0, kTranspose = 1, kElements = 2 };

// Whether chunks of these strides are gathered (TokenChunk::first_token): the destination
// dense along tokens, the source along heads or dims.
bool gathers(const BoxStrides& strides, int64_t element_size);

// Copies every box of every job on the host's threads (the calling thread alone in a forked
// child, or when copy_strategy() says ":single"); streaming stores where copy_strategy()
// is not "memcpy".
void copy_boxes(const std::vector<BoxCopy>& jobs);

// The boxes of copy_boxes in its order, for callers that bring their own threads (the
// same-host copy pool, with a peer's cache mapped here): split into ranges of boxes, each
// range copied whole by whichever thread takes it.
class BoxWork {
 public:
  explicit BoxWork(std::vector<BoxCopy> jobs);
  // Ranges [begin, end) of boxes, in order, of about `task_bytes` each (a box is never cut).
  std::vector<std::pair<int64_t, int64_t>> split(int64_t task_bytes) const;
  // Copies boxes [begin, end) on the calling thread.
  void copy(int64_t begin, int64_t end) const;
  int64_t boxes() const { return static_cast<int64_t>(order_.size()); }
  int64_t nbytes() const { return nbytes_; }
  const std::vector<BoxCopy>& jobs() const { return jobs_; }

  struct Item {  // one box: a chunk of one job on one of its lanes
    int32_t job;
    int32_t lane;
    int64_t chunk;
  };

 private:
  std::vector<BoxCopy> jobs_;
  std::vector<Item> order_;
  int64_t nbytes_ = 0;
};

// Test and benchmark hook: with `on`, the former kernels: boxes job by job (all of K, then
// all of V) instead of K's and V's boxes of the same tokens side by side, and rows copied
// without prefetching the next row.
void test_force_former_kernels(bool on);

// Boxes copied per path since the process started (tests read which kernels they reached).
std::vector<int64_t> box_path_counts();

}  // namespace kvreg
