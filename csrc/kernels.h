// Declarations of the C++ kernels behind the torch.ops.llm schemas (see ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <cstdint>
#include <string>
#include <vector>

namespace kvreg {

// register.cpp
c10::SymInt register_kv_cache(at::TensorList caches, bool pin_host_memory, int64_t remote_accessible);
c10::SymInt register_kv_cache_addrs(
    int64_t num_tensors, int64_t data_type, at::IntArrayRef shape, int64_t placement, int64_t device_index,
    at::IntArrayRef addrs, bool pin_host_memory, int64_t remote_accessible);
void unregister_kv_cache(c10::SymInt cache_id);
// The same two registrations with cache keys (RegisterOptions::keys), for the bindings.
int64_t register_tensors(
    at::TensorList caches, bool pin_host_memory, int64_t remote_accessible, std::vector<std::string> keys,
    std::vector<std::string> layer_names = {}, std::vector<int64_t> name_layers = {});
int64_t register_addrs(
    int64_t num_tensors, int64_t data_type, at::IntArrayRef shape, int64_t placement, int64_t device_index,
    at::IntArrayRef addrs, bool pin_host_memory, int64_t remote_accessible, std::vector<std::string> keys);

// copy_blocks.cpp
void copy_kv_blocks(
    c10::SymInt src_cache_id, c10::SymInt dst_cache_id, const at::Tensor& src_blocks,
    const at::Tensor& dst_blocks);
// copy_kv_blocks for selected tensors of each cache (layers): src_tensors[i] -> dst_tensors[i].
void copy_kv_blocks_of_tensors(
    int64_t src_id, int64_t dst_id, const at::Tensor& src_blocks, const at::Tensor& dst_blocks,
    const std::vector<int64_t>& src_tensors, const std::vector<int64_t>& dst_tensors);
// The CPU copy's strategy: "auto" until the first large copy measured, then the one kept
// ("memcpy", "stream", "stream_noprefetch"); TORCH_KVREG_COPY sets it at start.
std::string copy_strategy();
void set_copy_strategy(const std::string& name);
// Benchmark baseline: the same segments copied by one thread with one memcpy each.
void copy_blocks_with_memcpy(
    int64_t src_id, int64_t dst_id, const at::Tensor& src_blocks, const at::Tensor& dst_blocks);
void copy_kv_cache(
    c10::SymInt src_cache_id, c10::SymInt dst_cache_id, int64_t src_batch_index, int64_t dst_batch_index,
    int64_t offset, int64_t size);

// ops.cpp: defines the `llm` library. Throws if another library already owns the namespace.
// A kernel's failed check (a StatusError) goes to `report`, which throws the error its caller
// reads (torch_kvreg._C: the Python error with the status as a value); if it returns, or is
// null, the c10 error goes on as it is.
class StatusError;
using StatusReporter = void (*)(const StatusError& error);
void register_ops(StatusReporter report);

}  // namespace kvreg
