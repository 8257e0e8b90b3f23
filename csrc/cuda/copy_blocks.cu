// CUDA block copy: one upload of the plan and one kernel launch per request.
#include "../copy_plan.h"
#include "../host_pin.h"
#include "../status.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <vector>

namespace kvreg {

namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kUnroll = 4;  // 16-byte loads in flight per lane
// Segments are cut into chunks of at most this many bytes, one warp per chunk at a time:
// long runs spread over every multiprocessor, and small blocks (2 KiB) fill a warp's
// 32 lanes x 16 bytes x kUnroll exactly instead of idling most of a thread block.
constexpr int64_t kChunkBytes = int64_t{16} << 10;

// Work item = (tensor, chunk); warps stride over the items. 16-byte streaming loads and
// stores when the chunk is 16-byte aligned on both sides, bytes otherwise. Host memory is
// reached through unified addressing, so it must be page-locked.
__global__ void copy_chunks_kernel(
    const uint64_t* __restrict__ src_addrs, const uint64_t* __restrict__ dst_addrs,
    const Segment* __restrict__ chunks, int64_t num_chunks, int64_t num_items) {
  const int lane = threadIdx.x & 31;
  const int64_t num_warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t item = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; item < num_items;
       item += num_warps) {
    const int64_t tensor = item / num_chunks;
    const Segment chunk = chunks[item - tensor * num_chunks];
    const char* src = reinterpret_cast<const char*>(src_addrs[tensor]) + chunk.src_offset;
    char* dst = reinterpret_cast<char*>(dst_addrs[tensor]) + chunk.dst_offset;
    const int64_t nbytes = chunk.nbytes;
    const bool aligned = ((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst) |
                           static_cast<uintptr_t>(nbytes)) &
                          15) == 0;
    if (aligned) {
      const int4* src4 = reinterpret_cast<const int4*>(src);
      int4* dst4 = reinterpret_cast<int4*>(dst);
      const int64_t n = nbytes / 16;
      int64_t i = lane;
      for (; i + (kUnroll - 1) * 32 < n; i += kUnroll * 32) {
        int4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          v[u] = __ldcs(src4 + i + u * 32);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          __stcs(dst4 + i + u * 32, v[u]);
        }
      }
      for (; i < n; i += 32) {
        __stcs(dst4 + i, __ldcs(src4 + i));
      }
    } else {
      for (int64_t i = lane; i < nbytes; i += 32) {
        dst[i] = src[i];
      }
    }
  }
}

// The plan's segments cut into chunks of at most kChunkBytes (cuts keep 16-byte alignment).
std::vector<Segment> chunked(const std::vector<Segment>& segments) {
  std::vector<Segment> chunks;
  chunks.reserve(segments.size());
  for (const Segment& segment : segments) {
    for (int64_t done = 0; done < segment.nbytes; done += kChunkBytes) {
      chunks.push_back(
          Segment{
              segment.src_offset + done, segment.dst_offset + done,
              std::min(kChunkBytes, segment.nbytes - done)});
    }
  }
  return chunks;
}

bool host_side_page_locked(const CacheRecord& record) {
  if (record.desc.placement != Placement::HOST) {
    return true;
  }
  for (uint64_t addr : record.addrs) {
    cudaPointerAttributes attributes{};
    const bool locked = cudaPointerGetAttributes(&attributes, reinterpret_cast<void*>(addr)) == cudaSuccess &&
                        attributes.type == cudaMemoryTypeHost;
    cudaGetLastError();
    if (!locked) {
      return false;
    }
  }
  return true;
}

// Pageable host memory, or two different devices: the driver's copy handles both.
void run_copy_memcpy(const CopyPlan& plan, cudaStream_t stream) {
  for (int64_t tensor = 0; tensor < plan.src->desc.num_tensors; ++tensor) {
    for (const Segment& segment : plan.segments) {
      C10_CUDA_CHECK(cudaMemcpyAsync(
          reinterpret_cast<char*>(plan.dst->addrs[tensor]) + segment.dst_offset,
          reinterpret_cast<const char*>(plan.src->addrs[tensor]) + segment.src_offset,
          static_cast<size_t>(segment.nbytes), cudaMemcpyDefault, stream));
    }
  }
}

bool stream_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// Uploaded plan layout: src addrs, dst addrs, chunks (three int64 each).
int64_t plan_words(const CopyPlan& plan, const std::vector<Segment>& chunks) {
  return 2 * plan.src->desc.num_tensors + 3 * static_cast<int64_t>(chunks.size());
}

void fill_plan(const CopyPlan& plan, const std::vector<Segment>& chunks, uint64_t* out) {
  static_assert(sizeof(Segment) == 3 * sizeof(int64_t), "Segment is stored as three int64");
  const int64_t num_tensors = plan.src->desc.num_tensors;
  std::copy(plan.src->addrs.begin(), plan.src->addrs.end(), out);
  std::copy(plan.dst->addrs.begin(), plan.dst->addrs.end(), out + num_tensors);
  std::memcpy(out + 2 * num_tensors, chunks.data(), chunks.size() * sizeof(Segment));
}

// A captured graph replays the launch later, so the plan it reads must outlive this call:
// page-locked buffers kept for the life of the process (a few KiB per captured copy),
// read by the kernel through unified addressing, with no copy node in the graph.
const uint64_t* captured_plan(const CopyPlan& plan, const std::vector<Segment>& chunks) {
  static std::mutex mutex;
  static std::vector<void*>* buffers = new std::vector<void*>();  // never freed, see above
  void* buffer = nullptr;
  // Allocating is not a stream operation, but global capture mode (torch's default) forbids
  // it on any thread while a capture runs; relaxed mode for this thread allows it.
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  const cudaError_t allocated =
      cudaHostAlloc(&buffer, plan_words(plan, chunks) * sizeof(uint64_t), cudaHostAllocDefault);
  C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  C10_CUDA_CHECK(allocated);
  fill_plan(plan, chunks, static_cast<uint64_t*>(buffer));
  std::lock_guard<std::mutex> lock(mutex);
  buffers->push_back(buffer);
  return static_cast<const uint64_t*>(buffer);
}

}  // namespace

bool current_stream_capturing() {
  return cuda_available() && stream_capturing(at::cuda::getCurrentCUDAStream());
}

void run_copy_cuda(const CopyPlan& plan) {
  const CacheDesc& src = plan.src->desc;
  const CacheDesc& dst = plan.dst->desc;
  const bool both_on_device = src.placement == Placement::DEVICE && dst.placement == Placement::DEVICE;
  const int64_t device = dst.placement == Placement::DEVICE ? dst.device_index : src.device_index;
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device < 0 ? 0 : device));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool capturing = stream_capturing(stream);

  if ((both_on_device && src.device_index != dst.device_index) || !host_side_page_locked(*plan.src) ||
      !host_side_page_locked(*plan.dst)) {
    KVREG_CHECK_ARG(
        !capturing,
        "a copy captured in a CUDA graph needs page-locked host memory (register with "
        "pin_host_memory=True) and caches on one device");
    run_copy_memcpy(plan, stream);
    return;
  }

  const std::vector<Segment> chunks = chunked(plan.segments);
  const uint64_t* words = nullptr;
  at::Tensor uploaded;
  if (capturing) {
    words = captured_plan(plan, chunks);
  } else {
    // Staged in pinned memory, which the caching host allocator keeps until the upload on
    // this stream has finished; the device copy is freed in stream order after the kernel.
    at::Tensor staging =
        at::empty({plan_words(plan, chunks)}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    fill_plan(plan, chunks, reinterpret_cast<uint64_t*>(staging.data_ptr<int64_t>()));
    uploaded = staging.to(at::Device(at::kCUDA, guard.current_device().index()), /*non_blocking=*/true);
    words = reinterpret_cast<const uint64_t*>(uploaded.const_data_ptr<int64_t>());
  }

  // A persistent grid: as many resident blocks as the device holds, or fewer for small
  // requests; warps stride over the (tensor, chunk) items.
  const int64_t num_tensors = src.num_tensors;
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  const int64_t num_items = num_tensors * num_chunks;
  const int64_t resident =
      int64_t{at::cuda::getCurrentDeviceProperties()->multiProcessorCount} * (2048 / kThreads);
  const int64_t grid =
      std::max<int64_t>(1, std::min((num_items + kWarpsPerBlock - 1) / kWarpsPerBlock, resident));
  copy_chunks_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
      words, words + num_tensors, reinterpret_cast<const Segment*>(words + 2 * num_tensors), num_chunks,
      num_items);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace kvreg
