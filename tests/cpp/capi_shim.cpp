// A C++ component that a Python test loads with ctypes: each function makes one call of
// torch_kvreg's C++ API (llm_datadist.h) from plain C arguments and returns its status.
#include "llm_datadist/llm_datadist.h"

#include <memory>
#include <string>
#include <vector>

using namespace llm_datadist;

namespace {

std::unique_ptr<LlmDataDist> datadist;

CacheDesc make_desc(
    uint32_t placement, uint32_t num_tensors, int32_t data_type, const int64_t* shape, int rank) {
  CacheDesc desc;
  desc.placement = static_cast<CachePlacement>(placement);
  desc.num_tensors = num_tensors;
  desc.data_type = static_cast<DataType>(data_type);
  desc.shape.assign(shape, shape + rank);
  return desc;
}

Cache cache_of(int64_t cache_id) {
  Cache cache;
  cache.cache_id = cache_id;
  return cache;
}

KvCacheExtParam ext(int32_t src_first, int32_t src_last, int32_t dst_first, int32_t dst_last, int tpl) {
  KvCacheExtParam param;
  param.src_layer_range = {src_first, src_last};
  param.dst_layer_range = {dst_first, dst_last};
  param.tensor_num_per_layer = static_cast<uint8_t>(tpl);
  return param;
}

}  // namespace

extern "C" {

void shim_create(uint64_t cluster_id, int32_t role) {
  datadist = std::make_unique<LlmDataDist>(cluster_id, static_cast<LlmRole>(role));
}

void shim_destroy() {
  datadist.reset();
}

// options: n key/value pairs
uint32_t shim_initialize(const char** keys, const char** values, int n) {
  std::map<AscendString, AscendString> options;
  for (int i = 0; i < n; ++i) {
    options[AscendString(keys[i])] = AscendString(values[i]);
  }
  return datadist->Initialize(options);
}

void shim_finalize() {
  datadist->Finalize();
}

uint32_t shim_set_role(int32_t role, const char* listen) {
  std::map<AscendString, AscendString> options;
  if (listen != nullptr) {
    options[AscendString(OPTION_LISTEN_IP_INFO)] = AscendString(listen);
  }
  return datadist->SetRole(static_cast<LlmRole>(role), options);
}

// options: n key/value pairs
uint32_t shim_set_role_options(int32_t role, const char** keys, const char** values, int n) {
  std::map<AscendString, AscendString> options;
  for (int i = 0; i < n; ++i) {
    options[AscendString(keys[i])] = AscendString(values[i]);
  }
  return datadist->SetRole(static_cast<LlmRole>(role), options);
}

uint32_t shim_register(
    uint32_t placement, uint32_t num_tensors, int32_t data_type, const int64_t* shape, int rank,
    const uint64_t* addrs, int n, int64_t* cache_id) {
  return datadist->RegisterKvCache(
      make_desc(placement, num_tensors, data_type, shape, rank), std::vector<uint64_t>(addrs, addrs + n),
      RegisterCfg(), *cache_id);
}

uint32_t shim_unregister(int64_t cache_id) {
  return datadist->UnregisterKvCache(cache_id);
}

uint32_t shim_allocate(
    uint32_t placement, uint32_t num_tensors, int32_t data_type, const int64_t* shape, int rank,
    int64_t* cache_id, uint64_t* first_addr) {
  Cache cache;
  const Status status =
      datadist->AllocateCache(make_desc(placement, num_tensors, data_type, shape, rank), cache);
  *cache_id = cache.cache_id;
  *first_addr = cache.tensor_addrs.empty() ? 0 : cache.tensor_addrs[0];
  return status;
}

uint32_t shim_deallocate(int64_t cache_id) {
  return datadist->DeallocateCache(cache_id);
}

// dst_blocks: groups x n, row-major
uint32_t shim_copy_blocks(
    int64_t src, int64_t dst, const uint64_t* src_blocks, int n, const uint64_t* dst_blocks, int groups) {
  std::vector<std::vector<uint64_t>> dst_list;
  for (int g = 0; g < groups; ++g) {
    dst_list.emplace_back(dst_blocks + g * n, dst_blocks + (g + 1) * n);
  }
  return datadist->CopyKvBlocks(
      cache_of(src), cache_of(dst), std::vector<uint64_t>(src_blocks, src_blocks + n), dst_list);
}

uint32_t shim_copy_cache(
    int64_t src, int64_t dst, uint32_t src_batch, uint32_t dst_batch, uint64_t offset, int64_t size) {
  return datadist->CopyKvCache(cache_of(src), cache_of(dst), src_batch, dst_batch, offset, size);
}

uint32_t shim_link(uint64_t cluster_id, const char* ip, uint16_t port, int32_t timeout_ms, int clusters) {
  std::vector<ClusterInfo> infos(clusters);
  for (auto& info : infos) {
    info.remote_cluster_id = cluster_id;
    info.remote_ip_infos.push_back({ip, port});
  }
  std::vector<Status> rets;
  return datadist->LinkLlmClusters(infos, rets, timeout_ms);
}

uint32_t shim_unlink(uint64_t cluster_id, int32_t timeout_ms, bool force) {
  ClusterInfo info;
  info.remote_cluster_id = cluster_id;
  std::vector<Status> rets;
  return datadist->UnlinkLlmClusters({info}, rets, timeout_ms, force);
}

uint32_t shim_pull_blocks(
    uint64_t cluster_id, int64_t remote_id, int64_t local_id, const uint64_t* src_blocks,
    const uint64_t* dst_blocks, int n, int32_t src_first, int32_t src_last, int32_t dst_first,
    int32_t dst_last, int tpl) {
  CacheIndex index;
  index.cluster_id = cluster_id;
  index.cache_id = remote_id;
  return datadist->PullKvBlocks(
      index, cache_of(local_id), std::vector<uint64_t>(src_blocks, src_blocks + n),
      std::vector<uint64_t>(dst_blocks, dst_blocks + n), ext(src_first, src_last, dst_first, dst_last, tpl));
}

// PullKvBlocks (every layer) with KvCacheExtParam::verify set to `verify`.
uint32_t shim_pull_blocks_verify(
    uint64_t cluster_id, int64_t remote_id, int64_t local_id, const uint64_t* src_blocks,
    const uint64_t* dst_blocks, int n, int verify) {
  CacheIndex index;
  index.cluster_id = cluster_id;
  index.cache_id = remote_id;
  KvCacheExtParam param;
  param.verify = static_cast<uint8_t>(verify);
  return datadist->PullKvBlocks(
      index, cache_of(local_id), std::vector<uint64_t>(src_blocks, src_blocks + n),
      std::vector<uint64_t>(dst_blocks, dst_blocks + n), param);
}

uint32_t shim_push_blocks(
    int64_t local_id, uint64_t cluster_id, int64_t remote_id, const uint64_t* src_blocks,
    const uint64_t* dst_blocks, int n) {
  CacheIndex index;
  index.cluster_id = cluster_id;
  index.cache_id = remote_id;
  return datadist->PushKvBlocks(
      cache_of(local_id), index, std::vector<uint64_t>(src_blocks, src_blocks + n),
      std::vector<uint64_t>(dst_blocks, dst_blocks + n));
}

uint32_t shim_pull_cache(
    uint64_t cluster_id, int64_t remote_id, uint32_t remote_batch, int64_t local_id, uint32_t batch_index,
    int64_t size) {
  CacheIndex index;
  index.cluster_id = cluster_id;
  index.cache_id = remote_id;
  index.batch_index = remote_batch;
  return datadist->PullKvCache(index, cache_of(local_id), batch_index, size);
}

uint32_t shim_push_cache(
    int64_t local_id, uint32_t src_batch, uint64_t cluster_id, int64_t remote_id, uint32_t remote_batch) {
  CacheIndex index;
  index.cluster_id = cluster_id;
  index.cache_id = remote_id;
  index.batch_index = remote_batch;
  return datadist->PushKvCache(cache_of(local_id), index, src_batch);
}

}  // extern "C"
