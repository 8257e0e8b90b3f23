// Cache geometry (block size, KV heads, layout, tensor-parallel slice) and the plans that move
// tokens between caches whose geometries differ.
#pragma once

#include "cache_desc.h"
#include "copy_plan.h"

#include <cstdint>
#include <string>
#include <vector>

namespace kvreg {

// How a registered cache holds its KV. Per layer either two tensors (K, then V) whose blocks
// are laid out by `order` over 't' (token slot), 'h' (KV head) and 'd' (head dim), outer to
// inner; or, when `order` also names 'k' (K or V), one tensor whose blocks hold both.
// "K-order/V-order" lays K out differently from V (vLLM's CPU attention keeps each head's K
// tile transposed); with 'k', both must agree up to and including it.
// The cache holds heads [tp_rank * H / tp_size, (tp_rank + 1) * H / tp_size) of the model's
// H = num_kv_heads.
struct Geometry {
  std::string order;
  int64_t block_size = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t tp_size = 1;
  int64_t tp_rank = 0;

  // The order of K (kv 0) or V (kv 1).
  std::string part(int64_t kv) const {
    const auto slash = order.find('/');
    if (slash == std::string::npos) {
      return order;
    }
    return kv == 0 ? order.substr(0, slash) : order.substr(slash + 1);
  }
  bool kv_differ() const { return part(0) != part(1); }
  bool kv_in_block() const { return part(0).find('k') != std::string::npos; }
  int64_t tensors_per_layer() const { return kv_in_block() ? 1 : 2; }
  int64_t heads_held() const { return num_kv_heads / tp_size; }
  int64_t first_head() const { return tp_rank * heads_held(); }
};

// Which tokens, layers and heads move. Token i (0-based, i < num_tokens) of the sequence sits
// in slot (src_offset + i) % B of block src_blocks[(src_offset + i) / B] of the source (B its
// block size), and lands in the same way in dst_blocks.
struct TokenSelection {
  std::vector<int64_t> src_blocks;
  std::vector<int64_t> dst_blocks;
  int64_t num_tokens = -1;  // -1: every slot of src_blocks from src_offset on
  int64_t src_offset = 0;
  int64_t dst_offset = 0;
  int64_t src_first_layer = 0;
  int64_t dst_first_layer = 0;
  int64_t num_layers = -1;  // -1: every source layer from src_first_layer on
  int64_t first_head = -1;  // model head numbers; -1: every head both caches hold
  int64_t num_heads = -1;
};

// One pair of byte bases that the plan's segments apply to: src tensor + src_shift and
// dst tensor + dst_shift (a shift selects V within a block that holds K and V).
struct Lane {
  int64_t src_tensor;
  int64_t src_shift;
  int64_t dst_tensor;
  int64_t dst_shift;
};

struct GeometryPlan {
  std::vector<Lane> lanes;        // per layer, K then V: even lanes K, odd lanes V
  std::vector<Segment> segments;  // relative to each lane's bases; the same for every lane
  // When K and V are laid out differently on either side: the segments of the V lanes
  // (`segments` then serve the K lanes only); else empty.
  std::vector<Segment> v_segments;
  int64_t num_tokens = 0;
  int64_t first_head = 0;
  int64_t num_heads = 0;
  int64_t num_layers = 0;
  int64_t nbytes() const;  // over all lanes
};

// Every check of a transfer between caches of these descs and geometries, made before any
// byte moves (LLM_PARAM_INVALID for geometries that cannot map, IndexError-type for blocks
// out of range), then its lanes and segments: runs adjacent on both sides merged, up to
// max_segment_bytes each.
// elementwise_runs false: K's or V's runs are left out where they would be single elements
// (the device copy moves those by indexing instead); with_runs false: no runs at all (the
// host copy moves boxes of tokens, geometry_copy.h).
GeometryPlan plan_geometry(
    const CacheDesc& src, const Geometry& src_geometry, const CacheDesc& dst, const Geometry& dst_geometry,
    const TokenSelection& selection, int64_t max_segment_bytes, bool elementwise_runs = true,
    bool with_runs = true);

struct BoxCopy;

// Checks and plans a host transfer between caches at these tensor addresses (the peer's
// side of a same-host transfer: its cache mapped into this process) as the box jobs of
// geometry_copy.h; `nbytes` gets the bytes they move. Raises as plan_geometry does.
std::vector<BoxCopy> plan_boxes(
    const CacheDesc& src, const std::vector<uint64_t>& src_addrs, const Geometry& src_geometry,
    const CacheDesc& dst, const std::vector<uint64_t>& dst_addrs, const Geometry& dst_geometry,
    const TokenSelection& selection, int64_t& nbytes);

// Plans and copies between two registered caches (HOST: box by box on the copy threads; or,
// with CUDA, DEVICE: the plan's runs); returns the bytes moved. The two must be different
// caches.
int64_t copy_geometry(
    int64_t src_id, const Geometry& src_geometry, int64_t dst_id, const Geometry& dst_geometry,
    const TokenSelection& selection);

}  // namespace kvreg
