// The Python module torch_kvreg._C: defines the ops on import and exposes registry queries.
#include "checksum.h"
#include "copy_plan.h"
#include "geometry_bindings.h"
#include "host_pin.h"
#include "kernels.h"
#include "notices_bindings.h"
#include "options.h"
#include "peer_copy_bindings.h"
#include "registry.h"
#include "remote_hooks.h"
#include "status.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/operators.h>
#include <torch/csrc/utils/pybind.h>

#include <cstring>
#include <exception>
#include <string>
#include <tuple>
#include <vector>

namespace {

using kvreg::Registry;

// "Name(field=value, ...)" of a record: its read-only fields, in the order they were bound.
std::string record_repr(const py::object& record) {
  const py::handle type = py::type::handle_of(record);
  std::string out = type.attr("__name__").cast<std::string>() + "(";
  const char* separator = "";
  for (const auto& [name, value] : type.attr("__dict__").cast<py::dict>()) {
    const auto field = name.cast<std::string>();
    if (field[0] != '_' && py::isinstance(value, py::module_::import("builtins").attr("property"))) {
      out += separator + field + "=" + py::repr(record.attr(name)).cast<std::string>();
      separator = ", ";
    }
  }
  return out + ")";
}

// The registry's records as Python sees them: named, read-only fields, compared by value.
// Module-local: a second copy of this module in the process binds its own.
void bind_records(py::module_& m) {
  py::class_<kvreg::Limits>(m, "Limits", "The caps of the registry (kvreg::Limits).", py::module_local())
      .def_readonly("max_addrs", &kvreg::Limits::max_addrs)
      .def_readonly("max_device_bytes", &kvreg::Limits::max_device_bytes)
      .def_readonly("max_host_bytes", &kvreg::Limits::max_host_bytes)
      .def("__repr__", &record_repr)
      .def(py::self == py::self);
  py::class_<kvreg::Usage>(m, "Usage", "What is registered (kvreg::Usage).", py::module_local())
      .def_readonly("num_caches", &kvreg::Usage::num_caches)
      .def_readonly("num_addrs", &kvreg::Usage::num_addrs)
      .def_readonly("device_bytes", &kvreg::Usage::device_bytes)
      .def_readonly("host_bytes", &kvreg::Usage::host_bytes)
      .def("__repr__", &record_repr);
  py::class_<kvreg::InitConfig>(
      m, "InitConfig", "What initialize() was given (kvreg::InitConfig).", py::module_local())
      .def_readonly("cluster_id", &kvreg::InitConfig::cluster_id)
      .def_readonly("role", &kvreg::InitConfig::role)
      .def_readonly("device_id", &kvreg::InitConfig::device_id)
      .def_readonly("options", &kvreg::InitConfig::options)
      .def_readonly("limits", &kvreg::InitConfig::limits)
      .def_readonly("wait_ms", &kvreg::InitConfig::wait_ms)
      .def("__repr__", &record_repr)
      .def(py::self == py::self);
  using kvreg::CacheRecord;
  py::class_<CacheRecord>(m, "CacheRecord", "One registration (kvreg::CacheRecord).", py::module_local())
      .def_readonly("cache_id", &CacheRecord::cache_id)
      .def_property_readonly("num_tensors", [](const CacheRecord& r) { return r.desc.num_tensors; })
      .def_property_readonly(
          "data_type", [](const CacheRecord& r) { return static_cast<int64_t>(r.desc.data_type); })
      .def_property_readonly("shape", [](const CacheRecord& r) { return r.desc.shape; })
      .def_property_readonly(
          "placement", [](const CacheRecord& r) { return static_cast<int64_t>(r.desc.placement); })
      .def_property_readonly("device_index", [](const CacheRecord& r) { return r.desc.device_index; })
      .def_readonly("addrs", &CacheRecord::addrs)
      .def_readonly("remote_accessible", &CacheRecord::remote_accessible)
      .def_readonly("keys", &CacheRecord::keys)
      .def_readonly("layer_names", &CacheRecord::layer_names)
      .def_readonly("name_layers", &CacheRecord::name_layers)
      .def("__repr__", &record_repr);
}

// (num_tensors, data_type, shape, placement, device_index), as Python's CacheDesc holds it.
using DescFields = std::tuple<int64_t, int64_t, std::vector<int64_t>, int64_t, int64_t>;

kvreg::CacheDesc desc_from(const DescFields& fields) {
  return kvreg::CacheDesc::validated(
      std::get<0>(fields), std::get<1>(fields), std::get<2>(fields), std::get<3>(fields),
      std::get<4>(fields));
}

// Segments as an int64 tensor of (src_offset, dst_offset, nbytes) rows.
at::Tensor segments_tensor(const std::vector<kvreg::Segment>& segments) {
  at::Tensor out = at::empty({static_cast<int64_t>(segments.size()), 3}, at::kLong);
  std::memcpy(out.data_ptr<int64_t>(), segments.data(), segments.size() * sizeof(kvreg::Segment));
  return out;
}

// A failed check as the Python error that torch gives its c10 type (ValueError, IndexError,
// TypeError, RuntimeError), carrying the status as a value: `status_code` (int) and `detail`
// (the message after the status name) beside the usual message (errors.translate reads them).
void set_python_error(const kvreg::StatusError& error) {
  PyObject* type = PyExc_RuntimeError;
  if (dynamic_cast<const c10::IndexError*>(&error) != nullptr) {
    type = PyExc_IndexError;
  } else if (dynamic_cast<const c10::TypeError*>(&error) != nullptr) {
    type = PyExc_TypeError;
  } else if (dynamic_cast<const c10::ValueError*>(&error) != nullptr) {
    type = PyExc_ValueError;
  }
  const auto* c10_error = dynamic_cast<const c10::Error*>(&error);
  const std::string message = c10_error != nullptr ? c10_error->what_without_backtrace() : error.detail();
  py::object exception = py::handle(type)(message);
  exception.attr("status_code") = static_cast<uint32_t>(error.status());
  exception.attr("detail") = error.detail();
  PyErr_SetObject(type, exception.ptr());
}

// A kernel's failed check, called from torch.ops.llm (GIL released by torch): thrown on as
// that Python error, which torch passes to the caller unchanged.
void report_to_python(const kvreg::StatusError& error) {
  if (!Py_IsInitialized()) {
    return;  // the c10 error goes on
  }
  py::gil_scoped_acquire gil;
  set_python_error(error);
  throw py::error_already_set();
}

// The C++ API's links and transfers run in the Python layer (torch_kvreg._cpp_bridge):
// these hooks take the GIL, call it, and return its status. Any Python error is LLM_FAILED.
template <typename... Args>
uint32_t call_bridge(const char* name, Args&&... args) {
  if (!Py_IsInitialized()) {
    return 0x5010B019U;  // LLM_FEATURE_NOT_ENABLED: the interpreter is gone
  }
  py::gil_scoped_acquire gil;
  try {
    py::object function = py::module_::import("torch_kvreg._cpp_bridge").attr(name);
    return function(std::forward<Args>(args)...).template cast<uint32_t>();
  } catch (const py::error_already_set&) {
    return 0xFFFFFFFFU;
  } catch (const py::cast_error&) {
    return 0xFFFFFFFFU;
  }
}

kvreg::RemoteHooks python_hooks() {
  kvreg::RemoteHooks hooks;
  hooks.initialize = [](uint64_t cluster_id, int64_t role, const kvreg::Options& options) {
    return call_bridge("initialize", cluster_id, role, options);
  };
  hooks.finalize = [] { call_bridge("finalize"); };
  hooks.set_role = [](int64_t role, const kvreg::Options& options) {
    return call_bridge("set_role", role, options);
  };
  hooks.link = [](uint64_t cluster_id, const std::string& ip, int64_t port, int64_t timeout_ms) {
    return call_bridge("link", cluster_id, ip, port, timeout_ms);
  };
  hooks.unlink = [](uint64_t cluster_id, int64_t timeout_ms, bool force) {
    return call_bridge("unlink", cluster_id, timeout_ms, force);
  };
  hooks.transfer = [](const kvreg::RemoteTransfer& t) {
    return call_bridge(
        "transfer", t.pull, t.blocks, t.cluster_id, t.remote_cache_id, t.local_cache_id, t.src_blocks,
        t.dst_blocks, t.remote_index, t.local_index, t.size,
        std::make_pair(t.local_first_layer, t.local_stop_layer),
        std::make_pair(t.remote_first_layer, t.remote_stop_layer), t.tensors_per_layer, t.verify);
  };
  return hooks;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  try {
    kvreg::register_ops(&report_to_python);
  } catch (const c10::Error& error) {
    throw py::import_error(
        std::string(
            "torch_kvreg: another library already defined the torch.ops.llm namespace "
            "in this process (a second build of torch_kvreg?); restart the interpreter "
            "and load one copy. Dispatcher said: ") +
        error.what_without_backtrace());
  }
  m.doc() = "torch_kvreg native registry; use the torch_kvreg package instead.";
  // The functions below raise a failed check as report_to_python does.
  py::register_local_exception_translator([](std::exception_ptr thrown) {
    try {
      if (thrown) {
        std::rethrow_exception(thrown);
      }
    } catch (const kvreg::StatusError& error) {
      try {
        set_python_error(error);
      } catch (py::error_already_set& failure) {
        failure.restore();
      }
    }
  });
#ifdef KVREG_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  // Whether at::parallel_for runs on several threads in the core library (it is inlined there).
  m.attr("with_openmp") = kvreg::built_with_openmp();
  m.def("install_remote_hooks", [] { kvreg::set_remote_hooks(python_hooks()); });
  m.def("clear_remote_hooks", [] { kvreg::set_remote_hooks(kvreg::RemoteHooks()); });
  m.def("cuda_available", &kvreg::cuda_available);
  m.def(
      "initialize",
      [](int64_t cluster_id, int64_t role, int64_t device_id, kvreg::Options options, int64_t max_addrs,
         int64_t max_device_bytes, int64_t max_host_bytes, int64_t wait_ms) {
        kvreg::InitConfig config;
        config.cluster_id = cluster_id;
        config.role = role;
        config.device_id = device_id;
        config.options = std::move(options);
        config.limits = {max_addrs, max_device_bytes, max_host_bytes};
        config.wait_ms = wait_ms;
        Registry::instance().initialize(config);
      },
      py::arg("cluster_id"), py::arg("role"), py::arg("device_id"), py::arg("options"), py::arg("max_addrs"),
      py::arg("max_device_bytes"), py::arg("max_host_bytes"), py::arg("wait_ms"),
      py::call_guard<py::gil_scoped_release>());
  // The C++ API's reading of LLM-DataDist options (LlmDataDist::Initialize and SetRole).
  m.def("upstream_options", &kvreg::native_options_from_upstream, py::arg("options"));
  m.def("finalize", [] { return Registry::instance().finalize(); }, py::call_guard<py::gil_scoped_release>());
  m.def("orphans", [] { return Registry::instance().orphans(); });
  m.def("is_initialized", [] { return Registry::instance().is_initialized(); });
  bind_records(m);
  m.def("config", [] { return Registry::instance().config(); });
  m.def("limits", [] { return Registry::instance().limits(); });
  m.def("default_limits", [] { return kvreg::Limits(); });
  m.def("usage", [] { return Registry::instance().usage(); });
  m.def("hold", [](int64_t cache_id) { Registry::instance().hold(cache_id); });
  m.def("unhold", [](int64_t cache_id) { Registry::instance().unhold(cache_id); });
  m.def("in_flight", [](int64_t cache_id) { return Registry::instance().in_flight(cache_id); });
  m.def("cache_ids", [] { return Registry::instance().cache_ids(); });
  m.def("get_cache", [](int64_t cache_id) { return Registry::instance().get(cache_id); });
  // copy_kv_blocks without the GIL, for copies that run beside Python (asynchronous ones).
  m.def(
      "copy_blocks",
      [](int64_t src_cache_id, int64_t dst_cache_id, const at::Tensor& src_blocks,
         const at::Tensor& dst_blocks) {
        kvreg::copy_kv_blocks(src_cache_id, dst_cache_id, src_blocks, dst_blocks);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "copy_blocks_of_tensors",
      [](int64_t src_cache_id, int64_t dst_cache_id, const at::Tensor& src_blocks,
         const at::Tensor& dst_blocks, const std::vector<int64_t>& src_tensors,
         const std::vector<int64_t>& dst_tensors) {
        kvreg::copy_kv_blocks_of_tensors(
            src_cache_id, dst_cache_id, src_blocks, dst_blocks, src_tensors, dst_tensors);
      },
      py::call_guard<py::gil_scoped_release>());
  // Same-host copies between processes (remote transfers to a peer on this host).
  kvreg::bind_peer_copy(m);
  kvreg::bind_notices(m);
  // Transfers between caches of different geometry (block size, layout, tensor-parallel split).
  kvreg::bind_geometry(m);
  // CRC-32C of a buffer (verified transfers; tests compare it with known values).
  m.def(
      "crc32c",
      [](const py::buffer& data, uint32_t crc, bool portable) {
        const py::buffer_info info = data.request();
        KVREG_CHECK_ARG(
            info.ndim <= 1 && (info.ndim == 0 || info.strides[0] == info.itemsize),
            "crc32c takes a contiguous 1-D buffer");
        const size_t nbytes = static_cast<size_t>(info.size * info.itemsize);
        py::gil_scoped_release released;
        return portable ? kvreg::crc32c_portable(crc, info.ptr, nbytes)
                        : kvreg::crc32c(crc, info.ptr, nbytes);
      },
      py::arg("data"), py::arg("crc") = 0, py::arg("portable") = false);
  m.def("crc32c_implementation", &kvreg::crc32c_implementation);
  // Test hook: forces one CRC-32C implementation ("auto": the CPU's pick again).
  m.def("_test_force_crc32c_implementation", &kvreg::test_force_crc32c_implementation, py::arg("name"));
  m.def(
      "checksum_blocks",
      [](int64_t cache_id, const std::vector<int64_t>& tensors, const at::Tensor& blocks, int64_t offset,
         int64_t size) { return kvreg::checksum_blocks(cache_id, tensors, blocks, offset, size); },
      py::arg("cache_id"), py::arg("tensors"), py::arg("blocks"), py::arg("offset") = 0, py::arg("size") = -1,
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "copy_blocks_verified",
      [](int64_t src_cache_id, int64_t dst_cache_id, const at::Tensor& src_blocks,
         const at::Tensor& dst_blocks, const std::vector<int64_t>& src_tensors,
         const std::vector<int64_t>& dst_tensors, bool slice, int64_t offset, int64_t size,
         const kvreg::BlockHook& source_taken, const kvreg::BlockHook& landed) {
        return kvreg::copy_blocks_verified(
            src_cache_id, dst_cache_id, src_blocks, dst_blocks, src_tensors, dst_tensors, slice, offset, size,
            source_taken, landed);
      },
      py::arg("src_cache_id"), py::arg("dst_cache_id"), py::arg("src_blocks"), py::arg("dst_blocks"),
      py::arg("src_tensors"), py::arg("dst_tensors"), py::arg("slice") = false, py::arg("offset") = 0,
      py::arg("size") = -1, py::arg("source_taken") = nullptr, py::arg("landed") = nullptr,
      py::call_guard<py::gil_scoped_release>());
  m.def("copy_strategy", [] { return kvreg::copy_strategy(); });
  m.def("set_copy_strategy", [](const std::string& name) { kvreg::set_copy_strategy(name); });
  m.def(
      "copy_blocks_with_memcpy",
      [](int64_t src_cache_id, int64_t dst_cache_id, const at::Tensor& src_blocks,
         const at::Tensor& dst_blocks) {
        kvreg::copy_blocks_with_memcpy(src_cache_id, dst_cache_id, src_blocks, dst_blocks);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def("cache_keys", [](int64_t cache_id) { return Registry::instance().get(cache_id).keys; });
  m.def("find_key", [](const std::string& key) { return Registry::instance().find_key(key); });
  m.def("remove_key", [](const std::string& key) { Registry::instance().remove_key(key); });
  // Registrations with cache keys (the ops take none): same checks, same registry.
  m.def(
      "register_tensors",
      [](const std::vector<at::Tensor>& caches, bool pin_host_memory, int64_t remote_accessible,
         std::vector<std::string> keys, std::vector<std::string> layer_names,
         std::vector<int64_t> name_layers) {
        return kvreg::register_tensors(
            caches, pin_host_memory, remote_accessible, std::move(keys), std::move(layer_names),
            std::move(name_layers));
      },
      py::arg("caches"), py::arg("pin_host_memory"), py::arg("remote_accessible"), py::arg("keys"),
      py::arg("layer_names") = std::vector<std::string>(), py::arg("name_layers") = std::vector<int64_t>());
  m.def(
      "register_addrs", [](int64_t num_tensors, int64_t data_type, const std::vector<int64_t>& shape,
                           int64_t placement, int64_t device_index, const std::vector<int64_t>& addrs,
                           bool pin_host_memory, int64_t remote_accessible, std::vector<std::string> keys) {
        return kvreg::register_addrs(
            num_tensors, data_type, shape, placement, device_index, addrs, pin_host_memory, remote_accessible,
            std::move(keys));
      });
  // The validation and planning of copy_kv_blocks / copy_kv_cache, for transfers whose
  // other side is a desc received from a peer (torch_kvreg.remote).
  m.def(
      "plan_blocks",
      [](const DescFields& src, int64_t src_id, const DescFields& dst, int64_t dst_id,
         const at::Tensor& src_blocks, const at::Tensor& dst_blocks, int64_t max_segment_bytes,
         bool same_cache) {
        auto src_list = kvreg::block_indices(src_blocks, "src_blocks");
        auto dst_list = kvreg::block_indices(dst_blocks, "dst_blocks");
        return segments_tensor(
            kvreg::plan_blocks(
                desc_from(src), src_id, desc_from(dst), dst_id, same_cache, std::move(src_list),
                std::move(dst_list), max_segment_bytes));
      },
      py::arg("src"), py::arg("src_id"), py::arg("dst"), py::arg("dst_id"), py::arg("src_blocks"),
      py::arg("dst_blocks"), py::arg("max_segment_bytes"), py::arg("same_cache") = false);
  m.def(
      "plan_slice", [](const DescFields& src, int64_t src_id, const DescFields& dst, int64_t dst_id,
                       int64_t src_batch_index, int64_t dst_batch_index, int64_t offset, int64_t size) {
        return segments_tensor(
            kvreg::plan_slice(
                desc_from(src), src_id, desc_from(dst), dst_id, /*same_cache=*/false, src_batch_index,
                dst_batch_index, offset, size));
      });
}
