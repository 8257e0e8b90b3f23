// Kernels of copy_kv_blocks / copy_kv_cache: validation, run coalescing and the CPU copy.
#include "copy_plan.h"
#include "host_copy.h"
#include "host_pin.h"
#include "kernels.h"
#include "remote_hooks.h"
#include "status.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <emmintrin.h>
#endif

namespace kvreg {

namespace {

// GNU OpenMP cannot start a parallel region in a child forked after its parent ran one:
// the child hangs (torch's own ops do too). A forked child copies on its calling thread.
std::atomic<bool> forked_child{false};
const bool fork_handler_installed = [] {
  return pthread_atfork(nullptr, nullptr, [] { forked_child.store(true); }) == 0;
}();

int64_t concrete_id(const c10::SymInt& cache_id, const char* name) {
  const auto value = cache_id.maybe_as_int();
  KVREG_CHECK_ARG(value.has_value(), name, " must be a concrete int when the op runs");
  return *value;
}

void check_compatible(const CacheDesc& s, int64_t src_id, const CacheDesc& d, int64_t dst_id) {
  KVREG_CHECK_ARG(
      s.num_tensors == d.num_tensors, "src cache ", src_id, " has ", s.num_tensors, " tensors but dst cache ",
      dst_id, " has ", d.num_tensors);
  KVREG_CHECK_ARG(
      s.data_type == d.data_type, "src cache has data_type ",
      data_type_name(static_cast<int64_t>(s.data_type)), " but dst cache has ",
      data_type_name(static_cast<int64_t>(d.data_type)));
  KVREG_CHECK_ARG(
      s.shape.size() == d.shape.size() && std::equal(s.shape.begin() + 1, s.shape.end(), d.shape.begin() + 1),
      "src ", s.str(), " and dst ", d.str(), " differ in shape[1:]");
}

// Block indices as int64 on the host. Tensors on an accelerator are copied to the host:
// validation must see every index before any byte moves.
std::vector<int64_t> block_list(const at::Tensor& blocks, const char* name) {
#ifdef KVREG_WITH_CUDA
  KVREG_CHECK_ARG(
      !(blocks.is_cuda() && current_stream_capturing()), name,
      " is on the GPU while a CUDA graph is being captured; pass block lists on the CPU "
      "(they are validated on the host, which would need a synchronization)");
#endif
  KVREG_CHECK_TYPE(
      blocks.scalar_type() == at::kLong || blocks.scalar_type() == at::kInt, name,
      " must be an int64 or int32 tensor, got ", blocks.scalar_type());
  KVREG_CHECK_ARG(blocks.dim() <= 1, name, " must be 1-D, got shape ", blocks.sizes());
  KVREG_CHECK_ARG(!blocks.is_meta(), name, " is a meta tensor");
  const at::Tensor host = blocks.to(at::kCPU, at::kLong).contiguous();
  const int64_t* data = host.const_data_ptr<int64_t>();
  return std::vector<int64_t>(data, data + host.numel());
}

void check_in_range(const std::vector<int64_t>& blocks, int64_t num_blocks, const char* name) {
  for (size_t j = 0; j < blocks.size(); ++j) {
    KVREG_CHECK_INDEX(
        blocks[j] >= 0 && blocks[j] < num_blocks, name, "[", j, "] = ", blocks[j],
        " is out of range for a cache of ", num_blocks, " blocks");
  }
}

// One bit per block of the cache is the fastest membership test, but a cache's block count
// can be far larger than the list (a raw-address registration, or a desc sent by a remote
// peer): then sorted copies of the list are used, so memory follows the list, not the desc.
bool use_bitmap(int64_t num_blocks, size_t list_size) {
  return num_blocks <= std::max<int64_t>(int64_t{1} << 20, 64 * static_cast<int64_t>(list_size));
}

// A value that appears more than once in blocks, or -1.
int64_t first_repeat(const std::vector<int64_t>& blocks, int64_t num_blocks) {
  if (use_bitmap(num_blocks, blocks.size())) {
    std::vector<bool> seen(num_blocks, false);
    for (int64_t block : blocks) {
      if (seen[block]) {
        return block;
      }
      seen[block] = true;
    }
    return -1;
  }
  std::vector<int64_t> sorted(blocks);
  std::sort(sorted.begin(), sorted.end());
  const auto repeat = std::adjacent_find(sorted.begin(), sorted.end());
  return repeat == sorted.end() ? -1 : *repeat;
}

// A value present in both a and b, or -1.
int64_t first_shared(const std::vector<int64_t>& a, const std::vector<int64_t>& b, int64_t num_blocks) {
  if (use_bitmap(num_blocks, a.size() + b.size())) {
    std::vector<bool> in_a(num_blocks, false);
    for (int64_t block : a) {
      in_a[block] = true;
    }
    for (int64_t block : b) {
      if (in_a[block]) {
        return block;
      }
    }
    return -1;
  }
  std::vector<int64_t> sorted(a);
  std::sort(sorted.begin(), sorted.end());
  for (int64_t block : b) {
    if (std::binary_search(sorted.begin(), sorted.end(), block)) {
      return block;
    }
  }
  return -1;
}

void sort_by_source(std::vector<int64_t>& src_blocks, std::vector<int64_t>& dst_blocks) {
  if (std::is_sorted(src_blocks.begin(), src_blocks.end())) {
    return;
  }
  std::vector<std::pair<int64_t, int64_t>> pairs(src_blocks.size());
  for (size_t j = 0; j < pairs.size(); ++j) {
    pairs[j] = {src_blocks[j], dst_blocks[j]};
  }
  std::sort(pairs.begin(), pairs.end());
  for (size_t j = 0; j < pairs.size(); ++j) {
    src_blocks[j] = pairs[j].first;
    dst_blocks[j] = pairs[j].second;
  }
}

// Runs of consecutive (src, dst) block pairs become one segment of at most max_segment_bytes.
std::vector<Segment> coalesce(
    const std::vector<int64_t>& src_blocks, const std::vector<int64_t>& dst_blocks, int64_t block_nbytes,
    int64_t max_segment_bytes) {
  std::vector<Segment> segments;
  const int64_t max_run = std::max<int64_t>(1, max_segment_bytes / block_nbytes);
  size_t j = 0;
  while (j < src_blocks.size()) {
    size_t run = 1;
    while (j + run < src_blocks.size() && static_cast<int64_t>(run) < max_run &&
           src_blocks[j + run] == src_blocks[j] + static_cast<int64_t>(run) &&
           dst_blocks[j + run] == dst_blocks[j] + static_cast<int64_t>(run)) {
      ++run;
    }
    segments.push_back(
        {src_blocks[j] * block_nbytes, dst_blocks[j] * block_nbytes,
         static_cast<int64_t>(run) * block_nbytes});
    j += run;
  }
  return segments;
}

#if defined(__x86_64__)
// How far ahead of the line being copied loads are requested: the hardware prefetcher
// stops at 4 KiB page boundaries, software prefetches do not.
constexpr size_t kPrefetchAhead = 1024;

// One 64-byte line: four aligned loads, four streaming stores (with a software prefetch
// kPrefetchAhead bytes on, or without: what wins depends on the processor).
template <bool kPrefetch = true>
inline void stream_line(char* dst, const char* src) {
  if (kPrefetch) {
    _mm_prefetch(src + kPrefetchAhead, _MM_HINT_NTA);
  }
  const __m128i* from = reinterpret_cast<const __m128i*>(src);
  __m128i* to = reinterpret_cast<__m128i*>(dst);
  const __m128i a = _mm_load_si128(from);
  const __m128i b = _mm_load_si128(from + 1);
  const __m128i c = _mm_load_si128(from + 2);
  const __m128i d = _mm_load_si128(from + 3);
  _mm_stream_si128(to, a);
  _mm_stream_si128(to + 1, b);
  _mm_stream_si128(to + 2, c);
  _mm_stream_si128(to + 3, d);
}
#endif

// Copies a block with non-temporal stores where it can: the destination of a KV-block copy
// is not read again soon, and streaming stores skip the read-for-ownership of every
// destination cache line, which a plain memcpy of mid-sized blocks pays.
template <bool kPrefetch = true>
void copy_block(char* dst, const char* src, size_t nbytes) {
#if defined(__x86_64__)
  constexpr size_t kStreamMin = 1024;
  if (nbytes >= kStreamMin &&
      ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15) == 0) {
    size_t i = 0;
    for (; i + 64 <= nbytes; i += 64) {
      stream_line<kPrefetch>(dst + i, src + i);
    }
    std::memcpy(dst + i, src + i, nbytes - i);
    return;
  }
#endif
  std::memcpy(dst, src, nbytes);
}

// Copies kWays equal-sized blocks at once, a line of each in turn: scattered blocks each
// start on a cold page, and several streams keep more cache-line misses in flight than one.
// Returns false (copying nothing) when the blocks do not suit it.
constexpr int kWays = 4;
constexpr size_t kMaxInterleavedBytes = 64 << 10;  // longer runs stream well on their own

bool copy_blocks_interleaved(char* const* dst, const char* const* src, size_t nbytes) {
#if defined(__x86_64__)
  uintptr_t bits = nbytes;
  for (int k = 0; k < kWays; ++k) {
    bits |= reinterpret_cast<uintptr_t>(dst[k]) | reinterpret_cast<uintptr_t>(src[k]);
  }
  if (nbytes < 1024 || nbytes > kMaxInterleavedBytes || (bits & 63) != 0) {
    return false;
  }
  for (size_t i = 0; i < nbytes; i += 64) {
    for (int k = 0; k < kWays; ++k) {
      stream_line(dst[k] + i, src[k] + i);
    }
  }
  return true;
#else
  return false;
#endif
}

// Starts loading the first lines of the next block while this one is copied: with random
// block order each block begins with a DRAM miss that the prefetcher cannot predict.
void prefetch_start(const char* src, int64_t nbytes) {
#if defined(__x86_64__)
  const int64_t ahead = std::min<int64_t>(nbytes, static_cast<int64_t>(kPrefetchAhead));
  for (int64_t i = 0; i < ahead; i += 64) {
    _mm_prefetch(src + i, _MM_HINT_NTA);
  }
#endif
}

// Makes this thread's streaming stores visible before the copy returns.
void finish_stores() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

// --- choosing the copy ------------------------------------------------------------------
// What copies scattered blocks fastest differs between processors (one machine: streaming
// stores with prefetch 1.0-1.26x of a contiguous copy; another of the same kind: plain
// memcpy beat them). The first large copy of a process measures the candidates on its own
// blocks (no byte is copied twice) and keeps the fastest; TORCH_KVREG_COPY or
// set_copy_strategy() override it.
enum class Strategy : int { kAuto = 0, kMemcpy, kStream, kStreamNoPrefetch };
constexpr const char* kStrategyNames[] = {"auto", "memcpy", "stream", "stream_noprefetch"};
constexpr int kNumStrategies = 4;
std::atomic<int> chosen_strategy{-1};  // -1: TORCH_KVREG_COPY not read yet
std::mutex measuring;
// Copies at least this large measure (a few MiB of their own items, single-threaded).
constexpr int64_t kMeasureMinBytes = int64_t{32} << 20;
constexpr int64_t kMeasureChunkBytes = int64_t{1} << 20;
constexpr int kMeasureRounds = 2;

// The chosen value: a Strategy, plus kSingleThread when one thread copies (on some
// machines the cores share memory bandwidth or execution units, and a second thread slows
// the first more than it adds).
constexpr int kSingleThread = 0x10;
constexpr const char* kSingleSuffix = ":single";

int parse_strategy(const std::string& text, const char* source) {
  std::string name = text;
  int flags = 0;
  const auto colon = text.find(':');
  if (colon != std::string::npos && text.substr(colon) == kSingleSuffix) {
    name = text.substr(0, colon);
    flags = kSingleThread;
  }
  for (int i = 0; i < kNumStrategies; ++i) {
    if (name == kStrategyNames[i] && !(i == 0 && flags != 0)) {
      return i | flags;
    }
  }
  KVREG_CHECK_ARG(
      false, source, " '", text,
      "' is not a copy strategy; use auto, memcpy, stream or stream_noprefetch, the last three "
      "optionally with :single (one thread)");
  return 0;
}

int current_choice() {
  int value = chosen_strategy.load();
  if (value < 0) {
    const char* env = std::getenv("TORCH_KVREG_COPY");
    const int from_env = env != nullptr && *env != 0 ? parse_strategy(env, "TORCH_KVREG_COPY") : 0;
    int unset = -1;
    chosen_strategy.compare_exchange_strong(unset, from_env);
    value = chosen_strategy.load();
  }
  return value;
}

Strategy current_strategy() {
  return static_cast<Strategy>(current_choice() & ~kSingleThread);
}

using HostItem = HostRun;

// Copies `count` items that next_item() hands out, in order, on the calling thread, with
// `strategy` (not kAuto): the kernels of every host copy (copy_kv_blocks, and the same-host
// copies from a peer's cache mapped here).
template <typename NextItem>
void copy_item_stream(NextItem& next_item, int64_t count, Strategy strategy) {
  if (strategy == Strategy::kMemcpy || strategy == Strategy::kStreamNoPrefetch) {
    for (int64_t i = 0; i < count; ++i) {
      const HostItem item = next_item();
      if (strategy == Strategy::kMemcpy) {
        std::memcpy(item.dst, item.src, static_cast<size_t>(item.nbytes));
      } else {
        copy_block<false>(item.dst, item.src, static_cast<size_t>(item.nbytes));
      }
    }
    finish_stores();
    return;
  }
  HostItem batch[kWays];
  int64_t remaining = count;
  while (remaining > 0) {
    const int taken = static_cast<int>(std::min<int64_t>(remaining, kWays));
    bool same_size = taken == kWays;
    for (int k = 0; k < taken; ++k) {
      batch[k] = next_item();
      same_size = same_size && batch[k].nbytes == batch[0].nbytes;
    }
    remaining -= taken;
    if (same_size) {
      const char* srcs[kWays];
      char* dsts[kWays];
      for (int k = 0; k < kWays; ++k) {
        srcs[k] = batch[k].src;
        dsts[k] = batch[k].dst;
      }
      if (copy_blocks_interleaved(dsts, srcs, static_cast<size_t>(batch[0].nbytes))) {
        continue;
      }
    }
    for (int k = 0; k < taken; ++k) {
      if (k + 1 < taken) {
        prefetch_start(batch[k + 1].src, batch[k + 1].nbytes);
      }
      copy_block(batch[k].dst, batch[k].src, static_cast<size_t>(batch[k].nbytes));
    }
  }
  finish_stores();
}

}  // namespace

bool in_forked_child() {
  return forked_child.load(std::memory_order_relaxed);
}

void run_copy(const CopyPlan& plan) {
  if (plan.segments.empty()) {
    return;
  }
  const bool on_host =
      plan.src->desc.placement == Placement::HOST && plan.dst->desc.placement == Placement::HOST;
  if (on_host) {
    run_copy_cpu(plan);
    return;
  }
#ifdef KVREG_WITH_CUDA
  KVREG_CHECK(
      cuda_available(), LLM_FEATURE_NOT_ENABLED,
      "a DEVICE cache is involved but no CUDA device is available");
  run_copy_cuda(plan);
#else
  KVREG_CHECK(
      false, LLM_FEATURE_NOT_ENABLED,
      "copies involving DEVICE caches need torch_kvreg built with CUDA; this build is CPU-only");
#endif
}

bool built_with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

std::vector<int64_t> block_indices(const at::Tensor& blocks, const char* name) {
  return block_list(blocks, name);
}

CacheRecord select_tensors(const CacheRecord& record, const std::vector<int64_t>& tensors, const char* name) {
  if (tensors.empty()) {
    return record;
  }
  CacheRecord out = record;
  out.addrs.clear();
  for (size_t i = 0; i < tensors.size(); ++i) {
    KVREG_CHECK_INDEX(
        tensors[i] >= 0 && tensors[i] < record.desc.num_tensors, name, "[", i, "] = ", tensors[i],
        " is out of range for a cache of ", record.desc.num_tensors, " tensors");
    out.addrs.push_back(record.addrs[tensors[i]]);
  }
  out.desc.num_tensors = static_cast<int64_t>(tensors.size());
  out.desc.nbytes = checked_mul(out.desc.tensor_nbytes, out.desc.num_tensors, "selected bytes");
  return out;
}

std::vector<Segment> plan_blocks(
    const CacheDesc& src, int64_t src_id, const CacheDesc& dst, int64_t dst_id, bool same_cache,
    std::vector<int64_t> src_blocks, std::vector<int64_t> dst_blocks, int64_t max_segment_bytes) {
  KVREG_CHECK_ARG(
      src_blocks.size() == dst_blocks.size(), "src_blocks has ", src_blocks.size(),
      " entries but dst_blocks has ", dst_blocks.size());
  check_compatible(src, src_id, dst, dst_id);
  check_in_range(src_blocks, src.num_blocks(), "src_blocks");
  check_in_range(dst_blocks, dst.num_blocks(), "dst_blocks");
  const int64_t repeated = first_repeat(dst_blocks, dst.num_blocks());
  KVREG_CHECK_ARG(repeated < 0, "dst_blocks names block ", repeated, " more than once");
  if (same_cache) {
    const int64_t shared = first_shared(src_blocks, dst_blocks, src.num_blocks());
    KVREG_CHECK_ARG(
        shared < 0, "block ", shared, " is both read and written in one copy within cache ", src_id);
  }
  // Destinations are distinct and, within one cache, disjoint from the sources, so the
  // order of the pairs does not matter: walking the source in address order turns random
  // reads into a forward stride that prefetchers and DRAM pages reward, and lets runs that
  // were given out of order coalesce.
  sort_by_source(src_blocks, dst_blocks);
  return coalesce(src_blocks, dst_blocks, src.block_nbytes, max_segment_bytes);
}

std::vector<Segment> plan_slice(
    const CacheDesc& src, int64_t src_id, const CacheDesc& dst, int64_t dst_id, bool same_cache,
    int64_t src_batch_index, int64_t dst_batch_index, int64_t offset, int64_t size) {
  check_compatible(src, src_id, dst, dst_id);
  const int64_t block_nbytes = src.block_nbytes;
  KVREG_CHECK_INDEX(
      src_batch_index >= 0 && src_batch_index < src.num_blocks(), "src_batch_index ", src_batch_index,
      " is out of range for a cache of ", src.num_blocks(), " slices");
  KVREG_CHECK_INDEX(
      dst_batch_index >= 0 && dst_batch_index < dst.num_blocks(), "dst_batch_index ", dst_batch_index,
      " is out of range for a cache of ", dst.num_blocks(), " slices");
  KVREG_CHECK_ARG(
      offset >= 0 && offset <= block_nbytes, "offset ", offset, " is outside the ", block_nbytes,
      "-byte slice");
  const int64_t nbytes = size == -1 ? block_nbytes - offset : size;
  KVREG_CHECK_ARG(
      nbytes >= 0 && nbytes <= block_nbytes - offset, "size ", size, " at offset ", offset,
      " does not fit the ", block_nbytes, "-byte slice");
  KVREG_CHECK_ARG(
      !(same_cache && src_batch_index == dst_batch_index) || nbytes == 0, "slice ", src_batch_index,
      " is both read and written in one copy within cache ", src_id);
  std::vector<Segment> segments;
  if (nbytes > 0) {
    segments.push_back(
        {src_batch_index * block_nbytes + offset, dst_batch_index * block_nbytes + offset, nbytes});
  }
  return segments;
}

int64_t CopyPlan::total_bytes() const {
  int64_t bytes = 0;
  for (const auto& segment : segments) {
    bytes += segment.nbytes;
  }
  return bytes * src->desc.num_tensors;
}

void run_copy_cpu(const CopyPlan& plan) {
  const auto& segments = plan.segments;
  const auto& src_addrs = plan.src->addrs;
  const auto& dst_addrs = plan.dst->addrs;
  const int64_t num_segments = static_cast<int64_t>(segments.size());
  const int64_t num_items = plan.src->desc.num_tensors * num_segments;
  const int64_t total_bytes = plan.total_bytes();
  const int64_t average_bytes = std::max<int64_t>(1, total_bytes / num_items);
  // Enough bytes per task that the thread pool's overhead stays small.
  const int64_t grain = std::max<int64_t>(1, (int64_t{256} << 10) / average_bytes);
  auto copy_items = [&](int64_t begin, int64_t end, Strategy strategy) {
    // Items are (tensor, segment) pairs, tensor-major; walk them with a cursor rather than
    // dividing per item, which costs as much as copying a small block.
    int64_t tensor = begin / num_segments;
    int64_t segment = begin % num_segments;
    auto next_item = [&]() {
      const Segment& s = segments[segment];
      HostItem item{
          reinterpret_cast<const char*>(src_addrs[tensor]) + s.src_offset,
          reinterpret_cast<char*>(dst_addrs[tensor]) + s.dst_offset, s.nbytes};
      if (++segment == num_segments) {
        segment = 0;
        ++tensor;
      }
      return item;
    };
    copy_item_stream(next_item, end - begin, strategy);
  };
  Strategy strategy = current_strategy();
  int64_t done = 0;  // items already copied while measuring
  const bool can_fan_out = !in_forked_child() && at::get_num_threads() > 1;
  auto copy_range = [&](int64_t begin, int64_t end, Strategy how, bool single) {
    if (single || !can_fan_out) {
      copy_items(begin, end, how);
    } else {
      at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { copy_items(b, e, how); });
    }
  };
  if (strategy == Strategy::kAuto && total_bytes >= kMeasureMinBytes) {
    std::unique_lock<std::mutex> lock(measuring, std::try_to_lock);
    const int64_t chunk = std::max<int64_t>(1, kMeasureChunkBytes / average_bytes);
    const int candidates = (kNumStrategies - 1) * (can_fan_out ? 2 : 1);
    if (lock.owns_lock() && current_strategy() == Strategy::kAuto &&
        chunk * candidates * kMeasureRounds * 2 <= num_items) {
      // Each candidate (a strategy, on one thread or on all) copies its own chunks of this
      // copy's items, in turns so that noise hits all alike; the fastest per byte is kept.
      std::vector<double> seconds(candidates, 0.0), bytes(candidates, 0.0);
      for (int round = 0; round < kMeasureRounds; ++round) {
        for (int c = 0; c < candidates; ++c) {
          const int64_t end = done + chunk;
          double chunk_bytes = 0;
          for (int64_t i = done; i < end; ++i) {
            chunk_bytes += static_cast<double>(segments[i % num_segments].nbytes);
          }
          const auto start = std::chrono::steady_clock::now();
          copy_range(done, end, static_cast<Strategy>(1 + c % (kNumStrategies - 1)), c >= kNumStrategies - 1);
          seconds[c] += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
          bytes[c] += chunk_bytes;
          done = end;
        }
      }
      int best = 0;
      for (int c = 1; c < candidates; ++c) {
        if (bytes[c] / seconds[c] > bytes[best] / seconds[best]) {
          best = c;
        }
      }
      chosen_strategy.store(
          (1 + best % (kNumStrategies - 1)) | (best >= kNumStrategies - 1 ? kSingleThread : 0));
    }
    strategy = current_strategy();
  }
  const bool single = (current_choice() & kSingleThread) != 0;
  if (strategy == Strategy::kAuto) {
    strategy = Strategy::kStream;  // until a large copy has measured
  }
  copy_range(done, num_items, strategy, single);
}

std::string copy_strategy() {
  const int choice = current_choice();
  std::string name = kStrategyNames[choice & ~kSingleThread];
  return (choice & kSingleThread) != 0 ? name + kSingleSuffix : name;
}

void set_copy_strategy(const std::string& name) {
  chosen_strategy.store(parse_strategy(name, "copy strategy"));
}

void copy_host_runs(const HostRun* runs, size_t count) {
  Strategy strategy = current_strategy();
  if (strategy == Strategy::kAuto) {
    strategy = Strategy::kStream;  // as run_copy_cpu until a large copy has measured
  }
  size_t next = 0;
  auto next_item = [&]() { return runs[next++]; };
  copy_item_stream(next_item, static_cast<int64_t>(count), strategy);
}

namespace {

// The checked block lists of a copy between two caches, and a lease that keeps both
// registered while it lives; ``plan`` holds the caches' records and the coalesced runs.
struct LeasedCopy {
  Registry::Lease lease;
  CopyPlan plan;
};

LeasedCopy lease_blocks(
    int64_t src_id, int64_t dst_id, const at::Tensor& src_blocks, const at::Tensor& dst_blocks) {
  Registry::instance().require_initialized();
  auto src_list = block_list(src_blocks, "src_blocks");
  auto dst_list = block_list(dst_blocks, "dst_blocks");
  KVREG_CHECK_ARG(
      src_list.size() == dst_list.size(), "src_blocks has ", src_list.size(), " entries but dst_blocks has ",
      dst_list.size());
  LeasedCopy copy{Registry::instance().lease({src_id, dst_id}), {}};
  const CacheRecord& src = copy.lease[0];
  const CacheRecord& dst = copy.lease[1];
  copy.plan = {
      &src, &dst,
      plan_blocks(
          src.desc, src_id, dst.desc, dst_id, src_id == dst_id, std::move(src_list), std::move(dst_list),
          kMaxSegmentBytes)};
  return copy;
}

}  // namespace

void copy_blocks_with_memcpy(
    int64_t src_id, int64_t dst_id, const at::Tensor& src_blocks, const at::Tensor& dst_blocks) {
  const LeasedCopy copy = lease_blocks(src_id, dst_id, src_blocks, dst_blocks);
  const CacheRecord& src = *copy.plan.src;
  const CacheRecord& dst = *copy.plan.dst;
  KVREG_CHECK_ARG(
      src.desc.placement == Placement::HOST && dst.desc.placement == Placement::HOST,
      "the memcpy baseline copies between HOST caches only");
  // The obvious implementation, for benchmarks: one thread, one memcpy per segment.
  for (int64_t t = 0; t < src.desc.num_tensors; ++t) {
    for (const Segment& s : copy.plan.segments) {
      std::memcpy(
          reinterpret_cast<char*>(dst.addrs[t]) + s.dst_offset,
          reinterpret_cast<const char*>(src.addrs[t]) + s.src_offset, static_cast<size_t>(s.nbytes));
    }
  }
}

void copy_kv_blocks(
    c10::SymInt src_cache_id, c10::SymInt dst_cache_id, const at::Tensor& src_blocks,
    const at::Tensor& dst_blocks) {
  // The lease keeps both caches registered until the copy has been issued.
  const LeasedCopy copy = lease_blocks(
      concrete_id(src_cache_id, "src_cache_id"), concrete_id(dst_cache_id, "dst_cache_id"), src_blocks,
      dst_blocks);
  run_copy(copy.plan);
}

void copy_kv_blocks_of_tensors(
    int64_t src_id, int64_t dst_id, const at::Tensor& src_blocks, const at::Tensor& dst_blocks,
    const std::vector<int64_t>& src_tensors, const std::vector<int64_t>& dst_tensors) {
  Registry::instance().require_initialized();
  auto src_list = block_list(src_blocks, "src_blocks");
  auto dst_list = block_list(dst_blocks, "dst_blocks");
  KVREG_CHECK_ARG(
      src_list.size() == dst_list.size(), "src_blocks has ", src_list.size(), " entries but dst_blocks has ",
      dst_list.size());
  KVREG_CHECK_ARG(
      !src_tensors.empty() && src_tensors.size() == dst_tensors.size(), "the layers select ",
      src_tensors.size(), " source and ", dst_tensors.size(),
      " destination tensors; they must be equal and not 0");
  auto lease = Registry::instance().lease({src_id, dst_id});
  const CacheRecord src = select_tensors(lease[0], src_tensors, "src tensors");
  const CacheRecord dst = select_tensors(lease[1], dst_tensors, "dst tensors");
  std::vector<int64_t> sorted_dst(dst_tensors);
  std::sort(sorted_dst.begin(), sorted_dst.end());
  KVREG_CHECK_ARG(
      std::adjacent_find(sorted_dst.begin(), sorted_dst.end()) == sorted_dst.end(),
      "a destination tensor is selected twice");
  // Within one cache, blocks may be both read and written only in tensors that are not both.
  bool shared_tensor = false;
  if (src_id == dst_id) {
    for (int64_t t : src_tensors) {
      shared_tensor = shared_tensor || std::binary_search(sorted_dst.begin(), sorted_dst.end(), t);
    }
  }
  run_copy(
      {&src, &dst,
       plan_blocks(
           src.desc, src_id, dst.desc, dst_id, shared_tensor, std::move(src_list), std::move(dst_list),
           kMaxSegmentBytes)});
}

void copy_kv_cache(
    c10::SymInt src_cache_id, c10::SymInt dst_cache_id, int64_t src_batch_index, int64_t dst_batch_index,
    int64_t offset, int64_t size) {
  const int64_t src_id = concrete_id(src_cache_id, "src_cache_id");
  const int64_t dst_id = concrete_id(dst_cache_id, "dst_cache_id");
  auto lease = Registry::instance().lease({src_id, dst_id});
  const CacheRecord& src = lease[0];
  const CacheRecord& dst = lease[1];
  run_copy(
      {&src, &dst,
       plan_slice(
           src.desc, src_id, dst.desc, dst_id, src_id == dst_id, src_batch_index, dst_batch_index, offset,
           size)});
}

}  // namespace kvreg
