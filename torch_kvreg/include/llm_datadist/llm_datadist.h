// torch_kvreg's C++ API in the shape of CANN LLM-DataDist's llm_datadist::LlmDataDist.
//
// Standard library only. Build a program with
//   c++ -std=c++17 prog.cpp $(python -m torch_kvreg.config --cflags --libs)
// Registration and local copies work in any process; links, pulls and pushes need the
// torch_kvreg Python package loaded in the process (they return LLM_FEATURE_NOT_ENABLED
// otherwise). C++, Python and torch.ops.llm share one registry per process.
#ifndef TORCH_KVREG_LLM_DATADIST_H_
#define TORCH_KVREG_LLM_DATADIST_H_

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#define TORCH_KVREG_API __attribute__((visibility("default")))

namespace llm_datadist {

using Status = uint32_t;

// A string that can key a std::map, as upstream's ge::AscendString.
class AscendString {
 public:
  AscendString() = default;
  AscendString(const char* text) : text_(text == nullptr ? "" : text) {}  // NOLINT: implicit, as upstream
  AscendString(const char* text, size_t length) : text_(text == nullptr ? "" : std::string(text, length)) {}
  const char* GetString() const { return text_.c_str(); }
  size_t GetLength() const { return text_.size(); }
  bool operator<(const AscendString& other) const { return text_ < other.text_; }
  bool operator>(const AscendString& other) const { return text_ > other.text_; }
  bool operator==(const AscendString& other) const { return text_ == other.text_; }
  bool operator!=(const AscendString& other) const { return text_ != other.text_; }
  bool operator<=(const AscendString& other) const { return text_ <= other.text_; }
  bool operator>=(const AscendString& other) const { return text_ >= other.text_; }

 private:
  std::string text_;
};

// Options of Initialize / SetRole.
constexpr const char OPTION_LISTEN_IP_INFO[] = "llm.ListenIpInfo";
constexpr const char OPTION_DEVICE_ID[] = "llm.DeviceId";
constexpr const char OPTION_SYNC_CACHE_WAIT_TIME[] = "llm.SyncKvCacheWaitTime";
constexpr const char OPTION_BUF_POOL_CFG[] = "llm.BufPoolCfg";
constexpr const char OPTION_ENABLE_SET_ROLE[] = "llm.EnableSwitchRole";
constexpr const char OPTION_LOCAL_COMM_RES[] = "llm.LocalCommRes";
constexpr const char OPTION_TRANSFER_BACKEND[] = "llm.TransferBackend";

// Status codes, upstream's values.
constexpr Status LLM_SUCCESS = 0x0U;
constexpr Status LLM_FAILED = 0xFFFFFFFFU;
constexpr Status LLM_WAIT_PROC_TIMEOUT = 0x5010B001U;
constexpr Status LLM_KV_CACHE_NOT_EXIST = 0x5010B002U;
constexpr Status LLM_PARAM_INVALID = 0x5010B005U;
constexpr Status LLM_NOT_YET_LINK = 0x5010B007U;
constexpr Status LLM_ALREADY_LINK = 0x5010B008U;
constexpr Status LLM_LINK_FAILED = 0x5010B009U;
constexpr Status LLM_UNLINK_FAILED = 0x5010B00AU;
constexpr Status LLM_NOTIFY_PROMPT_UNLINK_FAILED = 0x5010B00BU;
constexpr Status LLM_CLUSTER_NUM_EXCEED_LIMIT = 0x5010B00CU;
constexpr Status LLM_PROCESSING_LINK = 0x5010B00DU;
constexpr Status LLM_DEVICE_OUT_OF_MEMORY = 0x5010B00EU;
constexpr Status LLM_EXIST_LINK = 0x5010B018U;
constexpr Status LLM_FEATURE_NOT_ENABLED = 0x5010B019U;
constexpr Status LLM_TIMEOUT = 0x5010B01AU;
constexpr Status LLM_LINK_BUSY = 0x5010B01BU;
constexpr Status LLM_OUT_OF_MEMORY = 0x5010B01CU;

// Data types, CANN GE's values (those torch can hold).
enum DataType : int32_t {
  DT_FLOAT = 0,
  DT_FLOAT16 = 1,
  DT_INT8 = 2,
  DT_INT32 = 3,
  DT_UINT8 = 4,
  DT_INT16 = 6,
  DT_UINT16 = 7,
  DT_UINT32 = 8,
  DT_INT64 = 9,
  DT_UINT64 = 10,
  DT_DOUBLE = 11,
  DT_BOOL = 12,
  DT_BF16 = 27,
  DT_UNDEFINED = 28,
  DT_FLOAT8_E5M2 = 35,
  DT_FLOAT8_E4M3FN = 36,
};

struct IpInfo {
  AscendString ip;
  uint16_t port = 0U;
  uint8_t reserved[128] = {0};
};

struct ClusterInfo {
  uint64_t remote_cluster_id = 0U;
  int32_t remote_role_type = 0;
  std::vector<IpInfo> local_ip_infos;
  std::vector<IpInfo> remote_ip_infos;
  uint8_t reserved[128] = {0};
};

enum class LlmRole : int32_t { kPrompt = 1, kDecoder = 2, kMix = 3, kEnd };

struct CacheIndex {
  uint64_t cluster_id = 0U;
  int64_t cache_id = -1;
  uint32_t batch_index = 0U;
  uint8_t reserved[128] = {0};
};

enum class CachePlacement : uint32_t { kHost = 0U, kDevice = 1U };

struct CacheDesc {
  CachePlacement placement = CachePlacement::kDevice;
  uint32_t num_tensors = 0U;
  DataType data_type = DT_UNDEFINED;
  std::vector<int64_t> shape;
  uint8_t reserved[128] = {0};
};

struct Cache {
  int64_t cache_id = -1;
  std::vector<uintptr_t> tensor_addrs;
  CacheDesc cache_desc;
  uint8_t reserved[128] = {0};
};

// Layer ranges are inclusive pairs; {-1, -1} means every layer.
struct KvCacheExtParam {
  std::pair<int32_t, int32_t> src_layer_range = {-1, -1};
  std::pair<int32_t, int32_t> dst_layer_range = {-1, -1};
  uint8_t tensor_num_per_layer = 2U;
  // torch_kvreg's extension, in the first byte upstream reserves (the struct keeps its
  // size): 1 verifies this pull or push as option llm.VerifyTransfers = "1" verifies all
  // (a CRC-32C of every source block compared with the block once it landed; a difference
  // is LLM_FAILED); 0 leaves it to the option; any other value is LLM_PARAM_INVALID.
  uint8_t verify = 0U;
  uint8_t reserved[126] = {0};
};

// Reserved upstream; here registration uses torch_kvreg's defaults (HOST memory pinned
// where CUDA exists; DEVICE caches remotely reachable, HOST caches not).
struct RegisterCfg {
  uint8_t reserved[128] = {0};
};

// Every method returns a status and never throws.
class TORCH_KVREG_API LlmDataDist {
 public:
  LlmDataDist(uint64_t cluster_id, LlmRole role);
  ~LlmDataDist();
  LlmDataDist(const LlmDataDist&) = delete;
  LlmDataDist& operator=(const LlmDataDist&) = delete;

  Status Initialize(const std::map<AscendString, AscendString>& options);
  void Finalize();
  Status SetRole(LlmRole role, const std::map<AscendString, AscendString>& options = {});
  Status LinkLlmClusters(
      const std::vector<ClusterInfo>& clusters, std::vector<Status>& rets, int32_t timeout_in_millis = 1000);
  Status UnlinkLlmClusters(
      const std::vector<ClusterInfo>& clusters, std::vector<Status>& rets, int32_t timeout_in_millis = 1000,
      bool force_flag = false);
  Status AllocateCache(const CacheDesc& cache_desc, Cache& cache);
  // LLM_SUCCESS also when the cache does not exist (any more), as upstream documents.
  Status DeallocateCache(int64_t cache_id);
  Status PullKvCache(
      const CacheIndex& src_cache_index, const Cache& dst_cache, uint32_t batch_index = 0U, int64_t size = -1,
      const KvCacheExtParam& ext_param = {});
  Status PullKvBlocks(
      const CacheIndex& src_cache_index, const Cache& dst_cache, const std::vector<uint64_t>& src_blocks,
      const std::vector<uint64_t>& dst_blocks, const KvCacheExtParam& ext_param = {});
  Status CopyKvCache(
      const Cache& src_cache, const Cache& dst_cache, uint32_t src_batch_index = 0U,
      uint32_t dst_batch_index = 0U, uint64_t offset = 0U, int64_t size = -1);
  // Local copies take no per-call parameters upstream: llm.VerifyTransfers = "1" verifies
  // them (and every pull and push), a difference being LLM_FAILED.
  // Copies src_blocks into every destination group of dst_blocks_list (each the same length).
  Status CopyKvBlocks(
      const Cache& src_cache, const Cache& dst_cache, const std::vector<uint64_t>& src_blocks,
      const std::vector<std::vector<uint64_t>>& dst_blocks_list);
  Status PushKvCache(
      const Cache& src_cache, const CacheIndex& dst_cache_index, uint32_t src_batch_index = 0U,
      int64_t size = -1, const KvCacheExtParam& ext_param = {});
  Status PushKvBlocks(
      const Cache& src_cache, const CacheIndex& dst_cache_index, const std::vector<uint64_t>& src_blocks,
      const std::vector<uint64_t>& dst_blocks, const KvCacheExtParam& ext_param = {});
  Status RegisterKvCache(
      const CacheDesc& cache_desc, const std::vector<uint64_t>& addrs, const RegisterCfg& cfg,
      int64_t& cache_id);
  Status UnregisterKvCache(int64_t cache_id);

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace llm_datadist

#endif  // TORCH_KVREG_LLM_DATADIST_H_
