// Host kernels for transfers between geometries: a box of tokens x heads x dims copied as
// contiguous rows, as a tiled transpose, or element by element, boxes shared out over the
// copy threads.
#include "geometry_copy.h"

#include "copy_plan.h"
#include "kernels.h"

#include <ATen/Parallel.h>

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <utility>

#if defined(__x86_64__)
#include <emmintrin.h>
#endif

namespace kvreg {

namespace {

std::atomic<int64_t> path_counts[3];
// The test hook's switch back to the former kernels (no next-row prefetch, boxes job by job).
std::atomic<bool> former_kernels{false};

// One axis of a box: elements, and the byte step between them on each side.
struct Axis {
  int64_t n;
  int64_t src;
  int64_t dst;
};

// A row of bytes: streaming stores (no read-for-ownership of destination lines, which a
// transfer's destination is not read again soon) where the row is long and aligned enough.
inline void copy_row(char* dst, const char* src, size_t nbytes, bool stream, const char* next = nullptr) {
#if defined(__x86_64__)
  if (stream && nbytes >= 64 && (nbytes & 15) == 0 && (reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    const bool prefetch = nbytes >= 2048;  // long rows: load ahead across 4 KiB pages
    size_t i = 0;
    for (; i + 64 <= nbytes; i += 64) {
      if (prefetch) {
        _mm_prefetch(src + i + 1024, _MM_HINT_NTA);
      } else if (next != nullptr) {
        _mm_prefetch(next + i, _MM_HINT_NTA);
      }
      const auto* from = reinterpret_cast<const __m128i*>(src + i);
      auto* to = reinterpret_cast<__m128i*>(dst + i);
      const __m128i a = _mm_loadu_si128(from);
      const __m128i b = _mm_loadu_si128(from + 1);
      const __m128i c = _mm_loadu_si128(from + 2);
      const __m128i d = _mm_loadu_si128(from + 3);
      _mm_stream_si128(to, a);
      _mm_stream_si128(to + 1, b);
      _mm_stream_si128(to + 2, c);
      _mm_stream_si128(to + 3, d);
    }
    for (; i < nbytes; i += 16) {
      _mm_stream_si128(
          reinterpret_cast<__m128i*>(dst + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    }
    return;
  }
#endif
  (void)stream;
  std::memcpy(dst, src, nbytes);
}

// The transposes read source row y (the elements along x, dense) at rows[y] + x * E and
// write element (x, y) to dst + x * dst_x + y * E (y dense in the destination). Rows are
// pointers so that the tokens of one destination block may come from several source blocks.
using Rows = const char* const*;

template <int E>
void transpose_scalar(char* dst, Rows rows, int64_t x0, int64_t x1, int64_t y0, int64_t y1, int64_t dst_x) {
  for (int64_t x = x0; x < x1; ++x) {
    for (int64_t y = y0; y < y1; ++y) {
      std::memcpy(dst + x * dst_x + y * E, rows[y] + x * E, E);
    }
  }
}

#if defined(__x86_64__)
// 8 x 8 two-byte elements at byte offset `at` of eight rows: eight 16-byte loads, three
// rounds of unpacks; out[x] holds row x of the result.
inline void tile_8x8_2(Rows rows, int64_t at, __m128i* out) {
  __m128i a[8];
  for (int y = 0; y < 8; ++y) {
    a[y] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[y] + at));
  }
  __m128i t[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm_unpacklo_epi16(a[2 * i], a[2 * i + 1]);
    t[2 * i + 1] = _mm_unpackhi_epi16(a[2 * i], a[2 * i + 1]);
  }
  __m128i u[8];
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm_unpacklo_epi32(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm_unpackhi_epi32(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm_unpacklo_epi32(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm_unpackhi_epi32(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = _mm_unpacklo_epi64(u[i], u[i + 4]);
    out[2 * i + 1] = _mm_unpackhi_epi64(u[i], u[i + 4]);
  }
}

inline void transpose_8x8_2(char* dst, Rows rows, int64_t at, int64_t dst_x) {
  __m128i out[8];
  tile_8x8_2(rows, at, out);
  for (int x = 0; x < 8; ++x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + x * dst_x), out[x]);
  }
}

// 8 x 32 two-byte elements, four 8 x 8 tiles side by side: each destination row gets 64
// consecutive bytes, stored with streaming stores (whole lines, no read-for-ownership)
// when `stream` and the rows are 16-byte aligned.
inline void transpose_8x32_2(char* dst, Rows rows, int64_t at, int64_t dst_x, bool stream) {
  __m128i out[4][8];
  for (int k = 0; k < 4; ++k) {
    tile_8x8_2(rows + 8 * k, at, out[k]);
  }
  const bool aligned = ((reinterpret_cast<uintptr_t>(dst) | static_cast<uintptr_t>(dst_x)) & 15) == 0;
  for (int x = 0; x < 8; ++x) {
    auto* row = reinterpret_cast<__m128i*>(dst + x * dst_x);
    for (int k = 0; k < 4; ++k) {
      if (stream && aligned) {
        _mm_stream_si128(row + k, out[k][x]);
      } else {
        _mm_storeu_si128(row + k, out[k][x]);
      }
    }
  }
}

// 4 x 4 four-byte elements.
inline void transpose_4x4_4(char* dst, Rows rows, int64_t at, int64_t dst_x) {
  const __m128i a0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[0] + at));
  const __m128i a1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[1] + at));
  const __m128i a2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[2] + at));
  const __m128i a3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[3] + at));
  const __m128i t0 = _mm_unpacklo_epi32(a0, a1);
  const __m128i t1 = _mm_unpackhi_epi32(a0, a1);
  const __m128i t2 = _mm_unpacklo_epi32(a2, a3);
  const __m128i t3 = _mm_unpackhi_epi32(a2, a3);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_unpacklo_epi64(t0, t2));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + dst_x), _mm_unpackhi_epi64(t0, t2));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * dst_x), _mm_unpacklo_epi64(t1, t3));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 3 * dst_x), _mm_unpackhi_epi64(t1, t3));
}
#endif

// A whole nx x ny transpose: full tiles with the vector kernels, x-tile by x-tile so that
// each destination row (fixed x) is written front to back, then the edges element-wise.
template <int E>
void transpose(char* dst, Rows rows, int64_t nx, int64_t ny, int64_t dst_x, bool stream) {
#if defined(__x86_64__)
  if (E == 2 || E == 4) {
    constexpr int64_t kTile = E == 2 ? 8 : 4;
    const int64_t fx = nx / kTile * kTile;
    const int64_t fy = ny / kTile * kTile;
    for (int64_t x = 0; x < fx; x += kTile) {
      int64_t wide = 0;  // four tiles at once: 64 bytes of each destination row
      if (E == 2) {
        for (; wide + 32 <= ny; wide += 32) {
          transpose_8x32_2(dst + x * dst_x + wide * E, rows + wide, x * E, dst_x, stream);
        }
      }
      for (int64_t y = wide; y < fy; y += kTile) {
        char* to = dst + x * dst_x + y * E;
        if (E == 2) {
          transpose_8x8_2(to, rows + y, x * E, dst_x);
        } else {
          transpose_4x4_4(to, rows + y, x * E, dst_x);
        }
      }
      transpose_scalar<E>(dst, rows, x, x + kTile, fy, ny, dst_x);
    }
    transpose_scalar<E>(dst, rows, fx, nx, 0, ny, dst_x);
    return;
  }
#endif
  (void)stream;
  transpose_scalar<E>(dst, rows, 0, nx, 0, ny, dst_x);
}

void transpose_any(
    char* dst, Rows rows, int64_t nx, int64_t ny, int64_t dst_x, int64_t element, bool stream) {
  switch (element) {
    case 1:
      transpose<1>(dst, rows, nx, ny, dst_x, stream);
      break;
    case 2:
      transpose<2>(dst, rows, nx, ny, dst_x, stream);
      break;
    case 4:
      transpose<4>(dst, rows, nx, ny, dst_x, stream);
      break;
    default:
      transpose<8>(dst, rows, nx, ny, dst_x, stream);
      break;
  }
}

// A reusable per-thread list of row pointers.
std::vector<const char*>& row_buffer(size_t size) {
  thread_local std::vector<const char*> rows;
  if (rows.size() < size) {
    rows.resize(size);
  }
  return rows;
}

// The box's axes of more than one element, outer to inner in the destination's order, with
// neighbours that are contiguous on both sides merged into one.
int box_axes(Axis* out, int64_t tokens, int64_t heads, int64_t head_dim, const BoxStrides& s) {
  const Axis all[3] = {{tokens, s.src_t, s.dst_t}, {heads, s.src_h, s.dst_h}, {head_dim, s.src_d, s.dst_d}};
  int count = 0;
  for (const Axis& axis : all) {
    if (axis.n > 1) {
      out[count++] = axis;
    }
  }
  for (int i = 1; i < count; ++i) {  // at most three: an insertion sort
    for (int j = i; j > 0 && out[j - 1].dst < out[j].dst; --j) {
      std::swap(out[j - 1], out[j]);
    }
  }
  for (int i = count - 1; i > 0; --i) {
    const Axis& inner = out[i];
    const Axis& outer = out[i - 1];
    if (outer.src == inner.n * inner.src && outer.dst == inner.n * inner.dst) {
      out[i - 1] = {inner.n * outer.n, inner.src, inner.dst};
      for (int j = i; j + 1 < count; ++j) {
        out[j] = out[j + 1];
      }
      --count;
    }
  }
  return count;
}

BoxPath copy_box(
    char* dst, const char* src, int64_t tokens, int64_t heads, int64_t head_dim, int64_t element,
    const BoxStrides& strides, bool stream) {
  Axis axes[3];
  const int count = box_axes(axes, tokens, heads, head_dim, strides);
  if (count == 0) {
    std::memcpy(dst, src, static_cast<size_t>(element));
    return BoxPath::kRows;
  }
  const Axis& inner = axes[count - 1];
  if (inner.src == element && inner.dst == element) {
    // Rows: up to two outer axes walked in the destination's order; in the source's when
    // whole lines are streamed out (reads in address order help the prefetcher more than
    // writes in order do streaming stores).
    const auto row = static_cast<size_t>(inner.n * element);
    const Axis one{1, 0, 0};
    const Axis* outer = count == 3 ? &axes[0] : &one;
    const Axis* middle = count >= 2 ? &axes[count - 2] : &one;
    if (stream && row % 64 == 0 && outer->src < middle->src) {
      std::swap(outer, middle);
    }
    // Rows shorter than copy_row's own look-ahead (a head slice of a token's row: 1 KiB of
    // every 2 KiB) prefetch the next row while copying this one: the hardware prefetcher
    // does not follow the gaps between them.
    const bool ahead = !former_kernels.load(std::memory_order_relaxed);
    for (int64_t i = 0; i < outer->n; ++i) {
      for (int64_t j = 0; j < middle->n; ++j) {
        const char* from = src + i * outer->src + j * middle->src;
        const char* next = nullptr;
        if (ahead && j + 1 < middle->n) {
          next = from + middle->src;
        } else if (ahead && i + 1 < outer->n) {
          next = src + (i + 1) * outer->src;
        }
        copy_row(dst + i * outer->dst + j * middle->dst, from, row, stream, next);
      }
    }
    return BoxPath::kRows;
  }
  int x = -1;  // dense in the source
  int y = -1;  // dense in the destination
  for (int i = 0; i < count; ++i) {
    if (axes[i].src == element && x < 0) {
      x = i;
    } else if (axes[i].dst == element && y < 0) {
      y = i;
    }
  }
  if (x >= 0 && y >= 0) {
    // Transposes of the two dense axes, one per element of the third axis (if any).
    int z = -1;
    for (int i = 0; i < count; ++i) {
      z = i != x && i != y ? i : z;
    }
    const int64_t nz = z < 0 ? 1 : axes[z].n;
    auto& rows = row_buffer(static_cast<size_t>(axes[y].n));
    for (int64_t k = 0; k < nz; ++k) {
      const int64_t src_k = z < 0 ? 0 : k * axes[z].src;
      const int64_t dst_k = z < 0 ? 0 : k * axes[z].dst;
      for (int64_t j = 0; j < axes[y].n; ++j) {
        rows[j] = src + src_k + j * axes[y].src;
      }
      transpose_any(dst + dst_k, rows.data(), axes[x].n, axes[y].n, axes[x].dst, element, stream);
    }
    return BoxPath::kTranspose;
  }
  // Neither side dense along one axis the other shares: element by element.
  const Axis one{1, 0, 0};
  const Axis& a = axes[0];
  const Axis& b = count >= 2 ? axes[1] : one;
  const Axis& c = count == 3 ? axes[2] : one;
  for (int64_t i = 0; i < a.n; ++i) {
    for (int64_t j = 0; j < b.n; ++j) {
      for (int64_t k = 0; k < c.n; ++k) {
        std::memcpy(
            dst + i * a.dst + j * b.dst + k * c.dst, src + i * a.src + j * b.src + k * c.src,
            static_cast<size_t>(element));
      }
    }
  }
  return BoxPath::kElements;
}

// A gathered chunk: each token's source row found through token_src. The destination is
// dense along tokens and the source along heads or dims (box_job checks), so the chunk is
// one transpose per element of the other axis.
void copy_gathered(
    char* dst, const char* src, const int64_t* token_src, int64_t tokens, int64_t heads, int64_t head_dim,
    int64_t element, const BoxStrides& s, bool stream) {
  const bool dims_dense = s.src_d == element;
  const Axis x = dims_dense ? Axis{head_dim, s.src_d, s.dst_d} : Axis{heads, s.src_h, s.dst_h};
  const Axis z = dims_dense ? Axis{heads, s.src_h, s.dst_h} : Axis{head_dim, s.src_d, s.dst_d};
  auto& rows = row_buffer(static_cast<size_t>(tokens));
  for (int64_t k = 0; k < z.n; ++k) {
    for (int64_t j = 0; j < tokens; ++j) {
      rows[j] = src + token_src[j] + k * z.src;
    }
    transpose_any(dst + k * z.dst, rows.data(), x.n, tokens, x.dst, element, stream);
  }
}

}  // namespace

bool gathers(const BoxStrides& s, int64_t element) {
  return s.dst_t == element && s.src_t != element && (s.src_d == element || s.src_h == element);
}

std::vector<int64_t> box_path_counts() {
  return {path_counts[0].load(), path_counts[1].load(), path_counts[2].load()};
}

namespace {

using Item = BoxWork::Item;

// The order boxes are copied in. Jobs with the same number of lanes (K and V of one plan,
// moved apart) go lane by lane and, within a lane, by token: K's and V's boxes of the same
// tokens are neighbours, so that where K and V share a row or a block on one side (vLLM's
// FlashAttention rows of K then V, its CPU blocks of K tiles then V tiles) the second pass
// finds that side's lines still in cache instead of reading them from memory again.
std::vector<Item> box_items(const std::vector<BoxCopy>& jobs) {
  std::vector<Item> items;
  bool same_lanes = true;
  for (size_t j = 0; j < jobs.size(); ++j) {
    const auto lanes = static_cast<int32_t>(jobs[j].src_bases.size());
    same_lanes = same_lanes && lanes == static_cast<int32_t>(jobs[0].src_bases.size());
    for (int32_t lane = 0; lane < lanes; ++lane) {
      for (int64_t c = 0; c < static_cast<int64_t>(jobs[j].chunks.size()); ++c) {
        items.push_back({static_cast<int32_t>(j), lane, c});
      }
    }
  }
  if (!same_lanes || jobs.size() < 2 || former_kernels.load(std::memory_order_relaxed)) {
    return items;
  }
  // Each chunk's first token: chunks run through a job's tokens in order.
  std::vector<std::vector<int64_t>> starts(jobs.size());
  for (size_t j = 0; j < jobs.size(); ++j) {
    int64_t token = 0;
    for (const TokenChunk& chunk : jobs[j].chunks) {
      starts[j].push_back(token);
      token += chunk.tokens;
    }
  }
  std::stable_sort(items.begin(), items.end(), [&](const Item& a, const Item& b) {
    if (a.lane != b.lane) {
      return a.lane < b.lane;
    }
    return starts[a.job][a.chunk] < starts[b.job][b.chunk];
  });
  return items;
}

}  // namespace

void test_force_former_kernels(bool on) {
  former_kernels.store(on, std::memory_order_relaxed);
}

namespace {

int64_t box_bytes(const BoxCopy& job, const TokenChunk& chunk) {
  return chunk.tokens * job.heads * job.head_dim * job.element_size;
}

// Copies boxes [begin, end) of `order` on the calling thread.
void copy_items(
    const std::vector<BoxCopy>& jobs, const Item* order, int64_t begin, int64_t end, bool stream) {
  int64_t counts[3] = {0, 0, 0};
  for (int64_t item = begin; item < end; ++item) {
    const BoxCopy& job = jobs[order[item].job];
    const int32_t lane = order[item].lane;
    const TokenChunk& chunk = job.chunks[order[item].chunk];
    if (chunk.first_token >= 0) {
      copy_gathered(
          job.dst_bases[lane] + chunk.dst_offset, job.src_bases[lane],
          job.token_src.data() + chunk.first_token, chunk.tokens, job.heads, job.head_dim, job.element_size,
          job.strides, stream);
      ++counts[static_cast<int>(BoxPath::kTranspose)];
      continue;
    }
    const BoxPath path = copy_box(
        job.dst_bases[lane] + chunk.dst_offset, job.src_bases[lane] + chunk.src_offset, chunk.tokens,
        job.heads, job.head_dim, job.element_size, job.strides, stream);
    ++counts[static_cast<int>(path)];
  }
#if defined(__x86_64__)
  _mm_sfence();  // this thread's streaming stores are visible before the copy returns
#endif
  for (int i = 0; i < 3; ++i) {
    path_counts[i].fetch_add(counts[i], std::memory_order_relaxed);
  }
}

bool streams() {
  return copy_strategy().rfind("memcpy", 0) != 0;
}

}  // namespace

void copy_boxes(const std::vector<BoxCopy>& jobs) {
  int64_t total_bytes = 0;
  for (const BoxCopy& job : jobs) {
    for (const TokenChunk& chunk : job.chunks) {
      total_bytes += static_cast<int64_t>(job.src_bases.size()) * box_bytes(job, chunk);
    }
  }
  const std::vector<Item> order = box_items(jobs);
  const auto items = static_cast<int64_t>(order.size());
  if (items == 0) {
    return;
  }
  const std::string strategy = copy_strategy();
  const bool stream = strategy.rfind("memcpy", 0) != 0;
  const bool single = strategy.find(":single") != std::string::npos;
  // Enough bytes per task that the thread pool's overhead stays small.
  const int64_t average = std::max<int64_t>(1, total_bytes / items);
  const int64_t grain = std::max<int64_t>(1, (int64_t{256} << 10) / average);
  if (single || in_forked_child() || at::get_num_threads() <= 1 || items <= grain) {
    copy_items(jobs, order.data(), 0, items, stream);
  } else {
    at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
      copy_items(jobs, order.data(), begin, end, stream);
    });
  }
}

BoxWork::BoxWork(std::vector<BoxCopy> jobs) : jobs_(std::move(jobs)), order_(box_items(jobs_)) {
  for (const Item& item : order_) {
    nbytes_ += box_bytes(jobs_[item.job], jobs_[item.job].chunks[item.chunk]);
  }
}

std::vector<std::pair<int64_t, int64_t>> BoxWork::split(int64_t task_bytes) const {
  std::vector<std::pair<int64_t, int64_t>> ranges;
  int64_t begin = 0;
  int64_t bytes = 0;
  for (int64_t i = 0; i < boxes(); ++i) {
    const Item& item = order_[i];
    bytes += box_bytes(jobs_[item.job], jobs_[item.job].chunks[item.chunk]);
    if (bytes >= task_bytes) {
      ranges.emplace_back(begin, i + 1);
      begin = i + 1;
      bytes = 0;
    }
  }
  if (begin < boxes()) {
    ranges.emplace_back(begin, boxes());
  }
  return ranges;
}

void BoxWork::copy(int64_t begin, int64_t end) const {
  copy_items(jobs_, order_.data(), begin, end, streams());
}

}  // namespace kvreg
