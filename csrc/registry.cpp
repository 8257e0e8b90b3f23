// The process-wide KV-cache registry: ids, the byte-interval index, limits, usage, lifetimes.
#include "registry.h"

#include "host_pin.h"
#include "status.h"

#include <algorithm>
#include <chrono>
#include <limits>
#include <utility>

namespace kvreg {

Registry& Registry::instance() {
  // Never destroyed: tensors it may still hold must not be released during static
  // destruction, after the allocators are gone. Python's atexit finalize() empties it.
  static Registry* registry = new Registry();
  return *registry;
}

void Registry::initialize(const InitConfig& config) {
  KVREG_CHECK_ARG(config.limits.max_addrs >= 0, "limits.max_addrs must be >= 0");
  KVREG_CHECK_ARG(config.limits.max_device_bytes >= 0, "limits.max_device_bytes must be >= 0");
  KVREG_CHECK_ARG(config.limits.max_host_bytes >= 0, "limits.max_host_bytes must be >= 0");
  std::lock_guard<std::mutex> lock(mutex_);
  if (initialized_) {
    KVREG_CHECK(
        config == config_, LLM_FAILED,
        "already initialized with different arguments; call torch_kvreg.finalize() first");
    return;
  }
  config_ = config;
  initialized_ = true;
}

int64_t Registry::finalize() {
  Released released;
  int64_t kept = 0;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    if (!initialized_) {
      return 0;
    }
    initialized_ = false;  // new registrations and leases fail from here on
    for (auto& [cache_id, entry] : entries_) {
      entry.closing = true;
    }
    // Bounded: a transfer that never ends (a hold leaked by a caller, a peer that vanished
    // mid-write) must not hang finalize, nor the interpreter's exit that calls it.
    transfers_done_.wait_for(lock, std::chrono::milliseconds(std::max<int64_t>(config_.wait_ms, 0)), [this] {
      return std::all_of(
          entries_.begin(), entries_.end(), [](const auto& item) { return item.second.in_flight == 0; });
    });
    std::vector<int64_t> ids;
    for (const auto& item : entries_) {
      ids.push_back(item.first);
    }
    for (int64_t cache_id : ids) {
      if (entries_.at(cache_id).in_flight == 0) {
        erase_locked(cache_id, released);
      } else {
        orphan_locked(cache_id);
        kept += 1;
      }
    }
    config_ = InitConfig();
  }
  // `released` drops the tensors here, outside the lock.
  return kept;
}

int64_t Registry::orphans() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int64_t>(orphans_.size());
}

void Registry::orphan_locked(int64_t cache_id) {
  auto node = entries_.extract(cache_id);
  unlist_locked(node.mapped());
  // Its address ranges stay in intervals_: the memory is still being written or read, so
  // registering it again must wait until the transfer has ended.
  orphans_.insert(std::move(node));
}

void Registry::end_orphan_transfer_locked(int64_t cache_id, Released& released) {
  auto it = orphans_.find(cache_id);
  if (it == orphans_.end() || it->second.in_flight == 0) {
    return;
  }
  if (--it->second.in_flight == 0) {
    drop_memory_locked(it->second, released);
    orphans_.erase(it);
  }
}

bool Registry::is_initialized() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return initialized_;
}

void Registry::require_initialized() const {
  std::lock_guard<std::mutex> lock(mutex_);
  check_initialized_locked();
}

Limits Registry::limits() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return initialized_ ? config_.limits : Limits();
}

Usage Registry::usage() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return usage_;
}

InitConfig Registry::config() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return config_;
}

void Registry::check_initialized_locked() const {
  KVREG_CHECK(
      initialized_, LLM_FAILED, "torch_kvreg is not initialized; call torch_kvreg.initialize() first");
}

Registry::Entry& Registry::find_live_locked(int64_t cache_id) {
  auto it = entries_.find(cache_id);
  KVREG_CHECK(
      it != entries_.end() && !it->second.closing, LLM_KV_CACHE_NOT_EXIST, "cache id ", cache_id,
      " is not registered");
  return it->second;
}

const Registry::Entry& Registry::find_live_locked(int64_t cache_id) const {
  return const_cast<Registry*>(this)->find_live_locked(cache_id);
}

int64_t Registry::overlapping_locked(uint64_t start, uint64_t end) const {
  // Intervals are disjoint, so only the last one starting before `end` can reach `start`.
  auto it = intervals_.lower_bound(end);
  if (it == intervals_.begin()) {
    return 0;
  }
  --it;
  return it->second.end > start ? it->second.cache_id : 0;
}

int64_t Registry::register_cache(
    CacheDesc desc, std::vector<uint64_t> addrs, std::vector<at::Tensor> owners,
    const RegisterOptions& options) {
  const int64_t num_addrs = static_cast<int64_t>(addrs.size());
  KVREG_CHECK_ARG(num_addrs > 0, "no addresses given");
  KVREG_CHECK_ARG(
      num_addrs <= kMaxAddrsPerCall, "addrs has ", num_addrs, " entries, at most ", kMaxAddrsPerCall,
      " allowed");
  KVREG_CHECK_ARG(
      num_addrs == desc.num_tensors, "addrs has ", num_addrs, " entries but cache_desc.num_tensors is ",
      desc.num_tensors);
  KVREG_CHECK_ARG(
      options.remote_accessible >= -1 && options.remote_accessible <= 1,
      "remote_accessible must be -1 (default), 0 or 1");

  // Checks that need no registry state: null, alignment, wrap-around, overlap within the call.
  const uint64_t span = static_cast<uint64_t>(desc.tensor_nbytes);
  std::vector<std::pair<uint64_t, int64_t>> starts;  // (address, position in addrs)
  for (int64_t i = 0; i < num_addrs; ++i) {
    const uint64_t addr = addrs[i];
    KVREG_CHECK_ARG(addr != 0, "addrs[", i, "] is null");
    KVREG_CHECK_ARG(
        addr % static_cast<uint64_t>(desc.element_size) == 0, "addrs[", i, "] = ", addr,
        " is not aligned to the ", desc.element_size, "-byte element size of ",
        data_type_name(static_cast<int64_t>(desc.data_type)));
    KVREG_CHECK_ARG(
        addr <= std::numeric_limits<uint64_t>::max() - span, "addrs[", i, "] + ", span,
        " bytes wraps around the address space");
    starts.emplace_back(addr, i);
  }
  std::sort(starts.begin(), starts.end());
  for (size_t k = 1; k < starts.size(); ++k) {
    KVREG_CHECK_ARG(
        starts[k - 1].first + span <= starts[k].first, "tensors ", starts[k - 1].second, " and ",
        starts[k].second, " of this call overlap");
  }

  KVREG_CHECK_ARG(
      static_cast<int64_t>(options.keys.size()) <= desc.num_blocks(), options.keys.size(),
      " cache keys for a cache of ", desc.num_blocks(), " slices");
  for (size_t i = 0; i < options.keys.size(); ++i) {
    KVREG_CHECK_ARG(
        options.keys[i].size() <= kMaxKeyLength, "cache key ", i, " is longer than ", kMaxKeyLength,
        " bytes");
    for (size_t j = 0; j < i && !options.keys[i].empty(); ++j) {
      KVREG_CHECK_ARG(options.keys[i] != options.keys[j], "cache keys ", j, " and ", i, " are equal");
    }
  }

  KVREG_CHECK_ARG(
      options.layer_names.size() == options.name_layers.size(), "layer_names has ",
      options.layer_names.size(), " entries but name_layers has ", options.name_layers.size());
  for (size_t i = 0; i < options.layer_names.size(); ++i) {
    KVREG_CHECK_ARG(
        !options.layer_names[i].empty() && options.layer_names[i].size() <= kMaxKeyLength, "layer name ", i,
        " must have 1 to ", kMaxKeyLength, " bytes");
    KVREG_CHECK_ARG(
        options.name_layers[i] >= 0 && options.name_layers[i] < num_addrs, "layer name ", i, " names layer ",
        options.name_layers[i], " of a cache of ", num_addrs, " tensors");
  }

  std::lock_guard<std::mutex> lock(mutex_);
  check_initialized_locked();
  for (const std::string& key : options.keys) {
    auto it = key.empty() ? keys_.end() : keys_.find(key);
    KVREG_CHECK_ARG(
        it == keys_.end(), "cache key '", key, "' is already registered by cache id ", it->second);
  }
  for (int64_t i = 0; i < num_addrs; ++i) {
    const int64_t other = overlapping_locked(addrs[i], addrs[i] + span);
    KVREG_CHECK_ARG(
        other == 0, "addrs[", i, "] overlaps the memory of ",
        orphans_.count(other) != 0 ? "cache id " : "registered cache id ", other,
        orphans_.count(other) != 0 ? ", which finalize unregistered while a transfer still uses it" : "");
  }

  const Limits& limits = config_.limits;
  const int64_t total_addrs = checked_add(usage_.num_addrs, num_addrs, "registered address count");
  KVREG_CHECK(
      total_addrs <= limits.max_addrs, LLM_OUT_OF_MEMORY, "registering ", num_addrs, " addresses would make ",
      total_addrs, ", over the limit of ", limits.max_addrs);
  const bool on_host = desc.placement == Placement::HOST;
  const int64_t used_bytes = on_host ? usage_.host_bytes : usage_.device_bytes;
  const int64_t max_bytes = on_host ? limits.max_host_bytes : limits.max_device_bytes;
  const int64_t total_bytes = checked_add(used_bytes, desc.nbytes, "registered byte count");
  KVREG_CHECK(
      total_bytes <= max_bytes, LLM_OUT_OF_MEMORY, "registering ", desc.nbytes, " ",
      on_host ? "host" : "device", " bytes would make ", total_bytes, ", over the limit of ", max_bytes);

  std::vector<bool> pinned_by_us(num_addrs, false);
  if (on_host && options.pin_host_memory) {
    try {
      for (int64_t i = 0; i < num_addrs; ++i) {
        pinned_by_us[i] = pin_host(reinterpret_cast<void*>(addrs[i]), span);
      }
    } catch (...) {
      for (int64_t i = 0; i < num_addrs; ++i) {
        if (pinned_by_us[i]) {
          unpin_host(reinterpret_cast<void*>(addrs[i]));
        }
      }
      throw;
    }
  }

  const int64_t cache_id = next_cache_id_++;
  Entry entry;
  entry.record.cache_id = cache_id;
  entry.record.remote_accessible =
      options.remote_accessible == -1 ? !on_host : options.remote_accessible == 1;
  entry.record.desc = std::move(desc);
  entry.record.addrs = std::move(addrs);
  for (const at::Tensor& owner : owners) {
    entry.storages.push_back(owner.storage());
    entry.storage_data.push_back(owner.storage().data());
  }
  entry.owners = std::move(owners);
  entry.pinned_by_us = std::move(pinned_by_us);
  entry.record.keys = options.keys;
  entry.record.layer_names = options.layer_names;
  entry.record.name_layers = options.name_layers;
  for (const std::string& key : entry.record.keys) {
    if (!key.empty()) {
      keys_.emplace(key, cache_id);
    }
  }
  for (uint64_t addr : entry.record.addrs) {
    intervals_.emplace(addr, Interval{addr + span, cache_id});
  }
  usage_.num_caches += 1;
  usage_.num_addrs = total_addrs;
  (on_host ? usage_.host_bytes : usage_.device_bytes) = total_bytes;
  entries_.emplace(cache_id, std::move(entry));
  return cache_id;
}

void Registry::erase_locked(int64_t cache_id, Released& released) {
  auto it = entries_.find(cache_id);
  unlist_locked(it->second);
  drop_memory_locked(it->second, released);
  entries_.erase(it);
}

void Registry::unlist_locked(const Entry& entry) {
  const CacheDesc& desc = entry.record.desc;
  for (const std::string& key : entry.record.keys) {
    if (!key.empty()) {
      keys_.erase(key);
    }
  }
  usage_.num_caches -= 1;
  usage_.num_addrs -= desc.num_tensors;
  (desc.placement == Placement::HOST ? usage_.host_bytes : usage_.device_bytes) -= desc.nbytes;
}

void Registry::drop_memory_locked(Entry& entry, Released& released) {
  const CacheDesc& desc = entry.record.desc;
  const bool device_reachable =
      desc.placement == Placement::DEVICE ||
      std::find(entry.pinned_by_us.begin(), entry.pinned_by_us.end(), true) != entry.pinned_by_us.end();
  if (device_reachable) {
    // Copies are asynchronous on CUDA streams: none may still be reading or writing this
    // memory when it is unpinned or handed back to its allocator.
    sync_device();
  }
  for (size_t i = 0; i < entry.record.addrs.size(); ++i) {
    intervals_.erase(entry.record.addrs[i]);
    if (entry.pinned_by_us[i]) {
      unpin_host(reinterpret_cast<void*>(entry.record.addrs[i]));
    }
  }
  for (auto& owner : entry.owners) {
    released.owners.push_back(std::move(owner));
  }
  for (auto& storage : entry.storages) {
    released.storages.push_back(std::move(storage));
  }
}

void Registry::check_memory_unchanged_locked(const Entry& entry) const {
  for (size_t i = 0; i < entry.storages.size(); ++i) {
    KVREG_CHECK(
        entry.storages[i].data() == entry.storage_data[i], LLM_FAILED, "the memory of tensor ", i,
        " of cache id ", entry.record.cache_id,
        " was reallocated after registration (resize_?); unregister the cache and register it again");
  }
}

void Registry::unregister_cache(int64_t cache_id) {
  Released released;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    check_initialized_locked();
    find_live_locked(cache_id).closing = true;  // no new transfer may start on it
    // Re-find on every wake-up: a finalize() waiting beside us may have erased the entry.
    const bool idle =
        transfers_done_.wait_for(lock, std::chrono::milliseconds(config_.wait_ms), [this, cache_id] {
          auto it = entries_.find(cache_id);
          return it == entries_.end() || it->second.in_flight == 0;
        });
    auto it = entries_.find(cache_id);
    if (!idle && it != entries_.end()) {
      it->second.closing = false;  // a failed call changes nothing
      KVREG_CHECK(
          false, LLM_TIMEOUT, "cache id ", cache_id, " still has ", it->second.in_flight,
          " transfer(s) in flight after ", config_.wait_ms, " ms; nothing was unregistered");
    }
    if (it != entries_.end()) {
      erase_locked(cache_id, released);
    }
  }
}

std::vector<int64_t> Registry::cache_ids() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<int64_t> ids;
  for (const auto& [cache_id, entry] : entries_) {
    if (!entry.closing) {
      ids.push_back(cache_id);
    }
  }
  return ids;
}

CacheRecord Registry::get(int64_t cache_id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  check_initialized_locked();
  return find_live_locked(cache_id).record;
}

std::pair<int64_t, int64_t> Registry::find_key(const std::string& key) const {
  std::lock_guard<std::mutex> lock(mutex_);
  check_initialized_locked();
  auto it = key.empty() ? keys_.end() : keys_.find(key);
  KVREG_CHECK(it != keys_.end(), LLM_KV_CACHE_NOT_EXIST, "no cache is registered with key '", key, "'");
  const Entry& entry = find_live_locked(it->second);
  const auto& keys = entry.record.keys;
  const int64_t index = std::find(keys.begin(), keys.end(), key) - keys.begin();
  return {it->second, index};
}

void Registry::remove_key(const std::string& key) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_initialized_locked();
  auto it = key.empty() ? keys_.end() : keys_.find(key);
  KVREG_CHECK(it != keys_.end(), LLM_KV_CACHE_NOT_EXIST, "no cache is registered with key '", key, "'");
  auto& keys = entries_.at(it->second).record.keys;
  std::replace(keys.begin(), keys.end(), key, std::string());
  keys_.erase(it);
}

Registry::Lease Registry::lease(const std::vector<int64_t>& cache_ids) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_initialized_locked();
  std::vector<CacheRecord> records;
  records.reserve(cache_ids.size());
  for (int64_t cache_id : cache_ids) {
    const Entry& entry = find_live_locked(cache_id);
    check_memory_unchanged_locked(entry);
    records.push_back(entry.record);
  }
  for (int64_t cache_id : cache_ids) {
    entries_.at(cache_id).in_flight += 1;
  }
  return Lease(this, std::move(records));
}

void Registry::hold(int64_t cache_id) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_initialized_locked();
  Entry& entry = find_live_locked(cache_id);
  check_memory_unchanged_locked(entry);
  entry.in_flight += 1;
}

int64_t Registry::in_flight(int64_t cache_id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto it = entries_.find(cache_id);
  return it == entries_.end() ? 0 : it->second.in_flight;
}

void Registry::unhold(int64_t cache_id) noexcept {
  Released released;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = entries_.find(cache_id);
    if (it == entries_.end()) {
      end_orphan_transfer_locked(cache_id, released);
    } else if (it->second.in_flight > 0) {
      it->second.in_flight -= 1;
    }
  }
  transfers_done_.notify_all();
}

void Registry::release(const std::vector<CacheRecord>& records) {
  Released released;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& record : records) {
      auto it = entries_.find(record.cache_id);
      if (it == entries_.end()) {
        end_orphan_transfer_locked(record.cache_id, released);
      } else {
        it->second.in_flight -= 1;
      }
    }
  }
  transfers_done_.notify_all();
}

Registry::Lease::Lease(Registry* registry, std::vector<CacheRecord> records)
    : registry_(registry), records_(std::move(records)) {}

Registry::Lease::Lease(Lease&& other) noexcept
    : registry_(std::exchange(other.registry_, nullptr)), records_(std::move(other.records_)) {}

Registry::Lease::~Lease() {
  if (registry_ != nullptr) {
    registry_->release(records_);
  }
}

}  // namespace kvreg
