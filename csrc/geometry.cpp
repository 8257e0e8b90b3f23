// The geometry checks and the token planner: which bytes of one cache's blocks go where in
// another's when block size, layout or tensor-parallel split differ.
#include "geometry.h"

#include "geometry_copy.h"
#include "registry.h"
#include "status.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace kvreg {

namespace {

bool valid_order(const std::string& order) {
  const auto has = [&](char axis) { return std::count(order.begin(), order.end(), axis) == 1; };
  const bool known = std::all_of(order.begin(), order.end(), [](char axis) {
    return axis == 'k' || axis == 't' || axis == 'h' || axis == 'd';
  });
  return known && has('t') && has('h') && has('d') && (order.size() == 3 || (order.size() == 4 && has('k')));
}

void check_geometry(const Geometry& g, const char* side) {
  const std::string k_order = g.part(0);
  const std::string v_order = g.part(1);
  const auto k_at = k_order.find('k');
  // With K and V in one block, their regions must not overlap: the axes up to 'k' agree.
  const bool parts_agree = k_order.size() == v_order.size() && k_at == v_order.find('k') &&
                           (k_at == std::string::npos || k_order.compare(0, k_at, v_order, 0, k_at) == 0);
  KVREG_CHECK_ARG(
      valid_order(k_order) && valid_order(v_order) && parts_agree &&
          std::count(g.order.begin(), g.order.end(), '/') <= 1,
      side, " layout order '", g.order,
      "' must name 't' (token), 'h' (head) and 'd' (head dim) once each, and 'k' (K or V) once when "
      "K and V share a block; 'K-order/V-order' orders that name 'k' must agree up to it");
  KVREG_CHECK_ARG(g.block_size > 0, side, " block_size must be positive, got ", g.block_size);
  KVREG_CHECK_ARG(g.num_kv_heads > 0, side, " num_kv_heads must be positive, got ", g.num_kv_heads);
  KVREG_CHECK_ARG(g.head_dim > 0, side, " head_dim must be positive, got ", g.head_dim);
  KVREG_CHECK_ARG(g.tp_size > 0, side, " tp_size must be positive, got ", g.tp_size);
  KVREG_CHECK_ARG(
      g.num_kv_heads % g.tp_size == 0, side, " tp_size ", g.tp_size, " does not divide its ", g.num_kv_heads,
      " KV heads");
  KVREG_CHECK_ARG(
      g.tp_rank >= 0 && g.tp_rank < g.tp_size, side, " tp_rank ", g.tp_rank, " is outside 0..",
      g.tp_size - 1);
}

// Byte strides of one block's axes (stride_k stays 0 when K and V are separate tensors).
struct BlockLayout {
  int64_t stride_k = 0;
  int64_t stride_t = 0;
  int64_t stride_h = 0;
  int64_t stride_d = 0;
  int64_t block_nbytes = 0;
};

BlockLayout block_layout(const Geometry& g, int64_t element_size, int64_t kv) {
  BlockLayout out;
  int64_t stride = element_size;
  const std::string order = g.part(kv);
  for (auto axis = order.rbegin(); axis != order.rend(); ++axis) {
    int64_t size = 0;
    int64_t* slot = nullptr;
    switch (*axis) {
      case 'k':
        size = 2;
        slot = &out.stride_k;
        break;
      case 't':
        size = g.block_size;
        slot = &out.stride_t;
        break;
      case 'h':
        size = g.heads_held();
        slot = &out.stride_h;
        break;
      default:
        size = g.head_dim;
        slot = &out.stride_d;
        break;
    }
    *slot = stride;
    stride = checked_mul(stride, size, "the bytes of a block");
  }
  out.block_nbytes = stride;
  return out;
}

void check_fits(const CacheDesc& desc, const Geometry& g, const BlockLayout& layout, const char* side) {
  KVREG_CHECK_ARG(
      desc.num_tensors % g.tensors_per_layer() == 0, side, " cache has ", desc.num_tensors,
      " tensors, not a whole number of layers of ", g.tensors_per_layer(), " (layout '", g.order, "')");
  KVREG_CHECK_ARG(
      desc.block_nbytes == layout.block_nbytes, side, " cache ", desc.str(), " has ", desc.block_nbytes,
      "-byte blocks, but its geometry (layout '", g.order, "', ", g.block_size, " tokens, ", g.heads_held(),
      " heads of ", g.head_dim, " ", data_type_name(static_cast<int64_t>(desc.data_type)), ") makes ",
      layout.block_nbytes, "-byte blocks");
}

void check_blocks(const std::vector<int64_t>& blocks, int64_t num_blocks, const char* name) {
  for (size_t j = 0; j < blocks.size(); ++j) {
    KVREG_CHECK_INDEX(
        blocks[j] >= 0 && blocks[j] < num_blocks, name, "[", j, "] = ", blocks[j],
        " is out of range for a cache of ", num_blocks, " blocks");
  }
}

// Appends a run, joined to the last one when it continues it on both sides.
void emit(
    std::vector<Segment>& segments, int64_t src, int64_t dst, int64_t nbytes, int64_t max_segment_bytes) {
  if (!segments.empty()) {
    Segment& last = segments.back();
    if (last.src_offset + last.nbytes == src && last.dst_offset + last.nbytes == dst &&
        last.nbytes + nbytes <= max_segment_bytes) {
      last.nbytes += nbytes;
      return;
    }
  }
  segments.push_back({src, dst, nbytes});
}

// The merged runs of one of K (kv 0) or V (kv 1), relative to the lanes' bases.
std::vector<Segment> token_runs(
    const CacheDesc& src, const Geometry& sg, const CacheDesc& dst, const Geometry& dg,
    const TokenSelection& selection, const GeometryPlan& plan, int64_t kv, int64_t max_segment_bytes) {
  const BlockLayout sl = block_layout(sg, src.element_size, kv);
  const BlockLayout dl = block_layout(dg, dst.element_size, kv);
  const int64_t n = plan.num_tokens;
  const auto& src_blocks = selection.src_blocks;
  const auto& dst_blocks = selection.dst_blocks;
  std::vector<Segment> segments;
  // Byte offset of each token's slot, at the selection's first head.
  std::vector<int64_t> src_token(static_cast<size_t>(n));
  std::vector<int64_t> dst_token(static_cast<size_t>(n));
  const int64_t src_head = (plan.first_head - sg.first_head()) * sl.stride_h;
  const int64_t dst_head = (plan.first_head - dg.first_head()) * dl.stride_h;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = selection.src_offset + i;
    const int64_t d = selection.dst_offset + i;
    src_token[i] =
        src_blocks[s / sg.block_size] * sl.block_nbytes + (s % sg.block_size) * sl.stride_t + src_head;
    dst_token[i] =
        dst_blocks[d / dg.block_size] * dl.block_nbytes + (d % dg.block_size) * dl.stride_t + dst_head;
  }
  // A unit is one head's whole vector when head_dim is innermost on both sides, else one element.
  const int64_t element_size = src.element_size;
  const bool whole_vectors = sl.stride_d == element_size && dl.stride_d == element_size;
  const int64_t unit = whole_vectors ? sg.head_dim * element_size : element_size;
  // Units are walked in the source's memory order within each source block, so that runs
  // contiguous in the source come one after the other and join where the destination agrees.
  std::vector<char> axes;
  for (char axis : sg.part(kv)) {
    if (axis != 'k' && !(axis == 'd' && whole_vectors)) {
      axes.push_back(axis);
    }
  }
  const int64_t src_stride_d = whole_vectors ? 0 : sl.stride_d;
  const int64_t dst_stride_d = whole_vectors ? 0 : dl.stride_d;
  int64_t i0 = 0;
  while (i0 < n) {
    const int64_t block_end = ((selection.src_offset + i0) / sg.block_size + 1) * sg.block_size;
    const int64_t i1 = std::min(n, block_end - selection.src_offset);
    std::array<int64_t, 3> size{};
    std::array<int64_t, 3> index{};
    for (size_t a = 0; a < axes.size(); ++a) {
      size[a] = axes[a] == 't' ? i1 - i0 : axes[a] == 'h' ? plan.num_heads : sg.head_dim;
    }
    const int depth = static_cast<int>(axes.size());
    while (true) {
      int64_t t = i0;
      int64_t h = 0;
      int64_t e = 0;
      for (int a = 0; a < depth; ++a) {
        if (axes[a] == 't') {
          t += index[a];
        } else if (axes[a] == 'h') {
          h = index[a];
        } else {
          e = index[a];
        }
      }
      emit(
          segments, src_token[t] + h * sl.stride_h + e * src_stride_d,
          dst_token[t] + h * dl.stride_h + e * dst_stride_d, unit, max_segment_bytes);
      int a = depth - 1;
      while (a >= 0 && ++index[a] == size[a]) {
        index[a] = 0;
        --a;
      }
      if (a < 0) {
        break;
      }
    }
    i0 = i1;
  }
  return segments;
}

// Whether head_dim is innermost for K (kv 0) or V (kv 1) on both sides: runs are then at
// least one head vector long; otherwise single elements (a transposed tile).
bool whole_vectors(const Geometry& sg, const Geometry& dg, int64_t kv) {
  return sg.part(kv).back() == 'd' && dg.part(kv).back() == 'd';
}

// One lane's tensor as (blocks, token slots, heads held, head dim), its bytes as integers of
// the element's size (the copy is bit-exact whatever the dtype).
at::Tensor lane_view(const CacheDesc& desc, const Geometry& g, uint64_t base, int64_t kv) {
  const BlockLayout layout = block_layout(g, desc.element_size, kv);
  const int64_t e = desc.element_size;
  const at::ScalarType raw = e == 1 ? at::kByte : e == 2 ? at::kShort : e == 4 ? at::kInt : at::kLong;
  const at::Device device =
      desc.placement == Placement::HOST ? at::Device(at::kCPU) : at::Device(at::kCUDA, desc.device_index);
  return at::from_blob(
      reinterpret_cast<void*>(base), {desc.num_blocks(), g.block_size, g.heads_held(), g.head_dim},
      {layout.block_nbytes / e, layout.stride_t / e, layout.stride_h / e, layout.stride_d / e},
      at::TensorOptions().dtype(raw).device(device));
}

// The lanes of one of K or V whose runs are single elements: gathered and scattered by ATen's
// indexing kernels, one call per lane, instead of one copy per element.
void copy_elementwise(
    const CacheRecord& src, const Geometry& sg, const CacheRecord& dst, const Geometry& dg,
    const TokenSelection& selection, const GeometryPlan& plan, int64_t kv) {
  const int64_t n = plan.num_tokens;
  at::Tensor src_block = at::empty({n}, at::kLong);
  at::Tensor src_slot = at::empty({n}, at::kLong);
  at::Tensor dst_block = at::empty({n}, at::kLong);
  at::Tensor dst_slot = at::empty({n}, at::kLong);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = selection.src_offset + i;
    const int64_t d = selection.dst_offset + i;
    src_block.data_ptr<int64_t>()[i] = selection.src_blocks[s / sg.block_size];
    src_slot.data_ptr<int64_t>()[i] = s % sg.block_size;
    dst_block.data_ptr<int64_t>()[i] = selection.dst_blocks[d / dg.block_size];
    dst_slot.data_ptr<int64_t>()[i] = d % dg.block_size;
  }
  const at::Device src_device = src.desc.placement == Placement::HOST
                                    ? at::Device(at::kCPU)
                                    : at::Device(at::kCUDA, src.desc.device_index);
  const at::Device dst_device = dst.desc.placement == Placement::HOST
                                    ? at::Device(at::kCPU)
                                    : at::Device(at::kCUDA, dst.desc.device_index);
  src_block = src_block.to(src_device);
  src_slot = src_slot.to(src_device);
  dst_block = dst_block.to(dst_device);
  dst_slot = dst_slot.to(dst_device);
  for (size_t i = static_cast<size_t>(kv); i < plan.lanes.size(); i += 2) {
    const Lane& lane = plan.lanes[i];
    const at::Tensor from =
        lane_view(src.desc, sg, src.addrs[lane.src_tensor] + static_cast<uint64_t>(lane.src_shift), kv)
            .narrow(2, plan.first_head - sg.first_head(), plan.num_heads);
    at::Tensor to =
        lane_view(dst.desc, dg, dst.addrs[lane.dst_tensor] + static_cast<uint64_t>(lane.dst_shift), kv)
            .narrow(2, plan.first_head - dg.first_head(), plan.num_heads);
    to.index_put_({dst_block, dst_slot}, from.index({src_block, src_slot}).to(dst_device));
  }
}

// The host copy of one of K (kv 0) or V, or of both when they are laid out alike: the lanes'
// bases, and the tokens cut where a source or a destination block ends, each piece a box.
BoxCopy box_job(
    const CacheRecord& src, const Geometry& sg, const CacheRecord& dst, const Geometry& dg,
    const TokenSelection& selection, const GeometryPlan& plan, int64_t kv, bool both) {
  const BlockLayout sl = block_layout(sg, src.desc.element_size, kv);
  const BlockLayout dl = block_layout(dg, dst.desc.element_size, kv);
  BoxCopy job;
  job.strides = {sl.stride_t, sl.stride_h, sl.stride_d, dl.stride_t, dl.stride_h, dl.stride_d};
  job.heads = plan.num_heads;
  job.head_dim = sg.head_dim;
  job.element_size = src.desc.element_size;
  for (size_t i = 0; i < plan.lanes.size(); ++i) {
    if (!both && static_cast<int64_t>(i % 2) != kv) {
      continue;
    }
    const Lane& lane = plan.lanes[i];
    job.src_bases.push_back(reinterpret_cast<const char*>(src.addrs[lane.src_tensor] + lane.src_shift));
    job.dst_bases.push_back(reinterpret_cast<char*>(dst.addrs[lane.dst_tensor] + lane.dst_shift));
  }
  const int64_t src_head = sl.stride_h * (plan.first_head - sg.first_head());
  const int64_t dst_head = dl.stride_h * (plan.first_head - dg.first_head());
  if (gathers(job.strides, job.element_size)) {
    // Chunks end only where destination blocks do; each token's source row is its own.
    job.token_src.resize(static_cast<size_t>(plan.num_tokens));
    for (int64_t i = 0; i < plan.num_tokens; ++i) {
      const int64_t s = selection.src_offset + i;
      job.token_src[i] = selection.src_blocks[s / sg.block_size] * sl.block_nbytes +
                         (s % sg.block_size) * sl.stride_t + src_head;
    }
    for (int64_t i = 0; i < plan.num_tokens;) {
      const int64_t d = selection.dst_offset + i;
      const int64_t count = std::min(dg.block_size - d % dg.block_size, plan.num_tokens - i);
      job.chunks.push_back(
          {0,
           selection.dst_blocks[d / dg.block_size] * dl.block_nbytes + (d % dg.block_size) * dl.stride_t +
               dst_head,
           count, i});
      i += count;
    }
    return job;
  }
  for (int64_t i = 0; i < plan.num_tokens;) {
    const int64_t s = selection.src_offset + i;
    const int64_t d = selection.dst_offset + i;
    const int64_t count =
        std::min({sg.block_size - s % sg.block_size, dg.block_size - d % dg.block_size, plan.num_tokens - i});
    job.chunks.push_back(
        {selection.src_blocks[s / sg.block_size] * sl.block_nbytes + (s % sg.block_size) * sl.stride_t +
             src_head,
         selection.dst_blocks[d / dg.block_size] * dl.block_nbytes + (d % dg.block_size) * dl.stride_t +
             dst_head,
         count});
    i += count;
  }
  return job;
}

// The box jobs of a host copy: K and V apart when either side lays them out differently.
std::vector<BoxCopy> box_jobs(
    const CacheRecord& src, const Geometry& sg, const CacheRecord& dst, const Geometry& dg,
    const TokenSelection& selection, const GeometryPlan& plan) {
  const bool apart = sg.kv_differ() || dg.kv_differ();
  std::vector<BoxCopy> jobs;
  for (int64_t kv = 0; kv < (apart ? 2 : 1) && plan.num_tokens > 0; ++kv) {
    jobs.push_back(box_job(src, sg, dst, dg, selection, plan, kv, !apart));
  }
  return jobs;
}

// The bytes a plan moves: tokens x heads x head vector, over every lane.
int64_t plan_bytes(const GeometryPlan& plan, const Geometry& sg, int64_t element_size) {
  return checked_mul(
      checked_mul(plan.num_tokens, plan.num_heads, "the bytes of a plan"),
      checked_mul(sg.head_dim * element_size, static_cast<int64_t>(plan.lanes.size()), "the bytes of a plan"),
      "the bytes of a plan");
}

// TORCH_KVREG_GEOMETRY_COPY=runs moves host transfers as the device path does (the plan's
// runs, single elements by indexing): the A/B baseline of benchmarks/bench_geometry.py.
bool host_boxes() {
  const char* value = std::getenv("TORCH_KVREG_GEOMETRY_COPY");
  return value == nullptr || std::strcmp(value, "runs") != 0;
}

}  // namespace

int64_t GeometryPlan::nbytes() const {
  const auto sum = [](const std::vector<Segment>& runs) {
    int64_t bytes = 0;
    for (const Segment& segment : runs) {
      bytes = checked_add(bytes, segment.nbytes, "the bytes of a plan");
    }
    return bytes;
  };
  const int64_t k_bytes = sum(segments);
  const int64_t v_bytes = v_segments.empty() ? k_bytes : sum(v_segments);
  const auto pairs = static_cast<int64_t>(lanes.size() / 2);
  return checked_add(
      checked_mul(k_bytes, pairs, "the bytes of a plan"), checked_mul(v_bytes, pairs, "the bytes of a plan"),
      "the bytes of a plan");
}

GeometryPlan plan_geometry(
    const CacheDesc& src, const Geometry& sg, const CacheDesc& dst, const Geometry& dg,
    const TokenSelection& selection, int64_t max_segment_bytes, bool elementwise_runs, bool with_runs) {
  check_geometry(sg, "src");
  check_geometry(dg, "dst");
  KVREG_CHECK_ARG(
      src.data_type == dst.data_type, "src cache has data_type ",
      data_type_name(static_cast<int64_t>(src.data_type)), " but dst cache has ",
      data_type_name(static_cast<int64_t>(dst.data_type)));
  KVREG_CHECK_ARG(
      sg.head_dim == dg.head_dim, "src head_dim ", sg.head_dim, " differs from dst head_dim ", dg.head_dim);
  KVREG_CHECK_ARG(
      sg.num_kv_heads == dg.num_kv_heads, "src has ", sg.num_kv_heads, " KV heads in all, dst ",
      dg.num_kv_heads, ": not the same model");
  KVREG_CHECK_ARG(max_segment_bytes > 0, "max_segment_bytes must be positive, got ", max_segment_bytes);
  const BlockLayout sl = block_layout(sg, src.element_size, 0);
  const BlockLayout dl = block_layout(dg, dst.element_size, 0);
  check_fits(src, sg, sl, "src");
  check_fits(dst, dg, dl, "dst");

  GeometryPlan plan;
  // Layers.
  const int64_t src_layers = src.num_tensors / sg.tensors_per_layer();
  const int64_t dst_layers = dst.num_tensors / dg.tensors_per_layer();
  const int64_t sfl = selection.src_first_layer;
  const int64_t dfl = selection.dst_first_layer;
  KVREG_CHECK_ARG(
      sfl >= 0 && sfl < src_layers, "src first layer ", sfl, " is outside the src cache's ", src_layers,
      " layers");
  KVREG_CHECK_ARG(
      dfl >= 0 && dfl < dst_layers, "dst first layer ", dfl, " is outside the dst cache's ", dst_layers,
      " layers");
  plan.num_layers = selection.num_layers == -1 ? src_layers - sfl : selection.num_layers;
  KVREG_CHECK_ARG(
      plan.num_layers > 0 && plan.num_layers <= src_layers - sfl && plan.num_layers <= dst_layers - dfl,
      plan.num_layers, " layers from src layer ", sfl, " to dst layer ", dfl, " do not fit the src cache's ",
      src_layers, " and the dst cache's ", dst_layers, " layers");

  // Heads: those both caches hold, or the caller's subset of them.
  const int64_t shared_first = std::max(sg.first_head(), dg.first_head());
  const int64_t shared_stop = std::min(sg.first_head() + sg.heads_held(), dg.first_head() + dg.heads_held());
  KVREG_CHECK_ARG(
      shared_first < shared_stop, "src holds KV heads ", sg.first_head(), "..",
      sg.first_head() + sg.heads_held() - 1, " (tp rank ", sg.tp_rank, " of ", sg.tp_size, "), dst holds ",
      dg.first_head(), "..", dg.first_head() + dg.heads_held() - 1, " (tp rank ", dg.tp_rank, " of ",
      dg.tp_size, "): none in common");
  plan.first_head = selection.first_head == -1 ? shared_first : selection.first_head;
  plan.num_heads = selection.num_heads == -1 ? shared_stop - plan.first_head : selection.num_heads;
  KVREG_CHECK_ARG(
      plan.first_head >= shared_first && plan.num_heads > 0 &&
          plan.num_heads <= shared_stop - plan.first_head,
      "heads ", plan.first_head, "..", plan.first_head + plan.num_heads - 1,
      " are not all held by both caches (", shared_first, "..", shared_stop - 1, " are)");

  // Tokens.
  const auto& src_blocks = selection.src_blocks;
  const auto& dst_blocks = selection.dst_blocks;
  check_blocks(src_blocks, src.num_blocks(), "src_blocks");
  check_blocks(dst_blocks, dst.num_blocks(), "dst_blocks");
  KVREG_CHECK_ARG(
      selection.src_offset >= 0 && selection.dst_offset >= 0,
      "token offsets must not be negative, got src_offset ", selection.src_offset, " and dst_offset ",
      selection.dst_offset);
  const int64_t src_slots = checked_mul(static_cast<int64_t>(src_blocks.size()), sg.block_size, "src slots");
  const int64_t dst_slots = checked_mul(static_cast<int64_t>(dst_blocks.size()), dg.block_size, "dst slots");
  const int64_t n = selection.num_tokens == -1 ? src_slots - selection.src_offset : selection.num_tokens;
  KVREG_CHECK_ARG(n >= 0, "num_tokens must be -1 or at least 0, got ", selection.num_tokens);
  KVREG_CHECK_ARG(
      selection.src_offset <= src_slots - n, n, " tokens from slot ", selection.src_offset, " do not fit in ",
      src_blocks.size(), " src blocks of ", sg.block_size, " tokens");
  KVREG_CHECK_ARG(
      selection.dst_offset <= dst_slots - n, n, " tokens from slot ", selection.dst_offset, " do not fit in ",
      dst_blocks.size(), " dst blocks of ", dg.block_size, " tokens");
  plan.num_tokens = n;
  if (n > 0) {
    // Each destination block written once.
    const auto first = dst_blocks.begin() + selection.dst_offset / dg.block_size;
    const auto stop = dst_blocks.begin() + (selection.dst_offset + n - 1) / dg.block_size + 1;
    std::vector<int64_t> written(first, stop);
    std::sort(written.begin(), written.end());
    const auto repeat = std::adjacent_find(written.begin(), written.end());
    KVREG_CHECK_ARG(repeat == written.end(), "dst_blocks names block ", *repeat, " more than once");
  }

  // Lanes: per layer, K then V.
  for (int64_t layer = 0; layer < plan.num_layers; ++layer) {
    for (int64_t kv = 0; kv < 2; ++kv) {
      const int64_t s_layer = sfl + layer;
      const int64_t d_layer = dfl + layer;
      plan.lanes.push_back(
          {sg.kv_in_block() ? s_layer : 2 * s_layer + kv, kv * sl.stride_k,
           dg.kv_in_block() ? d_layer : 2 * d_layer + kv, kv * dl.stride_k});
    }
  }
  if (n == 0 || !with_runs) {
    return plan;
  }

  // The runs of K (kv 0), and of V (kv 1) when either side lays V out differently.
  if (elementwise_runs || whole_vectors(sg, dg, 0)) {
    plan.segments = token_runs(src, sg, dst, dg, selection, plan, 0, max_segment_bytes);
  }
  if ((sg.kv_differ() || dg.kv_differ()) && (elementwise_runs || whole_vectors(sg, dg, 1))) {
    plan.v_segments = token_runs(src, sg, dst, dg, selection, plan, 1, max_segment_bytes);
  }
  return plan;
}

std::vector<BoxCopy> plan_boxes(
    const CacheDesc& src, const std::vector<uint64_t>& src_addrs, const Geometry& src_geometry,
    const CacheDesc& dst, const std::vector<uint64_t>& dst_addrs, const Geometry& dst_geometry,
    const TokenSelection& selection, int64_t& nbytes) {
  KVREG_CHECK_ARG(
      src.placement == Placement::HOST && dst.placement == Placement::HOST,
      "box copies between geometries are host copies");
  KVREG_CHECK_ARG(
      static_cast<int64_t>(src_addrs.size()) == src.num_tensors &&
          static_cast<int64_t>(dst_addrs.size()) == dst.num_tensors,
      "box copies between geometries: ", src_addrs.size(), " and ", dst_addrs.size(),
      " tensor addresses for caches of ", src.num_tensors, " and ", dst.num_tensors, " tensors");
  const GeometryPlan plan =
      plan_geometry(src, src_geometry, dst, dst_geometry, selection, kMaxSegmentBytes, false, false);
  CacheRecord src_record;
  src_record.desc = src;
  src_record.addrs = src_addrs;
  CacheRecord dst_record;
  dst_record.desc = dst;
  dst_record.addrs = dst_addrs;
  nbytes = plan_bytes(plan, src_geometry, src.element_size);
  return box_jobs(src_record, src_geometry, dst_record, dst_geometry, selection, plan);
}

int64_t copy_geometry(
    int64_t src_id, const Geometry& src_geometry, int64_t dst_id, const Geometry& dst_geometry,
    const TokenSelection& selection) {
  Registry::instance().require_initialized();
  KVREG_CHECK_ARG(
      src_id != dst_id, "a transfer between geometries reads and writes two caches; cache ", src_id,
      " is given as both");
  // The lease keeps both caches registered until the copy has been issued.
  auto lease = Registry::instance().lease({src_id, dst_id});
  const CacheRecord& src = lease[0];
  const CacheRecord& dst = lease[1];
  const bool boxes =
      src.desc.placement == Placement::HOST && dst.desc.placement == Placement::HOST && host_boxes();
  GeometryPlan plan = plan_geometry(
      src.desc, src_geometry, dst.desc, dst_geometry, selection, kMaxSegmentBytes, false, !boxes);
  // One record per side whose "tensors" are the lanes' bases, so that the block-copy machinery
  // (threads, streaming stores, CUDA kernel) moves every segment of every lane; K and V lanes
  // apart when their segments differ.
  const int64_t nbytes = plan_bytes(plan, src_geometry, src.desc.element_size);
  const bool apart = src_geometry.kv_differ() || dst_geometry.kv_differ();
  if (boxes) {
    copy_boxes(box_jobs(src, src_geometry, dst, dst_geometry, selection, plan));
    return nbytes;
  }
  for (int64_t kv = 0; kv < (apart ? 2 : 1); ++kv) {
    if (plan.num_tokens > 0 && !whole_vectors(src_geometry, dst_geometry, kv) &&
        (apart || !whole_vectors(src_geometry, dst_geometry, 1))) {
      copy_elementwise(src, src_geometry, dst, dst_geometry, selection, plan, kv);
      if (!apart) {
        copy_elementwise(src, src_geometry, dst, dst_geometry, selection, plan, 1);
      }
      continue;
    }
    CacheRecord src_lanes = src;
    CacheRecord dst_lanes = dst;
    src_lanes.addrs.clear();
    dst_lanes.addrs.clear();
    for (size_t i = 0; i < plan.lanes.size(); ++i) {
      if (apart && static_cast<int64_t>(i % 2) != kv) {
        continue;
      }
      const Lane& lane = plan.lanes[i];
      src_lanes.addrs.push_back(src.addrs[lane.src_tensor] + static_cast<uint64_t>(lane.src_shift));
      dst_lanes.addrs.push_back(dst.addrs[lane.dst_tensor] + static_cast<uint64_t>(lane.dst_shift));
    }
    src_lanes.desc.num_tensors = dst_lanes.desc.num_tensors = static_cast<int64_t>(src_lanes.addrs.size());
    run_copy({&src_lanes, &dst_lanes, kv == 0 ? plan.segments : plan.v_segments});
  }
  return nbytes;
}

}  // namespace kvreg
