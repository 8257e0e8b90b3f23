// CRC-32C of memory and of cache blocks (see checksum.h).
#include "checksum.h"

#include "copy_plan.h"
#include "registry.h"
#include "status.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <pthread.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <nmmintrin.h>
#include <smmintrin.h>
#include <wmmintrin.h>
#define KVREG_CRC_X86 1
#endif

namespace kvreg {

namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // Castagnoli, bit-reflected

// --- portable: slicing-by-8 -------------------------------------------------------------
struct Tables {
  uint32_t t[8][256];
  Tables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) {
        c = (c & 1) ? (c >> 1) ^ kPoly : c >> 1;
      }
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i) {
      for (int s = 1; s < 8; ++s) {
        t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
      }
    }
  }
};

const Tables& tables() {
  static const Tables instance;
  return instance;
}

// The raw register update (no inversions) over n bytes.
uint32_t raw_portable(uint32_t crc, const uint8_t* p, size_t n) {
  const auto& t = tables().t;
  while (n >= 8) {
    uint64_t word;
    std::memcpy(&word, p, 8);  // little-endian hosts (x86-64, AArch64) only
    word ^= crc;
    crc = t[7][word & 0xFF] ^ t[6][(word >> 8) & 0xFF] ^ t[5][(word >> 16) & 0xFF] ^
          t[4][(word >> 24) & 0xFF] ^ t[3][(word >> 32) & 0xFF] ^ t[2][(word >> 40) & 0xFF] ^
          t[1][(word >> 48) & 0xFF] ^ t[0][word >> 56];
    p += 8;
    n -= 8;
  }
  while (n-- > 0) {
    crc = (crc >> 8) ^ t[0][(crc ^ *p++) & 0xFF];
  }
  return crc;
}

#ifdef KVREG_CRC_X86
// --- SSE4.2: three streams ------------------------------------------------------------------
// a * b modulo the polynomial, both bit-reflected (x^0 is the top bit).
uint32_t multiply_mod(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (uint32_t bit = 1u << 31; bit != 0; bit >>= 1) {
    if (a & bit) {
      product ^= b;
    }
    b = (b & 1) ? (b >> 1) ^ kPoly : b >> 1;
  }
  return product;
}

// x^(8 * nbytes) modulo the polynomial: appending nbytes zero bytes to a register multiplies
// it by this.
uint32_t zeros_operator(size_t nbytes) {
  uint32_t power = 1u << 30;   // x^1
  uint32_t result = 1u << 31;  // x^0
  for (size_t bits = nbytes * 8; bits != 0; bits >>= 1) {
    if (bits & 1) {
      result = multiply_mod(result, power);
    }
    power = multiply_mod(power, power);
  }
  return result;
}

// The register after `kStride` zero bytes, as four byte-indexed tables (the map is linear).
template <size_t kStride>
struct Shift {
  uint32_t t[4][256];
  Shift() {
    const uint32_t op = zeros_operator(kStride);
    for (uint32_t b = 0; b < 4; ++b) {
      for (uint32_t v = 0; v < 256; ++v) {
        t[b][v] = multiply_mod(op, v << (8 * b));
      }
    }
  }
  uint32_t operator()(uint32_t crc) const {
    return t[0][crc & 0xFF] ^ t[1][(crc >> 8) & 0xFF] ^ t[2][(crc >> 16) & 0xFF] ^ t[3][crc >> 24];
  }
};

constexpr size_t kLong = 4096;  // bytes per stream in one round of long input
constexpr size_t kShort = 256;  // ... of what is left

template <size_t kStride>
__attribute__((target("sse4.2"))) inline void rounds(uint32_t& crc, const uint8_t*& p, size_t& n) {
  static const Shift<kStride> shift;
  while (n >= 3 * kStride) {
    // Three independent chains hide the instruction's latency (3 cycles, 1 per cycle).
    uint64_t a = crc, b = 0, c = 0;
    const uint8_t* q = p;
    for (size_t i = 0; i < kStride; i += 8) {
      uint64_t wa, wb, wc;
      std::memcpy(&wa, q + i, 8);
      std::memcpy(&wb, q + kStride + i, 8);
      std::memcpy(&wc, q + 2 * kStride + i, 8);
      a = _mm_crc32_u64(a, wa);
      b = _mm_crc32_u64(b, wb);
      c = _mm_crc32_u64(c, wc);
    }
    // The register over a||b||c: a moved past b, joined, moved past c, joined.
    crc = shift(shift(static_cast<uint32_t>(a)) ^ static_cast<uint32_t>(b)) ^ static_cast<uint32_t>(c);
    p += 3 * kStride;
    n -= 3 * kStride;
  }
}

__attribute__((target("sse4.2"))) uint32_t raw_sse42(uint32_t crc, const uint8_t* p, size_t n) {
  while (n > 0 && (reinterpret_cast<uintptr_t>(p) & 7) != 0) {
    crc = _mm_crc32_u8(crc, *p++);
    --n;
  }
  rounds<kLong>(crc, p, n);
  rounds<kShort>(crc, p, n);
  uint64_t wide = crc;
  while (n >= 8) {
    uint64_t word;
    std::memcpy(&word, p, 8);
    wide = _mm_crc32_u64(wide, word);
    p += 8;
    n -= 8;
  }
  crc = static_cast<uint32_t>(wide);
  while (n-- > 0) {
    crc = _mm_crc32_u8(crc, *p++);
  }
  return crc;
}

bool have_sse42() {
  static const bool yes = __builtin_cpu_supports("sse4.2");
  return yes;
}

// --- PCLMULQDQ folding ------------------------------------------------------------------------
// Four 16-byte lanes, each carried 64 bytes forward per round by two carry-less multiplies:
// a lane V (its first 8 bytes the high-degree half h, the rest l) becomes h*K_h ^ l*K_l,
// congruent to V * x^512 modulo the polynomial, then takes in the next 16 bytes. Lanes are
// then folded into one (by x^128 each) and its 16 bytes finish on the crc32 instruction.
// Where crc32 is slow (3 cycles per 8 bytes on some cores, one unit), this is several
// times faster. With bit-reflected operands the product lands one bit up, so a shift by s
// bits takes K_h = x^(s+63) and K_l = x^(s-1) modulo the polynomial, bit-reflected into 64
// bits (tests/test_verify.py's reference checks every length around the round sizes).
constexpr uint64_t kFold512High = 0x1c19243b00000000ull;  // x^575 mod P
constexpr uint64_t kFold512Low = 0x75bba45b00000000ull;   // x^511 mod P
constexpr uint64_t kFold128High = 0x3743f7bd00000000ull;  // x^191 mod P
constexpr uint64_t kFold128Low = 0x3171d43000000000ull;   // x^127 mod P
constexpr size_t kFoldMin = 256;                          // shorter input: crc32 alone

__attribute__((target("pclmul,sse4.2"))) inline __m128i fold(__m128i lane, __m128i k, __m128i next) {
  return _mm_xor_si128(
      _mm_xor_si128(_mm_clmulepi64_si128(lane, k, 0x00), _mm_clmulepi64_si128(lane, k, 0x11)), next);
}

__attribute__((target("pclmul,sse4.2"))) uint32_t raw_clmul(uint32_t crc, const uint8_t* p, size_t n) {
  auto load = [](const uint8_t* at) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(at)); };
  // The register joins the first four bytes (the CRC is linear); n >= 64 here.
  __m128i x0 = _mm_xor_si128(load(p), _mm_cvtsi32_si128(static_cast<int>(crc)));
  __m128i x1 = load(p + 16), x2 = load(p + 32), x3 = load(p + 48);
  p += 64;
  n -= 64;
  const __m128i k512 = _mm_set_epi64x(static_cast<int64_t>(kFold512Low), static_cast<int64_t>(kFold512High));
  while (n >= 64) {
    x0 = fold(x0, k512, load(p));
    x1 = fold(x1, k512, load(p + 16));
    x2 = fold(x2, k512, load(p + 32));
    x3 = fold(x3, k512, load(p + 48));
    p += 64;
    n -= 64;
  }
  const __m128i k128 = _mm_set_epi64x(static_cast<int64_t>(kFold128Low), static_cast<int64_t>(kFold128High));
  __m128i x = fold(fold(fold(x0, k128, x1), k128, x2), k128, x3);
  uint64_t wide = _mm_crc32_u64(0, static_cast<uint64_t>(_mm_cvtsi128_si64(x)));
  wide = _mm_crc32_u64(wide, static_cast<uint64_t>(_mm_extract_epi64(x, 1)));
  return raw_sse42(static_cast<uint32_t>(wide), p, n);
}

bool have_clmul() {
  static const bool yes = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.2");
  return yes;
}
#endif

// What raw() runs: picked by the CPU (kAuto), or forced by a test hook so that each
// implementation is checked against the others on a CPU that would pick only one.
enum class Impl : int { kAuto, kClmul, kSse42, kPortable };
std::atomic<Impl> forced{Impl::kAuto};

uint32_t raw(uint32_t crc, const uint8_t* p, size_t n) {
  switch (forced.load(std::memory_order_relaxed)) {
    case Impl::kPortable:
      return raw_portable(crc, p, n);
#ifdef KVREG_CRC_X86
    case Impl::kSse42:
      return raw_sse42(crc, p, n);
    case Impl::kClmul:
      return n >= kFoldMin ? raw_clmul(crc, p, n) : raw_sse42(crc, p, n);
#endif
    default:
      break;
  }
#ifdef KVREG_CRC_X86
  if (n >= kFoldMin && have_clmul()) {
    return raw_clmul(crc, p, n);
  }
  if (have_sse42()) {
    return raw_sse42(crc, p, n);
  }
#endif
  return raw_portable(crc, p, n);
}

// How much of the next slice is prefetched while one is read.
constexpr int64_t kPrefetchBytes = 4096;

}  // namespace

uint32_t crc32c(uint32_t crc, const void* data, size_t nbytes) {
  return ~raw(~crc, static_cast<const uint8_t*>(data), nbytes);
}

uint32_t crc32c_portable(uint32_t crc, const void* data, size_t nbytes) {
  return ~raw_portable(~crc, static_cast<const uint8_t*>(data), nbytes);
}

std::string crc32c_implementation() {
  switch (forced.load(std::memory_order_relaxed)) {
    case Impl::kClmul:
      return "pclmulqdq";
    case Impl::kSse42:
      return "sse4.2";
    case Impl::kPortable:
      return "portable";
    default:
      break;
  }
#ifdef KVREG_CRC_X86
  if (have_clmul()) {
    return "pclmulqdq";
  }
  if (have_sse42()) {
    return "sse4.2";
  }
#endif
  return "portable";
}

void test_force_crc32c_implementation(const std::string& name) {
  Impl impl = Impl::kAuto;
  bool runs_here = true;
  if (name == "pclmulqdq") {
    impl = Impl::kClmul;
#ifdef KVREG_CRC_X86
    runs_here = have_clmul();
#else
    runs_here = false;
#endif
  } else if (name == "sse4.2") {
    impl = Impl::kSse42;
#ifdef KVREG_CRC_X86
    runs_here = have_sse42();
#else
    runs_here = false;
#endif
  } else if (name == "portable") {
    impl = Impl::kPortable;
  } else {
    KVREG_CHECK_ARG(name == "auto", "no CRC-32C implementation is called '", name, "'");
  }
  KVREG_CHECK_ARG(runs_here, "this CPU cannot run the ", name, " CRC-32C");
  forced.store(impl, std::memory_order_relaxed);
}

at::Tensor checksum_blocks(
    int64_t cache_id, const std::vector<int64_t>& tensors, const at::Tensor& blocks, int64_t offset,
    int64_t size) {
  Registry::instance().require_initialized();
  const std::vector<int64_t> list = block_indices(blocks, "blocks");
  auto lease = Registry::instance().lease({cache_id});
  const CacheRecord record = select_tensors(lease[0], tensors, "tensors");
  const CacheDesc& desc = record.desc;
  for (size_t j = 0; j < list.size(); ++j) {
    KVREG_CHECK_INDEX(
        list[j] >= 0 && list[j] < desc.num_blocks(), "blocks[", j, "] = ", list[j],
        " is out of range for a cache of ", desc.num_blocks(), " blocks");
  }
  KVREG_CHECK_ARG(
      offset >= 0 && offset <= desc.block_nbytes, "offset ", offset, " is outside the ", desc.block_nbytes,
      "-byte slice");
  const int64_t nbytes = size == -1 ? desc.block_nbytes - offset : size;
  KVREG_CHECK_ARG(
      nbytes >= 0 && nbytes <= desc.block_nbytes - offset, "size ", size, " at offset ", offset,
      " does not fit the ", desc.block_nbytes, "-byte slice");

  const int64_t count = static_cast<int64_t>(list.size());
  at::Tensor out = at::empty({count}, at::TensorOptions().dtype(at::kLong));
  int64_t* crcs = out.data_ptr<int64_t>();
  if (desc.placement == Placement::DEVICE) {
    // The device's bytes come to the host first, one slice at a time.
    const auto options = at::TensorOptions().dtype(at::kByte).device(at::kCUDA, desc.device_index);
    for (int64_t j = 0; j < count; ++j) {
      uint32_t crc = 0;
      for (const uint64_t addr : record.addrs) {
        const uint64_t start = addr + static_cast<uint64_t>(list[j] * desc.block_nbytes + offset);
        const at::Tensor host =
            at::from_blob(reinterpret_cast<void*>(start), {nbytes}, options).to(at::kCPU).contiguous();
        crc = crc32c(crc, host.const_data_ptr<uint8_t>(), static_cast<size_t>(nbytes));
      }
      crcs[j] = crc;
    }
    return out;
  }
  auto slice = [&](int64_t j, size_t i) {
    return reinterpret_cast<const uint8_t*>(record.addrs[i]) + list[j] * desc.block_nbytes + offset;
  };
  auto work = [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      uint32_t crc = 0;
      for (size_t i = 0; i < record.addrs.size(); ++i) {
        // Slices are scattered (one per tensor, blocks in any order): the next one is asked
        // for while this one is read, which the hardware prefetcher cannot guess.
        const bool last = i + 1 == record.addrs.size();
        if (!last || j + 1 < end) {
          const uint8_t* next = last ? slice(j + 1, 0) : slice(j, i + 1);
          for (int64_t at = 0; at < std::min<int64_t>(nbytes, kPrefetchBytes); at += 64) {
            __builtin_prefetch(next + at);
          }
        }
        crc = crc32c(crc, slice(j, i), static_cast<size_t>(nbytes));
      }
      crcs[j] = crc;
    }
  };
  const int64_t per_block = std::max<int64_t>(1, nbytes * static_cast<int64_t>(record.addrs.size()));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / per_block);  // ~1 MiB per task
  if (in_forked_child() || count <= grain) {
    work(0, count);
  } else {
    at::parallel_for(0, count, grain, work);
  }
  return out;
}

at::Tensor copy_blocks_verified(
    int64_t src_id, int64_t dst_id, const at::Tensor& src_blocks, const at::Tensor& dst_blocks,
    const std::vector<int64_t>& src_tensors, const std::vector<int64_t>& dst_tensors, bool slice,
    int64_t offset, int64_t size, const BlockHook& source_taken, const BlockHook& landed) {
  Registry::instance().require_initialized();
  const std::vector<int64_t> src_list = block_indices(src_blocks, "src_blocks");
  const std::vector<int64_t> dst_list = block_indices(dst_blocks, "dst_blocks");
  KVREG_CHECK_ARG(
      src_list.size() == dst_list.size(), "src_blocks has ", src_list.size(), " entries but dst_blocks has ",
      dst_list.size());
  KVREG_CHECK_ARG(
      src_tensors.size() == dst_tensors.size(), "the layers select ", src_tensors.size(), " source and ",
      dst_tensors.size(), " destination tensors; they must be equal");
  auto lease = Registry::instance().lease({src_id, dst_id});
  const CacheRecord src = select_tensors(lease[0], src_tensors, "src tensors");
  const CacheRecord dst = select_tensors(lease[1], dst_tensors, "dst tensors");
  KVREG_CHECK_ARG(
      src.desc.placement == Placement::HOST && dst.desc.placement == Placement::HOST,
      "a verified copy in one pass is between HOST caches only");
  // Within one cache a block may be read and written only in tensors that are not both.
  bool same_cache = src_id == dst_id;
  if (same_cache && !src_tensors.empty()) {
    std::vector<int64_t> sorted(dst_tensors);
    std::sort(sorted.begin(), sorted.end());
    KVREG_CHECK_ARG(
        std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end(),
        "a destination tensor is selected twice");
    same_cache = std::any_of(src_tensors.begin(), src_tensors.end(), [&](int64_t t) {
      return std::binary_search(sorted.begin(), sorted.end(), t);
    });
  }
  if (slice) {
    KVREG_CHECK_ARG(src_list.size() == 1, "a slice copy moves one slice, got ", src_list.size());
    plan_slice(src.desc, src_id, dst.desc, dst_id, same_cache, src_list[0], dst_list[0], offset, size);
  } else {
    KVREG_CHECK_ARG(offset == 0 && size == -1, "a block copy moves whole blocks");
    plan_blocks(src.desc, src_id, dst.desc, dst_id, same_cache, src_list, dst_list, kMaxSegmentBytes);
  }
  const int64_t block_nbytes = src.desc.block_nbytes;
  const int64_t nbytes = size == -1 ? block_nbytes - offset : size;
  const int64_t count = static_cast<int64_t>(src_list.size());
  const size_t num_tensors = src.addrs.size();
  at::Tensor out = at::empty({2, count}, at::TensorOptions().dtype(at::kLong));
  int64_t* sums = out.data_ptr<int64_t>();
  auto src_slice = [&](size_t i, int64_t j) {
    return reinterpret_cast<const uint8_t*>(src.addrs[i]) + src_list[j] * block_nbytes + offset;
  };
  auto dst_slice = [&](size_t i, int64_t j) {
    return reinterpret_cast<uint8_t*>(dst.addrs[i]) + dst_list[j] * block_nbytes + offset;
  };
  const size_t n = static_cast<size_t>(nbytes);
  auto work = [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      // Reading the source block brings it into the cache; the copy and the CRC of what
      // landed then hit the cache, not main memory.
      uint32_t expected = 0;
      for (size_t i = 0; i < num_tensors; ++i) {
        const uint8_t* next = i + 1 < num_tensors ? src_slice(i + 1, j)
                              : j + 1 < end       ? src_slice(0, j + 1)
                                                  : nullptr;
        if (next != nullptr) {
          for (int64_t at = 0; at < std::min<int64_t>(nbytes, kPrefetchBytes); at += 64) {
            __builtin_prefetch(next + at);
          }
        }
        expected = crc32c(expected, src_slice(i, j), n);
      }
      if (source_taken) {
        source_taken(src_id, src_list[j]);
      }
      for (size_t i = 0; i < num_tensors; ++i) {
        std::memcpy(dst_slice(i, j), src_slice(i, j), n);  // cached stores: read back next
      }
      if (landed) {
        landed(dst_id, dst_list[j]);
      }
      uint32_t got = 0;
      for (size_t i = 0; i < num_tensors; ++i) {
        got = crc32c(got, dst_slice(i, j), n);
      }
      sums[j] = expected;
      sums[count + j] = got;
    }
  };
  const int64_t per_block = std::max<int64_t>(1, nbytes * static_cast<int64_t>(num_tensors));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / per_block);  // ~1 MiB per task
  if (source_taken || landed || in_forked_child() || count <= grain) {
    work(0, count);
  } else {
    at::parallel_for(0, count, grain, work);
  }
  return out;
}

}  // namespace kvreg
