// Host memory that two processes of one host map: allocate_kv_cache's caches live in a
// memfd, and a same-host peer maps that memfd to copy from and into them directly.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

namespace kvreg::shared_memory {

// One mapping of a memfd in this process. The memfd is sealed against shrinking and growing
// when created, and a mapping of another process's memfd requires those seals: a mapping
// never loses pages under a copy (no SIGBUS). Unmapped, and its descriptor closed, when the
// last reference goes (tensors over it hold one each, copies under way another).
class Region {
 public:
  // A new memfd of `nbytes` bytes (zero-filled, pages allocated on first touch) mapped
  // here; `name` shows in /proc/<pid>/fd. Transparent huge pages are asked for (they come
  // where shmem_enabled allows them). nbytes of 0: LLM_PARAM_INVALID; the kernel out of
  // memory or descriptors: LLM_OUT_OF_MEMORY; anything else: LLM_FAILED.
  static std::shared_ptr<Region> create(const std::string& name, uint64_t nbytes);
  // Maps `fd` (a memfd another process created, opened here through /proc/<pid>/fd/<n>):
  // at least `nbytes` long and sealed against shrinking, else LLM_PARAM_INVALID. Page
  // tables are filled now (MADV_POPULATE_WRITE where the kernel has it), so that copies do
  // not fault page by page. Takes `fd` over (closed with the region, or on failure).
  static std::shared_ptr<Region> map(int fd, uint64_t nbytes);

  ~Region();
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;

  const std::string& name() const { return name_; }
  uint64_t base() const { return reinterpret_cast<uint64_t>(base_); }
  uint64_t size() const { return size_; }
  int fd() const { return fd_; }
  // Whether [address, address + nbytes) lies inside the mapping.
  bool contains(uint64_t address, uint64_t nbytes) const;

 private:
  Region(std::string name, int fd, void* base, uint64_t size, bool created)
      : name_(std::move(name)), fd_(fd), base_(base), size_(size), created_(created) {}
  std::string name_;
  int fd_;
  void* base_;
  uint64_t size_;
  bool created_;  // made here (listed for find()), not a peer's mapped here
};

// The region created here (not one mapped from a peer) that holds [address, address +
// nbytes), or null: what a lease reply tells a same-host peer about a cache registered over
// such memory, whichever way it was registered.
std::shared_ptr<Region> find(uint64_t address, uint64_t nbytes);

// Regions alive in this process (created or mapped), for tests that check nothing leaks.
int64_t live_regions();

}  // namespace kvreg::shared_memory
