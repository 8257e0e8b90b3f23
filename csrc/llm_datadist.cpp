// The llm_datadist::LlmDataDist C++ API: a thin shell over the registry that returns statuses.
#include "llm_datadist/llm_datadist.h"

#include "cache_desc.h"
#include "checksum.h"
#include "copy_plan.h"
#include "host_pin.h"
#include "kernels.h"
#include "options.h"
#include "registry.h"
#include "remote_hooks.h"
#include "status.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/tensor.h>

#include <algorithm>
#include <limits>
#include <mutex>

namespace kvreg {

namespace {

std::mutex hooks_mutex;
RemoteHooks installed_hooks;

}  // namespace

void set_remote_hooks(const RemoteHooks& hooks) {
  std::lock_guard<std::mutex> lock(hooks_mutex);
  installed_hooks = hooks;
}

RemoteHooks remote_hooks() {
  std::lock_guard<std::mutex> lock(hooks_mutex);
  return installed_hooks;
}

}  // namespace kvreg

namespace llm_datadist {

// The public header repeats the data type table (it may include nothing of torch's).
static_assert(DT_FLOAT == static_cast<int>(kvreg::DataType::DT_FLOAT));
static_assert(DT_FLOAT16 == static_cast<int>(kvreg::DataType::DT_FLOAT16));
static_assert(DT_INT8 == static_cast<int>(kvreg::DataType::DT_INT8));
static_assert(DT_BF16 == static_cast<int>(kvreg::DataType::DT_BF16));
static_assert(DT_UNDEFINED == static_cast<int>(kvreg::DataType::DT_UNDEFINED));
static_assert(DT_FLOAT8_E4M3FN == static_cast<int>(kvreg::DataType::DT_FLOAT8_E4M3FN));

namespace {

using kvreg::Registry;

constexpr size_t kMaxClusters = 16;

// Runs `body`, turning every exception into a status: the API never throws.
template <typename Body>
Status guarded(Body&& body) noexcept {
  try {
    return body();
  } catch (const kvreg::StatusError& error) {
    return static_cast<Status>(error.status());
  } catch (const c10::Error&) {
    return LLM_FAILED;  // torch's own errors carry no status
  } catch (const std::bad_alloc&) {
    return LLM_OUT_OF_MEMORY;
  } catch (...) {
    return LLM_FAILED;
  }
}

kvreg::Options options_of(const std::map<AscendString, AscendString>& options) {
  kvreg::Options out;
  for (const auto& [key, value] : options) {
    out.emplace(key.GetString(), value.GetString());
  }
  return out;
}

// int64 copies of uint64 block indices; false when one does not fit (out of any range).
bool signed_blocks(const std::vector<uint64_t>& blocks, std::vector<int64_t>& out) {
  out.clear();
  for (uint64_t block : blocks) {
    if (block > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return false;
    }
    out.push_back(static_cast<int64_t>(block));
  }
  return true;
}

at::Tensor block_tensor(const std::vector<int64_t>& blocks) {
  return at::tensor(blocks, at::TensorOptions().dtype(at::kLong));
}

// Whether option llm.VerifyTransfers asks for every transfer of the process to be verified.
bool verify_all() {
  const kvreg::Options options = Registry::instance().config().options;
  const auto found = options.find(kvreg::kOptionVerifyTransfers);
  return found != options.end() && found->second == "1";
}

// A verified local copy (torch_kvreg.verify's, natively): HOST caches in one pass
// (kvreg::copy_blocks_verified), others with the CRCs taken before and after the copy.
// LLM_FAILED when a destination block differs from its source.
Status verified_copy(
    int64_t src_id, int64_t dst_id, const std::vector<int64_t>& src_blocks,
    const std::vector<int64_t>& dst_blocks, bool slice, int64_t offset, int64_t size) {
  const at::Tensor sources = block_tensor(src_blocks), destinations = block_tensor(dst_blocks);
  const bool on_host = Registry::instance().get(src_id).desc.placement == kvreg::Placement::HOST &&
                       Registry::instance().get(dst_id).desc.placement == kvreg::Placement::HOST;
  at::Tensor expected, landed;
  if (on_host) {
    const at::Tensor sums = kvreg::copy_blocks_verified(
        src_id, dst_id, sources, destinations, {}, {}, slice, offset, size, {}, {});
    expected = sums[0], landed = sums[1];
  } else {
    expected = kvreg::checksum_blocks(src_id, {}, sources, offset, size);
    if (slice) {
      kvreg::copy_kv_cache(src_id, dst_id, src_blocks[0], dst_blocks[0], offset, size);
    } else {
      kvreg::copy_kv_blocks(src_id, dst_id, sources, destinations);
    }
    landed = kvreg::checksum_blocks(dst_id, {}, destinations, offset, size);
  }
  return at::equal(expected, landed) ? LLM_SUCCESS : LLM_FAILED;
}

// KvCacheExtParam's inclusive pair as a half-open range; {-1, -1}: every layer (stop 0).
bool layer_range(const std::pair<int32_t, int32_t>& range, int64_t& first, int64_t& stop) {
  if (range.first == -1 && range.second == -1) {
    first = stop = 0;
    return true;
  }
  if (range.first < 0 || range.second < range.first) {
    return false;
  }
  first = range.first;
  stop = static_cast<int64_t>(range.second) + 1;
  return true;
}

}  // namespace

class LlmDataDist::Impl {
 public:
  uint64_t cluster_id;
  LlmRole role;
  bool initialized = false;
};

LlmDataDist::LlmDataDist(uint64_t cluster_id, LlmRole role) : impl_(new Impl{cluster_id, role}) {}

LlmDataDist::~LlmDataDist() = default;

Status LlmDataDist::Initialize(const std::map<AscendString, AscendString>& options) {
  return guarded([&]() -> Status {
    const auto role = static_cast<int32_t>(impl_->role);
    if (role < 1 || role > 3 ||
        impl_->cluster_id > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return LLM_PARAM_INVALID;
    }
    const kvreg::Options native = kvreg::native_options_from_upstream(options_of(options));
    const kvreg::RemoteHooks hooks = kvreg::remote_hooks();
    if (hooks.initialize != nullptr) {  // the Python layer also starts listening
      const Status status = hooks.initialize(impl_->cluster_id, role, native);
      impl_->initialized = status == LLM_SUCCESS;
      return status;
    }
    if (native.count(kvreg::kOptionListenIpInfo) != 0) {
      return LLM_FEATURE_NOT_ENABLED;  // serving peers needs the Python package in this process
    }
    kvreg::InitConfig config;
    config.cluster_id = static_cast<int64_t>(impl_->cluster_id);
    config.role = role;
    config.device_id = kvreg::option_int(native, kvreg::kOptionDeviceId, -1);
    config.wait_ms =
        kvreg::option_int(native, kvreg::kOptionSyncKvCacheWaitTime, kvreg::kDefaultSyncKvCacheWaitTimeMs);
    config.options = native;
    Registry::instance().initialize(config);
    impl_->initialized = true;
    return LLM_SUCCESS;
  });
}

void LlmDataDist::Finalize() {
  guarded([&]() -> Status {
    if (!impl_->initialized) {
      return LLM_SUCCESS;
    }
    impl_->initialized = false;
    const kvreg::RemoteHooks hooks = kvreg::remote_hooks();
    if (hooks.finalize != nullptr) {
      hooks.finalize();
    } else {
      Registry::instance().finalize();
    }
    return LLM_SUCCESS;
  });
}

Status LlmDataDist::SetRole(LlmRole role, const std::map<AscendString, AscendString>& options) {
  return guarded([&]() -> Status {
    const auto value = static_cast<int32_t>(role);
    if (value < 1 || value > 3) {
      return LLM_PARAM_INVALID;
    }
    Registry::instance().require_initialized();
    const kvreg::Options native = kvreg::native_options_from_upstream(options_of(options));
    const kvreg::RemoteHooks hooks = kvreg::remote_hooks();
    if (hooks.set_role != nullptr) {
      const Status status = hooks.set_role(value, native);
      if (status == LLM_SUCCESS) {
        impl_->role = role;
      }
      return status;
    }
    if (native.count(kvreg::kOptionListenIpInfo) != 0 || role == LlmRole::kPrompt) {
      return LLM_FEATURE_NOT_ENABLED;  // listening needs the Python package in this process
    }
    impl_->role = role;
    return LLM_SUCCESS;
  });
}

namespace {

// What LinkLlmClusters and UnlinkLlmClusters share: the cluster cap, the timeout, and a
// status per cluster (`each`), the first failure being the call's.
template <typename Each>
Status per_cluster(
    const std::vector<ClusterInfo>& clusters, std::vector<Status>& rets, int32_t timeout_in_millis,
    bool hooked, Status without_python, Each&& each) {
  return guarded([&]() -> Status {
    rets.assign(clusters.size(), LLM_SUCCESS);
    if (clusters.size() > kMaxClusters) {
      rets.assign(clusters.size(), LLM_CLUSTER_NUM_EXCEED_LIMIT);
      return LLM_CLUSTER_NUM_EXCEED_LIMIT;
    }
    if (timeout_in_millis <= 0) {
      return LLM_PARAM_INVALID;
    }
    Registry::instance().require_initialized();
    if (!hooked) {
      rets.assign(clusters.size(), without_python);
      return clusters.empty() ? LLM_SUCCESS : without_python;
    }
    Status overall = LLM_SUCCESS;
    for (size_t i = 0; i < clusters.size(); ++i) {
      rets[i] = each(clusters[i]);
      if (rets[i] != LLM_SUCCESS && overall == LLM_SUCCESS) {
        overall = rets[i];
      }
    }
    return overall;
  });
}

}  // namespace

Status LlmDataDist::LinkLlmClusters(
    const std::vector<ClusterInfo>& clusters, std::vector<Status>& rets, int32_t timeout_in_millis) {
  const kvreg::RemoteHooks hooks = kvreg::remote_hooks();
  // Linking needs the Python layer: without it, LLM_FEATURE_NOT_ENABLED.
  return per_cluster(
      clusters, rets, timeout_in_millis, hooks.link != nullptr, LLM_FEATURE_NOT_ENABLED,
      [&](const ClusterInfo& cluster) -> Status {
        if (cluster.remote_ip_infos.empty()) {
          return LLM_PARAM_INVALID;
        }
        const IpInfo& address = cluster.remote_ip_infos[0];
        return hooks.link(cluster.remote_cluster_id, address.ip.GetString(), address.port, timeout_in_millis);
      });
}

Status LlmDataDist::UnlinkLlmClusters(
    const std::vector<ClusterInfo>& clusters, std::vector<Status>& rets, int32_t timeout_in_millis,
    bool force_flag) {
  const kvreg::RemoteHooks hooks = kvreg::remote_hooks();
  // Without the Python layer nothing can have been linked: LLM_NOT_YET_LINK.
  return per_cluster(
      clusters, rets, timeout_in_millis, hooks.unlink != nullptr, LLM_NOT_YET_LINK,
      [&](const ClusterInfo& cluster) -> Status {
        return hooks.unlink(cluster.remote_cluster_id, timeout_in_millis, force_flag);
      });
}

Status LlmDataDist::AllocateCache(const CacheDesc& cache_desc, Cache& cache) {
  return guarded([&]() -> Status {
    Registry::instance().require_initialized();
    const bool on_device = cache_desc.placement == CachePlacement::kDevice;
    if (cache_desc.placement != CachePlacement::kHost && !on_device) {
      return LLM_PARAM_INVALID;
    }
    const kvreg::CacheDesc desc = kvreg::CacheDesc::validated(
        cache_desc.num_tensors, static_cast<int64_t>(cache_desc.data_type), cache_desc.shape,
        on_device ? 1 : 0, -1);
    if (on_device && !kvreg::cuda_available()) {
      return LLM_FEATURE_NOT_ENABLED;
    }
    const auto scalar_type = kvreg::scalar_type_from_data_type(desc.data_type);
    at::TensorOptions options = at::TensorOptions().dtype(scalar_type);
    if (on_device) {
      options = options.device(at::kCUDA);
    }
    std::vector<at::Tensor> tensors;
    try {
      for (int64_t i = 0; i < desc.num_tensors; ++i) {
        tensors.push_back(at::empty(desc.shape, options));
      }
    } catch (const c10::Error&) {
      return on_device ? LLM_DEVICE_OUT_OF_MEMORY : LLM_OUT_OF_MEMORY;
    }
    const int64_t cache_id = kvreg::register_tensors(tensors, true, -1, {});
    cache.cache_id = cache_id;
    cache.tensor_addrs.clear();
    for (const auto& tensor : tensors) {
      cache.tensor_addrs.push_back(reinterpret_cast<uintptr_t>(tensor.data_ptr()));
    }
    cache.cache_desc = cache_desc;
    return LLM_SUCCESS;
  });
}

Status LlmDataDist::DeallocateCache(int64_t cache_id) {
  const Status status = UnregisterKvCache(cache_id);
  return status == LLM_KV_CACHE_NOT_EXIST ? LLM_SUCCESS : status;
}

Status LlmDataDist::RegisterKvCache(
    const CacheDesc& cache_desc, const std::vector<uint64_t>& addrs, const RegisterCfg& /*cfg*/,
    int64_t& cache_id) {
  return guarded([&]() -> Status {
    std::vector<int64_t> signed_addrs;
    if (!signed_blocks(addrs, signed_addrs)) {
      return LLM_PARAM_INVALID;  // above the 63-bit address space
    }
    const auto placement = static_cast<uint32_t>(cache_desc.placement);
    if (placement > 1) {
      return LLM_PARAM_INVALID;
    }
    cache_id = kvreg::register_addrs(
        cache_desc.num_tensors, static_cast<int64_t>(cache_desc.data_type), cache_desc.shape, placement, -1,
        signed_addrs, /*pin_host_memory=*/true, /*remote_accessible=*/-1, {});
    return LLM_SUCCESS;
  });
}

Status LlmDataDist::UnregisterKvCache(int64_t cache_id) {
  return guarded([&]() -> Status {
    Registry::instance().unregister_cache(cache_id);
    return LLM_SUCCESS;
  });
}

Status LlmDataDist::CopyKvCache(
    const Cache& src_cache, const Cache& dst_cache, uint32_t src_batch_index, uint32_t dst_batch_index,
    uint64_t offset, int64_t size) {
  return guarded([&]() -> Status {
    if (offset > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return LLM_PARAM_INVALID;
    }
    if (verify_all()) {
      return verified_copy(
          src_cache.cache_id, dst_cache.cache_id, {src_batch_index}, {dst_batch_index}, true,
          static_cast<int64_t>(offset), size);
    }
    kvreg::copy_kv_cache(
        src_cache.cache_id, dst_cache.cache_id, src_batch_index, dst_batch_index,
        static_cast<int64_t>(offset), size);
    return LLM_SUCCESS;
  });
}

Status LlmDataDist::CopyKvBlocks(
    const Cache& src_cache, const Cache& dst_cache, const std::vector<uint64_t>& src_blocks,
    const std::vector<std::vector<uint64_t>>& dst_blocks_list) {
  return guarded([&]() -> Status {
    std::vector<int64_t> sources;
    if (dst_blocks_list.empty() || !signed_blocks(src_blocks, sources)) {
      return LLM_PARAM_INVALID;
    }
    // Every group is checked before any byte moves.
    const kvreg::CacheRecord src = Registry::instance().get(src_cache.cache_id);
    const kvreg::CacheRecord dst = Registry::instance().get(dst_cache.cache_id);
    std::vector<std::vector<int64_t>> groups(dst_blocks_list.size());
    for (size_t g = 0; g < dst_blocks_list.size(); ++g) {
      if (dst_blocks_list[g].size() != src_blocks.size() || !signed_blocks(dst_blocks_list[g], groups[g])) {
        return LLM_PARAM_INVALID;
      }
      kvreg::plan_blocks(
          src.desc, src.cache_id, dst.desc, dst.cache_id, src.cache_id == dst.cache_id, sources, groups[g],
          kvreg::kMaxSegmentBytes);
    }
    const at::Tensor source_tensor = block_tensor(sources);
    const bool verify = verify_all();
    for (const auto& group : groups) {
      if (verify) {
        const Status status =
            verified_copy(src_cache.cache_id, dst_cache.cache_id, sources, group, false, 0, -1);
        if (status != LLM_SUCCESS) {
          return status;
        }
        continue;
      }
      kvreg::copy_kv_blocks(src_cache.cache_id, dst_cache.cache_id, source_tensor, block_tensor(group));
    }
    return LLM_SUCCESS;
  });
}

namespace {

Status remote_transfer(kvreg::RemoteTransfer transfer, const KvCacheExtParam& ext_param) {
  return guarded([&]() -> Status {
    Registry::instance().require_initialized();
    const kvreg::RemoteHooks hooks = kvreg::remote_hooks();
    if (hooks.transfer == nullptr) {
      return LLM_FEATURE_NOT_ENABLED;  // transfers between processes need the Python package
    }
    int64_t src_first = 0, src_stop = 0, dst_first = 0, dst_stop = 0;
    if (!layer_range(ext_param.src_layer_range, src_first, src_stop) ||
        !layer_range(ext_param.dst_layer_range, dst_first, dst_stop) || ext_param.tensor_num_per_layer == 0 ||
        ext_param.verify > 1) {
      return LLM_PARAM_INVALID;
    }
    transfer.tensors_per_layer = ext_param.tensor_num_per_layer;
    transfer.verify = ext_param.verify == 1;
    if (transfer.pull) {
      transfer.remote_first_layer = src_first, transfer.remote_stop_layer = src_stop;
      transfer.local_first_layer = dst_first, transfer.local_stop_layer = dst_stop;
    } else {
      transfer.local_first_layer = src_first, transfer.local_stop_layer = src_stop;
      transfer.remote_first_layer = dst_first, transfer.remote_stop_layer = dst_stop;
    }
    return hooks.transfer(transfer);
  });
}

}  // namespace

namespace {

kvreg::RemoteTransfer transfer_of(bool pull, bool blocks, const CacheIndex& remote, const Cache& local) {
  kvreg::RemoteTransfer transfer;
  transfer.pull = pull;
  transfer.blocks = blocks;
  transfer.cluster_id = remote.cluster_id;
  transfer.remote_cache_id = remote.cache_id;
  transfer.remote_index = remote.batch_index;
  transfer.local_cache_id = local.cache_id;
  return transfer;
}

Status slice_transfer(
    bool pull, const CacheIndex& remote, const Cache& local, uint32_t local_index, int64_t size,
    const KvCacheExtParam& ext_param) {
  kvreg::RemoteTransfer transfer = transfer_of(pull, /*blocks=*/false, remote, local);
  transfer.local_index = local_index;
  transfer.size = size;
  return remote_transfer(std::move(transfer), ext_param);
}

Status blocks_transfer(
    bool pull, const CacheIndex& remote, const Cache& local, const std::vector<uint64_t>& src_blocks,
    const std::vector<uint64_t>& dst_blocks, const KvCacheExtParam& ext_param) {
  kvreg::RemoteTransfer transfer = transfer_of(pull, /*blocks=*/true, remote, local);
  if (!signed_blocks(src_blocks, transfer.src_blocks) || !signed_blocks(dst_blocks, transfer.dst_blocks)) {
    return LLM_PARAM_INVALID;
  }
  return remote_transfer(std::move(transfer), ext_param);
}

}  // namespace

Status LlmDataDist::PullKvCache(
    const CacheIndex& src_cache_index, const Cache& dst_cache, uint32_t batch_index, int64_t size,
    const KvCacheExtParam& ext_param) {
  return slice_transfer(true, src_cache_index, dst_cache, batch_index, size, ext_param);
}

Status LlmDataDist::PushKvCache(
    const Cache& src_cache, const CacheIndex& dst_cache_index, uint32_t src_batch_index, int64_t size,
    const KvCacheExtParam& ext_param) {
  return slice_transfer(false, dst_cache_index, src_cache, src_batch_index, size, ext_param);
}

Status LlmDataDist::PullKvBlocks(
    const CacheIndex& src_cache_index, const Cache& dst_cache, const std::vector<uint64_t>& src_blocks,
    const std::vector<uint64_t>& dst_blocks, const KvCacheExtParam& ext_param) {
  return blocks_transfer(true, src_cache_index, dst_cache, src_blocks, dst_blocks, ext_param);
}

Status LlmDataDist::PushKvBlocks(
    const Cache& src_cache, const CacheIndex& dst_cache_index, const std::vector<uint64_t>& src_blocks,
    const std::vector<uint64_t>& dst_blocks, const KvCacheExtParam& ext_param) {
  return blocks_transfer(false, dst_cache_index, src_cache, src_blocks, dst_blocks, ext_param);
}

}  // namespace llm_datadist
