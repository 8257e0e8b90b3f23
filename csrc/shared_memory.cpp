// memfd regions: allocate_kv_cache's memory, and a same-host peer's mapping of it.
#include "shared_memory.h"

#include "status.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <map>
#include <mutex>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14; older kernels refuse it (EINVAL) and fault lazily
#endif

namespace kvreg::shared_memory {
namespace {

std::atomic<int64_t> live{0};
std::mutex created_mutex;
std::map<uint64_t, std::weak_ptr<Region>>& created_regions() {  // by base address, under created_mutex
  static auto* regions = new std::map<uint64_t, std::weak_ptr<Region>>();  // never freed: used at exit
  return *regions;
}

constexpr unsigned kSeals = F_SEAL_SHRINK | F_SEAL_GROW;

[[noreturn]] void fail_errno(int error, const char* what) {
  if (error == ENOMEM || error == ENOSPC || error == EMFILE || error == ENFILE) {
    KVREG_FAIL_(Error, LLM_OUT_OF_MEMORY, what, " failed: ", std::strerror(error));
  }
  KVREG_FAIL_(Error, LLM_FAILED, what, " failed: ", std::strerror(error));
}

}  // namespace

std::shared_ptr<Region> Region::create(const std::string& name, uint64_t nbytes) {
  KVREG_CHECK_ARG(nbytes > 0, "a shared region needs at least one byte");
  KVREG_CHECK_ARG(nbytes <= (uint64_t{1} << 62), "a shared region of ", nbytes, " bytes is too large");
  const int fd = memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) {
    fail_errno(errno, "memfd_create");
  }
  if (ftruncate(fd, static_cast<off_t>(nbytes)) != 0 || fcntl(fd, F_ADD_SEALS, kSeals | F_SEAL_SEAL) != 0) {
    const int error = errno;
    close(fd);
    fail_errno(error, "sizing the memfd");
  }
  void* base = mmap(nullptr, nbytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) {
    const int error = errno;
    close(fd);
    fail_errno(error, "mmap of the memfd");
  }
  madvise(base, nbytes, MADV_HUGEPAGE);  // a hint: refused where shmem has no huge pages
  ++live;
  std::shared_ptr<Region> region(new Region(name, fd, base, nbytes, true));
  std::lock_guard<std::mutex> lock(created_mutex);
  created_regions()[region->base()] = region;
  return region;
}

std::shared_ptr<Region> Region::map(int fd, uint64_t nbytes) {
  struct stat info{};
  const int seals = fcntl(fd, F_GET_SEALS);
  if (nbytes == 0 || seals < 0 || (static_cast<unsigned>(seals) & F_SEAL_SHRINK) == 0 ||
      fstat(fd, &info) != 0 || static_cast<uint64_t>(info.st_size) < nbytes) {
    close(fd);
    KVREG_CHECK_ARG(false, "the peer's memfd is not a sealed region of ", nbytes, " bytes");
  }
  void* base = mmap(nullptr, nbytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) {
    const int error = errno;
    close(fd);
    fail_errno(error, "mmap of the peer's memfd");
  }
  madvise(base, nbytes, MADV_POPULATE_WRITE);  // best effort: copies fault lazily without it
  ++live;
  return std::shared_ptr<Region>(new Region("", fd, base, nbytes, false));
}

Region::~Region() {
  if (created_) {
    std::lock_guard<std::mutex> lock(created_mutex);
    created_regions().erase(base());
  }
  munmap(base_, size_);
  close(fd_);
  --live;
}

bool Region::contains(uint64_t address, uint64_t nbytes) const {
  const uint64_t start = base();
  return address >= start && nbytes <= size_ && address - start <= size_ - nbytes;
}

std::shared_ptr<Region> find(uint64_t address, uint64_t nbytes) {
  std::lock_guard<std::mutex> lock(created_mutex);
  auto& regions = created_regions();
  auto next = regions.upper_bound(address);
  if (next == regions.begin()) {
    return nullptr;
  }
  std::shared_ptr<Region> region = std::prev(next)->second.lock();  // null while it is being freed
  return region != nullptr && region->contains(address, nbytes) ? region : nullptr;
}

int64_t live_regions() {
  return live.load();
}

}  // namespace kvreg::shared_memory
