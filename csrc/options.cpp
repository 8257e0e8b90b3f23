// The option table of the C++ API and the checks of its values (see options.h).
#include "options.h"

#include "status.h"

#include <algorithm>

namespace kvreg {

namespace {

// How LLM-DataDist's facades read a key's value (options.py Form).
enum class Form { kSame, kDeviceList, kAddress, kIgnored };

struct UpstreamOption {
  const char* key;
  Form form;
  const char* sets;  // the native key it sets; nullptr when ignored
};

// options.py's rows that have a Form, in its order.
constexpr UpstreamOption kUpstreamOptions[] = {
    {"llm.DeviceId", Form::kDeviceList, kOptionDeviceId},
    {"llm.ListenIpInfo", Form::kAddress, kOptionListenIpInfo},
    {"llm.SyncKvCacheWaitTime", Form::kSame, kOptionSyncKvCacheWaitTime},
    {"llm.VerifyTransfers", Form::kSame, kOptionVerifyTransfers},
    {"llm.listenIpInfo", Form::kAddress, kOptionListenIpInfo},
    {"ge.exec.deviceId", Form::kDeviceList, kOptionDeviceId},
    {"ge.session_device_id", Form::kDeviceList, kOptionDeviceId},
    {"llm.MemoryUtilization", Form::kIgnored, nullptr},
    {"llm.EnableCacheManager", Form::kIgnored, nullptr},
    {"llm.EnableRemoteCacheAccessible", Form::kIgnored, nullptr},
    {"llm.LocalCommRes", Form::kIgnored, nullptr},
    {"llm.TransferBackend", Form::kIgnored, nullptr},
    {"llm.LinkTotalTime", Form::kIgnored, nullptr},
    {"llm.LinkRetryCount", Form::kIgnored, nullptr},
    {"llm.RdmaTrafficClass", Form::kIgnored, nullptr},
    {"llm.RdmaServiceLevel", Form::kIgnored, nullptr},
    {"llm.EnableSwitchRole", Form::kIgnored, nullptr},
    {"llm.MemPoolConfig", Form::kIgnored, nullptr},
    {"llm.HostMemPoolConfig", Form::kIgnored, nullptr},
    {"llm.BufPoolCfg", Form::kIgnored, nullptr},
    {"llm.deployResPath", Form::kIgnored, nullptr},
    {"llm.OutputMaxSize", Form::kIgnored, nullptr},
    {"llm.ClusterInfo", Form::kIgnored, nullptr},
    {"llm.GlobalResourceConfig", Form::kIgnored, nullptr},
    {"ge.flowGraphMemMaxSize", Form::kIgnored, nullptr},
};
constexpr char kIgnoredPrefix[] = "ge.";

const UpstreamOption* find_upstream(const std::string& key) {
  for (const auto& option : kUpstreamOptions) {
    if (key == option.key) {
      return &option;
    }
  }
  return nullptr;
}

// Decimal digits (ASCII) of a value in [low, high].
bool digits_in(const std::string& text, int64_t low, int64_t high) {
  if (text.empty() || text.size() > std::to_string(high).size() ||
      !std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    return false;
  }
  const int64_t value = std::stoll(text);
  return low <= value && value <= high;
}

// options.py check_value for the native key `native_key`; `key` names the value.
void check_value(const std::string& key, const std::string& native_key, const std::string& value) {
  if (native_key == kOptionDeviceId) {
    KVREG_CHECK_ARG(
        digits_in(value, 0, kMaxDeviceId), key, " must be a device id, 0 to ", kMaxDeviceId, ", got '", value,
        "'");
  } else if (native_key == kOptionSyncKvCacheWaitTime) {
    KVREG_CHECK_ARG(
        digits_in(value, 1, kMaxSyncKvCacheWaitTimeMs), key, " must be a positive int of ms, got '", value,
        "'");
  } else if (native_key == kOptionVerifyTransfers) {
    KVREG_CHECK_ARG(value == "0" || value == "1", key, " must be '0' or '1', got '", value, "'");
  }
}

}  // namespace

Options native_options_from_upstream(const Options& upstream) {
  Options native;
  for (const auto& [key, value] : upstream) {
    const UpstreamOption* option = find_upstream(key);
    if (option == nullptr) {
      KVREG_CHECK_ARG(key.rfind(kIgnoredPrefix, 0) == 0, "unknown option '", key, "'");
      continue;
    }
    if (option->form == Form::kIgnored || (option->form == Form::kAddress && value.empty())) {
      continue;
    }
    const std::string read = option->form == Form::kDeviceList ? value.substr(0, value.find(';')) : value;
    check_value(key, option->sets, read);
    const auto [kept, inserted] = native.emplace(option->sets, read);
    KVREG_CHECK_ARG(
        inserted || kept->second == read, "option ", key, "='", read, "' disagrees with ", option->sets, "='",
        kept->second, "'");
  }
  return native;
}

int64_t option_int(const Options& native, const char* key, int64_t fallback) {
  const auto found = native.find(key);
  return found == native.end() ? fallback : std::stoll(found->second);
}

}  // namespace kvreg
