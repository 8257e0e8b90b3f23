// The Python bindings of the geometry planner: plans as tensors, local copies without the GIL.
#include "geometry_bindings.h"

#include "cache_desc.h"
#include "geometry.h"
#include "geometry_copy.h"
#include "peer_copy.h"
#include "shared_memory.h"
#include "status.h"

#include <ATen/ops/empty.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <atomic>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

namespace kvreg {
namespace {

// The test hook's switch back to one task per mapped transfer between geometries.
std::atomic<bool> one_geometry_task{false};

// (num_tensors, data_type, shape, placement, device_index), as Python's CacheDesc holds it.
using DescFields = std::tuple<int64_t, int64_t, std::vector<int64_t>, int64_t, int64_t>;
// (order, block_size, num_kv_heads, head_dim, tp_size, tp_rank), as KVGeometry.fields() gives it.
using GeometryFields = std::tuple<std::string, int64_t, int64_t, int64_t, int64_t, int64_t>;
// (num_tokens, src_offset, dst_offset, src_first_layer, dst_first_layer, num_layers,
//  first_head, num_heads): TokenSelection without its block lists.
using SelectionFields = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

static_assert(
    sizeof(Lane) == 4 * sizeof(int64_t) && sizeof(Segment) == 3 * sizeof(int64_t),
    "rows are copied as int64");

Geometry geometry_from(const GeometryFields& fields) {
  Geometry g;
  std::tie(g.order, g.block_size, g.num_kv_heads, g.head_dim, g.tp_size, g.tp_rank) = fields;
  return g;
}

TokenSelection selection_from(
    const at::Tensor& src_blocks, const at::Tensor& dst_blocks, const SelectionFields& fields) {
  TokenSelection s;
  s.src_blocks = block_indices(src_blocks, "src_blocks");
  s.dst_blocks = block_indices(dst_blocks, "dst_blocks");
  std::tie(
      s.num_tokens, s.src_offset, s.dst_offset, s.src_first_layer, s.dst_first_layer, s.num_layers,
      s.first_head, s.num_heads) = fields;
  return s;
}

// A plan as Python sees it: lanes (src_tensor, src_shift, dst_tensor, dst_shift) x M and
// segments (src_offset, dst_offset, nbytes) x N as int64 tensors, and what was selected.
struct PlanRecord {
  at::Tensor lanes;
  at::Tensor segments;
  at::Tensor v_segments;  // (0, 3) unless K and V are laid out differently on either side
  int64_t num_tokens;
  int64_t first_head;
  int64_t num_heads;
  int64_t num_layers;
};

CacheDesc desc_from(const DescFields& fields) {
  return CacheDesc::validated(
      std::get<0>(fields), std::get<1>(fields), std::get<2>(fields), std::get<3>(fields),
      std::get<4>(fields));
}

}  // namespace

void bind_geometry(py::module_& m) {
  py::class_<PlanRecord>(
      m, "GeometryPlan", "A checked plan between caches of different geometry (kvreg::GeometryPlan).",
      py::module_local())
      .def_readonly("lanes", &PlanRecord::lanes)
      .def_readonly("segments", &PlanRecord::segments)
      .def_readonly("v_segments", &PlanRecord::v_segments)
      .def_readonly("num_tokens", &PlanRecord::num_tokens)
      .def_readonly("first_head", &PlanRecord::first_head)
      .def_readonly("num_heads", &PlanRecord::num_heads)
      .def_readonly("num_layers", &PlanRecord::num_layers);
  m.def(
      "plan_geometry",
      [](const DescFields& src, const GeometryFields& src_geometry, const DescFields& dst,
         const GeometryFields& dst_geometry, const at::Tensor& src_blocks, const at::Tensor& dst_blocks,
         const SelectionFields& selection, int64_t max_segment_bytes) {
        const GeometryPlan plan = plan_geometry(
            desc_from(src), geometry_from(src_geometry), desc_from(dst), geometry_from(dst_geometry),
            selection_from(src_blocks, dst_blocks, selection), max_segment_bytes);
        const auto rows = [](const std::vector<Segment>& runs) {
          at::Tensor out = at::empty({static_cast<int64_t>(runs.size()), 3}, at::kLong);
          std::memcpy(out.data_ptr<int64_t>(), runs.data(), runs.size() * sizeof(Segment));
          return out;
        };
        PlanRecord record{
            at::empty({static_cast<int64_t>(plan.lanes.size()), 4}, at::kLong),
            rows(plan.segments),
            rows(plan.v_segments),
            plan.num_tokens,
            plan.first_head,
            plan.num_heads,
            plan.num_layers};
        std::memcpy(record.lanes.data_ptr<int64_t>(), plan.lanes.data(), plan.lanes.size() * sizeof(Lane));
        return record;
      },
      py::arg("src"), py::arg("src_geometry"), py::arg("dst"), py::arg("dst_geometry"), py::arg("src_blocks"),
      py::arg("dst_blocks"), py::arg("selection"), py::arg("max_segment_bytes"));
  m.def(
      "copy_geometry",
      [](int64_t src_id, const GeometryFields& src_geometry, int64_t dst_id,
         const GeometryFields& dst_geometry, const at::Tensor& src_blocks, const at::Tensor& dst_blocks,
         const SelectionFields& selection) {
        return copy_geometry(
            src_id, geometry_from(src_geometry), dst_id, geometry_from(dst_geometry),
            selection_from(src_blocks, dst_blocks, selection));
      },
      py::arg("src_id"), py::arg("src_geometry"), py::arg("dst_id"), py::arg("dst_geometry"),
      py::arg("src_blocks"), py::arg("dst_blocks"), py::arg("selection"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "mapped_geometry_copy_start",
      [](const std::shared_ptr<shared_memory::Region>& region, bool read, const DescFields& src,
         const GeometryFields& src_geometry, const std::vector<uint64_t>& src_addrs, const DescFields& dst,
         const GeometryFields& dst_geometry, const std::vector<uint64_t>& dst_addrs,
         const at::Tensor& src_blocks, const at::Tensor& dst_blocks, const SelectionFields& selection,
         bool watched) {
        const CacheDesc src_desc = desc_from(src);
        const CacheDesc dst_desc = desc_from(dst);
        // The peer's side (the source of a read): every tensor whole inside the mapping, so
        // that no box the checked plan makes reaches outside it.
        const CacheDesc& mapped_desc = read ? src_desc : dst_desc;
        for (const uint64_t address : read ? src_addrs : dst_addrs) {
          KVREG_CHECK_ARG(
              region->contains(address, static_cast<uint64_t>(mapped_desc.tensor_nbytes)),
              "a mapped tensor of ", mapped_desc.tensor_nbytes, " bytes at ", address,
              " is outside the peer's mapped region");
        }
        int64_t nbytes = 0;
        auto work = std::make_shared<const BoxWork>(plan_boxes(
            src_desc, src_addrs, geometry_from(src_geometry), dst_desc, dst_addrs,
            geometry_from(dst_geometry), selection_from(src_blocks, dst_blocks, selection), nbytes));
        // Ranges of boxes as the pool's tasks, sized as a block copy's: the pool's threads
        // and the caller waiting in help() share them. One task running copy_boxes left the
        // waiting caller idle (and copy_boxes on one thread where its strategy is ":single").
        std::vector<std::function<int64_t()>> bodies;
        if (one_geometry_task.load(std::memory_order_relaxed)) {
          bodies.emplace_back([work]() -> int64_t {
            copy_boxes(work->jobs());
            return 0;
          });
        } else {
          const auto task_bytes = static_cast<int64_t>(peer_copy::task_bytes(static_cast<uint64_t>(nbytes)));
          for (const auto& [begin, end] : work->split(task_bytes)) {
            bodies.emplace_back([work, begin = begin, end = end]() -> int64_t {
              work->copy(begin, end);
              return 0;
            });
          }
        }
        return std::make_unique<peer_copy::Job>(
            std::static_pointer_cast<const void>(region), static_cast<uint64_t>(nbytes), std::move(bodies),
            watched);
      },
      py::arg("region"), py::arg("read"), py::arg("src"), py::arg("src_geometry"), py::arg("src_addrs"),
      py::arg("dst"), py::arg("dst_geometry"), py::arg("dst_addrs"), py::arg("src_blocks"),
      py::arg("dst_blocks"), py::arg("selection"), py::arg("watched") = true,
      "A transfer between geometries with a same-host peer's cache mapped here (its side's addresses in "
      "region), as a PeerCopyJob whose tasks (ranges of the plan's boxes) the same-host copy threads and "
      "a caller in help() share.");
  m.def(
      "_test_geometry_one_task", [](bool on) { one_geometry_task.store(on, std::memory_order_relaxed); },
      py::arg("on"),
      "Test and benchmark hook: mapped transfers between geometries started as they were before, one "
      "task running every box (copy_boxes, spread over ATen's threads by the pool thread that takes it).");
  m.def(
      "_test_geometry_former_kernels", &test_force_former_kernels, py::arg("on"),
      "Test and benchmark hook: the box kernels as they were before (boxes job by job, K then V; rows "
      "without the next row's prefetch).");
  m.def(
      "geometry_box_paths", &box_path_counts,
      "Boxes the host copy between geometries has moved since the process started, per kernel: "
      "[rows, transposes, element by element].");
}

}  // namespace kvreg
