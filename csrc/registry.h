// The process-wide KV-cache registry: ids, the byte-interval index, limits, usage, lifetimes.
#pragma once

#include "cache_desc.h"
#include "options.h"

#include <ATen/core/Tensor.h>

#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace kvreg {

struct Limits {
  int64_t max_addrs = kMaxAddrsPerCall;
  int64_t max_device_bytes = int64_t{50} << 30;
  int64_t max_host_bytes = int64_t{20} << 30;
  bool operator==(const Limits& other) const {
    return max_addrs == other.max_addrs && max_device_bytes == other.max_device_bytes &&
           max_host_bytes == other.max_host_bytes;
  }
};

struct Usage {
  int64_t num_caches = 0;
  int64_t num_addrs = 0;
  int64_t device_bytes = 0;
  int64_t host_bytes = 0;
};

struct InitConfig {
  int64_t cluster_id = 0;
  int64_t role = 3;  // LlmRole.MIX
  int64_t device_id = -1;
  // The checked native options (the link secret as a digest); kept only so that a repeated
  // initialize() can be recognised as identical.
  Options options;
  Limits limits;
  // How long unregister waits for transfers in flight before LLM_TIMEOUT (from the
  // llm.SyncKvCacheWaitTime option).
  int64_t wait_ms = kDefaultSyncKvCacheWaitTimeMs;
  bool operator==(const InitConfig& other) const {
    return cluster_id == other.cluster_id && role == other.role && device_id == other.device_id &&
           options == other.options && limits == other.limits && wait_ms == other.wait_ms;
  }
};

struct RegisterOptions {
  bool pin_host_memory = true;
  int64_t remote_accessible = -1;  // -1: by placement (DEVICE yes, HOST no), 0 no, 1 yes
  // Names by which peers may find the cache (LLM-DataDist's cache keys): keys[i] names dim-0
  // slice i; an empty string leaves slice i unnamed. Unique among live registrations.
  std::vector<std::string> keys;
  // Serving-engine layer names (register_layer_caches): layer_names[i] is a name the engine
  // gave, name_layers[i] the registered layer (a group of tensors) it names. Names may
  // share a layer (layers that share storage are registered once).
  std::vector<std::string> layer_names;
  std::vector<int64_t> name_layers;
};

constexpr size_t kMaxKeyLength = 256;

// A copy of one registration's facts, safe to use outside the registry lock.
struct CacheRecord {
  int64_t cache_id = 0;
  CacheDesc desc;
  std::vector<uint64_t> addrs;
  bool remote_accessible = false;
  std::vector<std::string> keys;         // see RegisterOptions::keys; removed keys become ""
  std::vector<std::string> layer_names;  // see RegisterOptions::layer_names
  std::vector<int64_t> name_layers;
};

class Registry {
 public:
  static Registry& instance();

  // Same config again: no-op. Different config while initialized: LLM_FAILED.
  void initialize(const InitConfig& config);
  // Waits (at most the config's wait_ms) for transfers in flight, then unregisters
  // everything. A cache still in use after that is unregistered but kept alive, its memory
  // held, until its last transfer ends (unhold or lease release). Returns how many were
  // kept so. No-op (0) when not initialized.
  int64_t finalize();
  // Caches that finalize gave up waiting for and whose transfers have not ended yet.
  int64_t orphans() const;
  bool is_initialized() const;
  // LLM_FAILED unless initialized.
  void require_initialized() const;
  Limits limits() const;
  Usage usage() const;
  InitConfig config() const;

  // Validates against live registrations and limits, pins host memory if asked, and
  // inserts, all or nothing. `owners` (possibly empty) are kept alive until unregister.
  int64_t register_cache(
      CacheDesc desc, std::vector<uint64_t> addrs, std::vector<at::Tensor> owners,
      const RegisterOptions& options);
  // Waits (up to InitConfig::wait_ms, then LLM_TIMEOUT and no change) for transfers in
  // flight on the cache, then removes it.
  void unregister_cache(int64_t cache_id);
  std::vector<int64_t> cache_ids() const;
  CacheRecord get(int64_t cache_id) const;
  // (cache id, slice index) of a live cache registered with this key, or
  // LLM_KV_CACHE_NOT_EXIST.
  std::pair<int64_t, int64_t> find_key(const std::string& key) const;
  // Forgets a key (the cache stays registered); LLM_KV_CACHE_NOT_EXIST if unknown.
  void remove_key(const std::string& key);

  // Keeps caches registered (unregister and finalize wait) while a transfer uses them.
  class Lease {
   public:
    Lease(Lease&& other) noexcept;
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    Lease& operator=(Lease&&) = delete;
    ~Lease();
    const CacheRecord& operator[](size_t i) const { return records_[i]; }

   private:
    friend class Registry;
    Lease(Registry* registry, std::vector<CacheRecord> records);
    Registry* registry_;
    std::vector<CacheRecord> records_;
  };
  Lease lease(const std::vector<int64_t>& cache_ids);

  // A lease held across calls, for transfers that Python drives (remote peers over NIXL):
  // hold() counts a transfer in flight on a live cache, unhold() ends it.
  void hold(int64_t cache_id);
  void unhold(int64_t cache_id) noexcept;
  // Transfers and leases holding the cache now (0 for an id not registered).
  int64_t in_flight(int64_t cache_id) const;

 private:
  // What an erased entry owned, dropped by the caller after the lock is released.
  struct Released {
    std::vector<at::Tensor> owners;
    std::vector<c10::Storage> storages;
  };
  struct Entry {
    CacheRecord record;
    std::vector<at::Tensor> owners;
    // The storages behind the registered addresses and their data pointers at registration:
    // kept so that tensor.set_() cannot free the memory, compared so that a resize_() that
    // reallocated it is refused instead of copied into.
    std::vector<c10::Storage> storages;
    std::vector<const void*> storage_data;
    std::vector<bool> pinned_by_us;
    int64_t in_flight = 0;
    bool closing = false;
  };
  struct Interval {
    uint64_t end;
    int64_t cache_id;
  };

  Registry() = default;
  void check_initialized_locked() const;
  Entry& find_live_locked(int64_t cache_id);
  const Entry& find_live_locked(int64_t cache_id) const;
  // Cache id of a live registration overlapping [start, end), or 0.
  int64_t overlapping_locked(uint64_t start, uint64_t end) const;
  // Removes the entry from every index and undoes its pins; what it owned goes to
  // `released`, for the caller to drop after releasing the lock.
  void erase_locked(int64_t cache_id, Released& released);
  // Takes the entry out of the key index and the usage counts (unregistered for users).
  void unlist_locked(const Entry& entry);
  // finalize's end for a cache still in use: out of the id, key and usage indexes, into
  // orphans_, its memory (and its address range, pins and owners) kept until its last
  // transfer ends.
  void orphan_locked(int64_t cache_id);
  // Ends one transfer on an orphan; when it was the last, what it held goes to `released`.
  void end_orphan_transfer_locked(int64_t cache_id, Released& released);
  void drop_memory_locked(Entry& entry, Released& released);
  // LLM_FAILED if a registered tensor's memory was reallocated since registration.
  void check_memory_unchanged_locked(const Entry& entry) const;
  void release(const std::vector<CacheRecord>& records);

  mutable std::mutex mutex_;
  std::condition_variable transfers_done_;
  bool initialized_ = false;
  InitConfig config_;
  int64_t next_cache_id_ = 1;  // never reset: ids are unique for the life of the process
  std::map<int64_t, Entry> entries_;
  std::map<int64_t, Entry> orphans_;        // unregistered by finalize, still in use
  std::map<uint64_t, Interval> intervals_;  // start -> (end, cache id), disjoint
  std::map<std::string, int64_t> keys_;     // cache key -> cache id
  Usage usage_;
};

}  // namespace kvreg
