// The Python bindings of same-host copies: jobs, routes and the pool's wake machinery.
#include "peer_copy_bindings.h"

#include "cache_desc.h"
#include "peer_copy.h"
#include "peer_route.h"
#include "shared_memory.h"
#include "status.h"

#include <ATen/ops/from_blob.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace kvreg {
namespace {

using peer_copy::Job;
using peer_copy::Piece;
using peer_copy::Route;
using shared_memory::Region;

// (num_tensors, data_type, shape, placement, device_index), as Python's CacheDesc holds it.
using DescFields = std::tuple<int64_t, int64_t, std::vector<int64_t>, int64_t, int64_t>;
using Offsets = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;

CacheDesc desc_from(const DescFields& fields) {
  return CacheDesc::validated(
      std::get<0>(fields), std::get<1>(fields), std::get<2>(fields), std::get<3>(fields),
      std::get<4>(fields));
}

// A CPU int64 (local, remote, nbytes) x N table as pieces.
std::vector<Piece> row_pieces(const at::Tensor& rows) {
  KVREG_CHECK_TYPE(rows.scalar_type() == at::kLong, "peer copy rows must be int64, got ", rows.scalar_type());
  KVREG_CHECK_ARG(
      rows.dim() == 2 && rows.size(1) == 3 && rows.device().is_cpu(),
      "peer copy rows must be a CPU (local, remote, nbytes) x N table");
  const at::Tensor table = rows.contiguous();
  const auto* cells = reinterpret_cast<const uint64_t*>(table.data_ptr<int64_t>());
  std::vector<Piece> pieces(static_cast<size_t>(table.size(0)));
  for (size_t i = 0; i < pieces.size(); ++i) {
    pieces[i] = {cells[3 * i], cells[3 * i + 1], cells[3 * i + 2]};
  }
  return pieces;
}

// A transfer's plan as pieces: segment j of tensor t is lengths[j] bytes at
// local_addrs[t] + local_offsets[j] here and remote_addrs[t] + remote_offsets[j] there.
std::vector<Piece> plan_pieces(
    const std::vector<uint64_t>& local_addrs, const std::vector<uint64_t>& remote_addrs,
    const Offsets& local_offsets, const Offsets& remote_offsets, const Offsets& lengths) {
  const auto count = static_cast<size_t>(lengths.size());
  KVREG_CHECK_ARG(
      local_addrs.size() == remote_addrs.size() && static_cast<size_t>(local_offsets.size()) == count &&
          static_cast<size_t>(remote_offsets.size()) == count,
      "peer copy segments: ", local_addrs.size(), " and ", remote_addrs.size(), " tensors, ",
      local_offsets.size(), ", ", remote_offsets.size(), " and ", count, " offsets and lengths");
  return peer_copy::segment_pieces(
      local_addrs, remote_addrs, count, local_offsets.data(), remote_offsets.data(), lengths.data());
}

// A block list given as a Python list of plain ints, as int64 values; false (list left
// unusable) for anything else: the general path then names what is wrong.
bool plain_block_list(const py::handle& object, std::vector<int64_t>& out) {
  if (!PyList_CheckExact(object.ptr())) {
    return false;
  }
  const Py_ssize_t count = PyList_GET_SIZE(object.ptr());
  out.resize(static_cast<size_t>(count));
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* item = PyList_GET_ITEM(object.ptr(), i);
    if (!PyLong_CheckExact(item)) {
      return false;
    }
    int overflow = 0;
    const long long value = PyLong_AsLongLongAndOverflow(item, &overflow);
    if (overflow != 0 || (value == -1 && PyErr_Occurred() != nullptr)) {
      PyErr_Clear();
      return false;
    }
    out[static_cast<size_t>(i)] = value;
  }
  return true;
}

// The route's job for these block lists, or null where it does not take them.
std::unique_ptr<Job> start_on_route(
    const Route& route, const py::handle& src_blocks, const py::handle& dst_blocks, bool watched) {
  std::vector<int64_t> src_list;
  std::vector<int64_t> dst_list;
  if (!plain_block_list(src_blocks, src_list) || !plain_block_list(dst_blocks, dst_list)) {
    return nullptr;
  }
  return route.start(std::move(src_list), std::move(dst_list), watched);
}

}  // namespace

void bind_peer_copy(py::module_& m) {
  // Module-local: a second copy of the module loaded beside this one (a stale build) binds
  // the same C++ types, which pybind11 would otherwise refuse to register twice.
  py::class_<Job>(
      m, "PeerCopyJob", py::module_local(),
      "A same-host copy under way or ended. Dropping the last reference to a running job "
      "cancels it; the memory it names must stay valid until state() is no longer 0.")
      .def("state", &Job::state, "0 running, 1 done, -errno on failure (-ECANCELED: cancelled)")
      .def(
          "wait", &Job::wait, py::arg("timeout_ms"), py::call_guard<py::gil_scoped_release>(),
          "Waits up to timeout_ms (< 0: without bound) for the job to end; its state then.")
      .def(
          "help",
          [](const Job& job, int64_t timeout_ms) {
            // A job that has ended answers without letting go of the GIL: a waiter that
            // lets go of it here waits to get it back from whichever thread took it.
            const int64_t state = job.state();
            if (state != peer_copy::kRunning) {
              return state;
            }
            py::gil_scoped_release release;
            return job.help(timeout_ms);
          },
          py::arg("timeout_ms"), "wait(), copying queued pieces on the calling thread while there are any.")
      .def("cancel", &Job::cancel, "Stops the job before its next system call (ends it cancelled).")
      .def_property_readonly("nbytes", &Job::nbytes)
      .def_property_readonly("tasks", &Job::tasks, "Tasks the pool's threads share it as.");
  m.def(
      "peer_copy_start",
      [](int64_t pid, bool read, const at::Tensor& rows, bool watched) {
        return std::make_unique<Job>(pid, read, row_pieces(rows), watched);
      },
      py::arg("pid"), py::arg("read"), py::arg("rows"), py::arg("watched") = true);
  m.def(
      "peer_copy_start_segments",
      [](int64_t pid, bool read, const std::vector<uint64_t>& local_addrs,
         const std::vector<uint64_t>& remote_addrs, const Offsets& local_offsets,
         const Offsets& remote_offsets, const Offsets& lengths, bool watched) {
        return std::make_unique<Job>(
            pid, read, plan_pieces(local_addrs, remote_addrs, local_offsets, remote_offsets, lengths),
            watched);
      },
      py::arg("pid"), py::arg("read"), py::arg("local_addrs"), py::arg("remote_addrs"),
      py::arg("local_offsets"), py::arg("remote_offsets"), py::arg("lengths"), py::arg("watched") = true);
  py::class_<Route>(m, "PeerRoute", py::module_local())
      .def(
          py::init([](int64_t pid, bool read, std::vector<uint64_t> local_bases,
                      std::vector<uint64_t> remote_bases, const DescFields& src, int64_t src_id,
                      const DescFields& dst, int64_t dst_id, int64_t max_segment_bytes) {
            return std::make_unique<Route>(
                pid, read, std::move(local_bases), std::move(remote_bases), desc_from(src), src_id,
                desc_from(dst), dst_id, max_segment_bytes);
          }),
          py::arg("pid"), py::arg("read"), py::arg("local_bases"), py::arg("remote_bases"), py::arg("src"),
          py::arg("src_id"), py::arg("dst"), py::arg("dst_id"), py::arg("max_segment_bytes"))
      .def("start_job", &start_on_route, py::arg("src_blocks"), py::arg("dst_blocks"), py::arg("watched"))
      .def_property_readonly("block_bytes", &Route::block_bytes);

  py::class_<Region, std::shared_ptr<Region>>(
      m, "SharedRegion", py::module_local(),
      "A memfd mapped here (allocate_kv_cache's memory, or a same-host peer's, mapped to "
      "copy from and into it). Unmapped when the last reference goes: tensors over it and "
      "copies under way hold one each.")
      .def_property_readonly("name", &Region::name)
      .def_property_readonly("base", &Region::base)
      .def_property_readonly("size", &Region::size)
      .def_property_readonly("fd", &Region::fd);
  m.def("shared_region_create", &Region::create, py::arg("name"), py::arg("nbytes"));
  m.def(
      "shared_region_map", &Region::map, py::arg("fd"), py::arg("nbytes"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "shared_region_bytes",
      [](const std::shared_ptr<Region>& region, uint64_t offset, uint64_t nbytes) {
        KVREG_CHECK_ARG(
            nbytes > 0 && region->contains(region->base() + offset, nbytes), "bytes [", offset, ", ",
            offset + nbytes, ") are outside the ", region->size(), "-byte region");
        // The tensor's storage holds the region: it stays mapped while any view of it lives.
        return at::from_blob(
            reinterpret_cast<void*>(region->base() + offset), {static_cast<int64_t>(nbytes)},
            [region](void*) {}, at::TensorOptions().dtype(at::kByte));
      },
      py::arg("region"), py::arg("offset"), py::arg("nbytes"),
      "A uint8 CPU tensor over nbytes of the region from offset, keeping the region mapped.");
  m.def(
      "mapped_copy_start_segments",
      [](const std::shared_ptr<Region>& region, bool read, const std::vector<uint64_t>& local_addrs,
         const std::vector<uint64_t>& mapped_addrs, const Offsets& local_offsets,
         const Offsets& remote_offsets, const Offsets& lengths, bool watched) {
        auto pieces = plan_pieces(local_addrs, mapped_addrs, local_offsets, remote_offsets, lengths);
        for (const Piece& piece : pieces) {
          // What a peer described must not make this process copy outside the mapping.
          KVREG_CHECK_ARG(
              region->contains(piece.remote, piece.nbytes), "a mapped copy piece of ", piece.nbytes,
              " bytes at ", piece.remote, " is outside the peer's mapped region");
        }
        return std::make_unique<Job>(
            std::static_pointer_cast<const void>(region), read, std::move(pieces), watched);
      },
      py::arg("region"), py::arg("read"), py::arg("local_addrs"), py::arg("mapped_addrs"),
      py::arg("local_offsets"), py::arg("remote_offsets"), py::arg("lengths"), py::arg("watched") = true,
      "peer_copy_start_segments for a peer's cache mapped here (mapped_addrs: its tensors' addresses in "
      "region): the job copies in this process with copy_kv_blocks' kernels and holds the region.");
  m.def("shared_regions_live", &shared_memory::live_regions);
  m.def(
      "shared_region_find", &shared_memory::find, py::arg("address"), py::arg("nbytes"),
      "The region created here that holds the bytes, else None.");
  m.def("peer_copy_wakes", &peer_copy::wakes);
  m.def("peer_copy_ends", &peer_copy::ends);
  m.def("peer_copy_wait_ends", &peer_copy::wait_ends, py::call_guard<py::gil_scoped_release>());
  m.def("peer_copy_live_jobs", &peer_copy::live_jobs);
  m.def("peer_copy_threads", &peer_copy::threads);
  m.def("peer_copy_wake", &peer_copy::wake);
  m.def("peer_copy_watch", &peer_copy::watch);
  m.def("peer_copy_peek", [](int64_t pid, uint64_t address, size_t nbytes) {
    std::string out;
    const int64_t status = peer_copy::peek(pid, address, nbytes, out);
    return py::make_tuple(status, py::bytes(out));
  });
}

}  // namespace kvreg
