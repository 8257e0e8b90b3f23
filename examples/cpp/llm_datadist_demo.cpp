// An LLM-DataDist-style C++ program on torch_kvreg: initialize, register host memory as two
// KV caches, copy blocks and a batch slot between them, allocate one, clean up.
//
//   c++ -std=c++17 examples/cpp/llm_datadist_demo.cpp $(python -m torch_kvreg.config --cflags --libs)
//   ./a.out
#include "llm_datadist/llm_datadist.h"

#include <cstdio>
#include <map>
#include <vector>

using namespace llm_datadist;

namespace {

constexpr uint32_t kNumTensors = 2;
constexpr int64_t kBlocks = 4;
constexpr int64_t kBlockFloats = 8;

int failures = 0;

void expect(bool ok, const char* what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what);
  failures += ok ? 0 : 1;
}

void expect_status(Status status, Status expected, const char* what) {
  if (status != expected) {
    std::printf("FAIL %s: status 0x%X, expected 0x%X\n", what, status, expected);
    ++failures;
  } else {
    std::printf("ok   %s\n", what);
  }
}

float at(const std::vector<float>& tensor, int64_t block) {
  return tensor[block * kBlockFloats];
}

}  // namespace

int main() {
  LlmDataDist datadist(/*cluster_id=*/0, LlmRole::kPrompt);
  int64_t early_id = -1;
  CacheDesc desc;
  desc.placement = CachePlacement::kHost;
  desc.num_tensors = kNumTensors;
  desc.data_type = DT_FLOAT;
  desc.shape = {kBlocks, kBlockFloats};
  std::vector<std::vector<float>> src(kNumTensors), dst(kNumTensors);
  std::vector<uint64_t> src_addrs, dst_addrs;
  for (uint32_t t = 0; t < kNumTensors; ++t) {
    src[t].resize(kBlocks * kBlockFloats);
    dst[t].assign(kBlocks * kBlockFloats, 0.0f);
    for (int64_t i = 0; i < kBlocks * kBlockFloats; ++i) {
      src[t][i] = static_cast<float>(100 * t + i / kBlockFloats);  // block b of tensor t holds 100t + b
    }
    src_addrs.push_back(reinterpret_cast<uintptr_t>(src[t].data()));
    dst_addrs.push_back(reinterpret_cast<uintptr_t>(dst[t].data()));
  }
  expect_status(
      datadist.RegisterKvCache(desc, src_addrs, RegisterCfg(), early_id), LLM_FAILED,
      "RegisterKvCache before Initialize fails");

  std::map<AscendString, AscendString> options = {{OPTION_SYNC_CACHE_WAIT_TIME, "1000"}};
  expect_status(datadist.Initialize(options), LLM_SUCCESS, "Initialize");

  Cache src_cache, dst_cache;
  src_cache.cache_desc = dst_cache.cache_desc = desc;
  expect_status(
      datadist.RegisterKvCache(desc, src_addrs, RegisterCfg(), src_cache.cache_id), LLM_SUCCESS,
      "RegisterKvCache (source)");
  expect_status(
      datadist.RegisterKvCache(desc, dst_addrs, RegisterCfg(), dst_cache.cache_id), LLM_SUCCESS,
      "RegisterKvCache (destination)");
  std::printf(
      "     cache ids %lld and %lld\n", static_cast<long long>(src_cache.cache_id),
      static_cast<long long>(dst_cache.cache_id));

  // Blocks 0 and 2 of every source tensor into blocks 1 and 3 (one destination group).
  expect_status(datadist.CopyKvBlocks(src_cache, dst_cache, {0, 2}, {{1, 3}}), LLM_SUCCESS, "CopyKvBlocks");
  expect(
      at(dst[0], 1) == 0.0f && at(dst[0], 3) == 2.0f && at(dst[1], 3) == 102.0f && at(dst[1], 0) == 0.0f,
      "the blocks landed, nothing else changed");
  // Batch slot 3 of the source into slot 0 of the destination.
  expect_status(datadist.CopyKvCache(src_cache, dst_cache, 3, 0), LLM_SUCCESS, "CopyKvCache");
  expect(at(dst[0], 0) == 3.0f && at(dst[1], 0) == 103.0f, "the slot landed");
  expect_status(
      datadist.CopyKvBlocks(src_cache, dst_cache, {0}, {{kBlocks}}), LLM_PARAM_INVALID,
      "a block out of range is refused");

  Cache allocated;
  desc.shape = {2, 16};
  expect_status(datadist.AllocateCache(desc, allocated), LLM_SUCCESS, "AllocateCache");
  expect(allocated.tensor_addrs.size() == kNumTensors, "AllocateCache gives one address per tensor");
  expect_status(datadist.DeallocateCache(allocated.cache_id), LLM_SUCCESS, "DeallocateCache");

  std::vector<Status> rets;
  ClusterInfo peer;
  peer.remote_cluster_id = 1;
  peer.remote_ip_infos.push_back({"127.0.0.1", 26000});
  // Links and transfers between processes run in torch_kvreg's Python layer (NIXL).
  expect_status(
      datadist.LinkLlmClusters({peer}, rets, 1000), LLM_FEATURE_NOT_ENABLED,
      "LinkLlmClusters needs the Python package in the process");
  CacheIndex remote;
  remote.cluster_id = 1;
  remote.cache_id = 1;
  expect_status(
      datadist.PullKvBlocks(remote, dst_cache, {0}, {0}), LLM_FEATURE_NOT_ENABLED,
      "PullKvBlocks needs the Python package in the process");

  expect_status(datadist.UnregisterKvCache(src_cache.cache_id), LLM_SUCCESS, "UnregisterKvCache");
  expect_status(
      datadist.UnregisterKvCache(src_cache.cache_id), LLM_KV_CACHE_NOT_EXIST,
      "UnregisterKvCache of an unknown id");
  expect_status(datadist.UnregisterKvCache(dst_cache.cache_id), LLM_SUCCESS, "UnregisterKvCache");
  datadist.Finalize();
  std::printf("%s\n", failures == 0 ? "DEMO OK" : "DEMO FAILED");
  return failures == 0 ? 0 : 1;
}
