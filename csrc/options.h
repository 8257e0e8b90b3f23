// The option keys of the C++ API (LlmDataDist::Initialize and SetRole) and the checks of
// their values: the C++ copy of torch_kvreg/options.py, which tests/test_sources_of_truth.py
// proves equal to it.
#pragma once

#include <cstdint>
#include <map>
#include <string>

namespace kvreg {

// Option key -> value, as an options dict: sorted, one value per key.
using Options = std::map<std::string, std::string>;

// The native keys the C++ API can set (torch_kvreg.initialize's).
constexpr char kOptionDeviceId[] = "llm.DeviceId";
constexpr char kOptionListenIpInfo[] = "llm.ListenIpInfo";
constexpr char kOptionSyncKvCacheWaitTime[] = "llm.SyncKvCacheWaitTime";
constexpr char kOptionVerifyTransfers[] = "llm.VerifyTransfers";

constexpr int64_t kDefaultSyncKvCacheWaitTimeMs = 1000;
constexpr int64_t kMaxDeviceId = 2147483647;
constexpr int64_t kMaxSyncKvCacheWaitTimeMs = 2147483647;

// LLM-DataDist's options as torch_kvreg.initialize's (options.py from_upstream): each key
// read as its form says, its value checked as the native key's. LLM_PARAM_INVALID for a key
// the table does not take, a bad value, or two keys that set one native key differently.
// Listen addresses are checked by the Python layer, which serves them: without it in the
// process, listening is LLM_FEATURE_NOT_ENABLED whatever the address.
Options native_options_from_upstream(const Options& upstream);

// A checked native option's value as an int; `fallback` when it is not set.
int64_t option_int(const Options& native, const char* key, int64_t fallback);

}  // namespace kvreg
