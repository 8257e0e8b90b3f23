// Kernels of the register / unregister ops: turn tensors or raw addresses into a registration.
#include "host_pin.h"
#include "kernels.h"
#include "registry.h"
#include "status.h"

#include <c10/core/Device.h>

#include <string>
#include <utility>
#include <vector>

namespace kvreg {

namespace {

int64_t concrete_cache_id(const c10::SymInt& cache_id) {
  const auto value = cache_id.maybe_as_int();
  KVREG_CHECK_ARG(value.has_value(), "cache_id must be a concrete int when the op runs");
  return *value;
}

RegisterOptions register_options(
    bool pin_host_memory, int64_t remote_accessible, std::vector<std::string> keys,
    std::vector<std::string> layer_names = {}, std::vector<int64_t> name_layers = {}) {
  RegisterOptions options;
  options.pin_host_memory = pin_host_memory;
  options.remote_accessible = remote_accessible;
  options.keys = std::move(keys);
  options.layer_names = std::move(layer_names);
  options.name_layers = std::move(name_layers);
  return options;
}

}  // namespace

c10::SymInt register_kv_cache(at::TensorList caches, bool pin_host_memory, int64_t remote_accessible) {
  return register_tensors(caches, pin_host_memory, remote_accessible, {});
}

int64_t register_tensors(
    at::TensorList caches, bool pin_host_memory, int64_t remote_accessible, std::vector<std::string> keys,
    std::vector<std::string> layer_names, std::vector<int64_t> name_layers) {
  Registry::instance().require_initialized();
  const int64_t count = static_cast<int64_t>(caches.size());
  KVREG_CHECK_ARG(count > 0, "caches is empty, expected 1 to ", kMaxAddrsPerCall, " tensors");
  KVREG_CHECK_ARG(
      count <= kMaxAddrsPerCall, "caches has ", count, " tensors, at most ", kMaxAddrsPerCall, " allowed");
  const at::Tensor& first = caches[0];
  for (int64_t i = 0; i < count; ++i) {
    const at::Tensor& tensor = caches[i];
    KVREG_CHECK_ARG(tensor.defined(), "caches[", i, "] is undefined");
    KVREG_CHECK_ARG(
        tensor.layout() == at::kStrided, "caches[", i, "] has layout ", tensor.layout(),
        ", only strided tensors have one address");
    KVREG_CHECK_ARG(
        data_type_from_scalar_type(tensor.scalar_type()).has_value(), "caches[", i, "] has dtype ",
        tensor.scalar_type(), ", which has no LLM DataType");
    KVREG_CHECK_ARG(
        tensor.dim() >= 1 && tensor.dim() <= kMaxRank, "caches[", i, "] has rank ", tensor.dim(),
        ", expected 1 to ", kMaxRank);
    KVREG_CHECK_ARG(tensor.numel() > 0, "caches[", i, "] is empty (shape ", tensor.sizes(), ")");
    KVREG_CHECK_ARG(!tensor.is_meta(), "caches[", i, "] is a meta tensor and has no memory to register");
    KVREG_CHECK_ARG(tensor.is_contiguous(), "caches[", i, "] is not contiguous");
    KVREG_CHECK_ARG(
        tensor.scalar_type() == first.scalar_type(), "caches[", i, "] has dtype ", tensor.scalar_type(),
        " but caches[0] has ", first.scalar_type());
    KVREG_CHECK_ARG(
        tensor.sizes() == first.sizes(), "caches[", i, "] has shape ", tensor.sizes(), " but caches[0] has ",
        first.sizes());
    KVREG_CHECK_ARG(
        tensor.device() == first.device(), "caches[", i, "] is on ", tensor.device(), " but caches[0] is on ",
        first.device());
    KVREG_CHECK_ARG(tensor.data_ptr() != nullptr, "caches[", i, "] has a null data_ptr");
  }
  const bool on_host = first.device().is_cpu();
  const CacheDesc desc = CacheDesc::validated(
      count, static_cast<int64_t>(*data_type_from_scalar_type(first.scalar_type())), first.sizes().vec(),
      static_cast<int64_t>(on_host ? Placement::HOST : Placement::DEVICE),
      on_host ? -1 : first.device().index());
  std::vector<uint64_t> addrs;
  std::vector<at::Tensor> owners;
  for (const at::Tensor& tensor : caches) {
    addrs.push_back(reinterpret_cast<uint64_t>(tensor.data_ptr()));
    owners.push_back(tensor);
  }
  return Registry::instance().register_cache(
      desc, std::move(addrs), std::move(owners),
      register_options(
          pin_host_memory, remote_accessible, std::move(keys), std::move(layer_names),
          std::move(name_layers)));
}

c10::SymInt register_kv_cache_addrs(
    int64_t num_tensors, int64_t data_type, at::IntArrayRef shape, int64_t placement, int64_t device_index,
    at::IntArrayRef addrs, bool pin_host_memory, int64_t remote_accessible) {
  return register_addrs(
      num_tensors, data_type, shape, placement, device_index, addrs, pin_host_memory, remote_accessible, {});
}

int64_t register_addrs(
    int64_t num_tensors, int64_t data_type, at::IntArrayRef shape, int64_t placement, int64_t device_index,
    at::IntArrayRef addrs, bool pin_host_memory, int64_t remote_accessible, std::vector<std::string> keys) {
  Registry::instance().require_initialized();
  KVREG_CHECK_ARG(!addrs.empty(), "addrs is empty");
  KVREG_CHECK_ARG(
      static_cast<int64_t>(addrs.size()) <= kMaxAddrsPerCall, "addrs has ", addrs.size(),
      " entries, at most ", kMaxAddrsPerCall, " allowed");
  KVREG_CHECK_ARG(
      static_cast<int64_t>(addrs.size()) == num_tensors, "addrs has ", addrs.size(),
      " entries but cache_desc.num_tensors is ", num_tensors);
  CacheDesc desc = CacheDesc::validated(num_tensors, data_type, shape.vec(), placement, device_index);
  std::vector<uint64_t> raw_addrs;
  for (size_t i = 0; i < addrs.size(); ++i) {
    KVREG_CHECK_ARG(addrs[i] > 0, "addrs[", i, "] is ", addrs[i], ", expected a non-null address");
    raw_addrs.push_back(static_cast<uint64_t>(addrs[i]));
  }
  // Where the runtime can tell, the memory must be what the placement says.
  for (size_t i = 0; i < raw_addrs.size(); ++i) {
    const MemoryKind kind = memory_kind(reinterpret_cast<const void*>(raw_addrs[i]));
    if (desc.placement == Placement::DEVICE) {
      KVREG_CHECK_ARG(kind != MemoryKind::HOST, "addrs[", i, "] is host memory but placement is DEVICE");
      if (kind == MemoryKind::DEVICE && desc.device_index == -1) {
        desc.device_index = memory_device(reinterpret_cast<const void*>(raw_addrs[i]));
      }
    } else {
      KVREG_CHECK_ARG(kind != MemoryKind::DEVICE, "addrs[", i, "] is device memory but placement is HOST");
    }
  }
  return Registry::instance().register_cache(
      std::move(desc), std::move(raw_addrs), {},
      register_options(pin_host_memory, remote_accessible, std::move(keys)));
}

void unregister_kv_cache(c10::SymInt cache_id) {
  Registry::instance().unregister_cache(concrete_cache_id(cache_id));
}

}  // namespace kvreg
