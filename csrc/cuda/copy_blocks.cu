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
constexpr int64_t kMaxGrid = int64_t{1} << 20;

// One thread block per (tensor, segment) item; 16-byte loads when everything is aligned.
// Host memory is reached through unified addressing, so it must be page-locked.
__global__ void copy_segments_kernel(
    const uint64_t* __restrict__ src_addrs,
    const uint64_t* __restrict__ dst_addrs,
    const Segment* __restrict__ segments,
    int64_t num_segments,
    int64_t num_items) {
  for (int64_t item = blockIdx.x; item < num_items; item += gridDim.x) {
    const int64_t tensor = item / num_segments;
    const Segment segment = segments[item % num_segments];
    const char* src = reinterpret_cast<const char*>(src_addrs[tensor]) + segment.src_offset;
    char* dst = reinterpret_cast<char*>(dst_addrs[tensor]) + segment.dst_offset;
    const int64_t nbytes = segment.nbytes;
    const bool aligned =
        ((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst) |
          static_cast<uintptr_t>(nbytes)) & 15) == 0;
    if (aligned) {
      const int4* src4 = reinterpret_cast<const int4*>(src);
      int4* dst4 = reinterpret_cast<int4*>(dst);
      for (int64_t i = threadIdx.x; i < nbytes / 16; i += blockDim.x) {
        dst4[i] = src4[i];
      }
    } else {
      for (int64_t i = threadIdx.x; i < nbytes; i += blockDim.x) {
        dst[i] = src[i];
      }
    }
  }
}

bool host_side_page_locked(const CacheRecord& record) {
  if (record.desc.placement != Placement::HOST) {
    return true;
  }
  for (uint64_t addr : record.addrs) {
    cudaPointerAttributes attributes{};
    const bool locked = cudaPointerGetAttributes(&attributes, reinterpret_cast<void*>(addr)) ==
            cudaSuccess && attributes.type == cudaMemoryTypeHost;
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

// Plan layout: src addrs, dst addrs, segments (three int64 each).
int64_t plan_words(const CopyPlan& plan) {
  return 2 * plan.src->desc.num_tensors + 3 * static_cast<int64_t>(plan.segments.size());
}

void fill_plan(const CopyPlan& plan, uint64_t* out) {
  static_assert(sizeof(Segment) == 3 * sizeof(int64_t), "Segment is stored as three int64");
  const int64_t num_tensors = plan.src->desc.num_tensors;
  std::copy(plan.src->addrs.begin(), plan.src->addrs.end(), out);
  std::copy(plan.dst->addrs.begin(), plan.dst->addrs.end(), out + num_tensors);
  std::memcpy(out + 2 * num_tensors, plan.segments.data(), plan.segments.size() * sizeof(Segment));
}

// A captured graph replays the launch later, so the plan it reads must outlive this call:
// page-locked buffers kept for the life of the process (a few KiB per captured copy),
// read by the kernel through unified addressing, with no copy node in the graph.
const uint64_t* captured_plan(const CopyPlan& plan) {
  static std::mutex mutex;
  static std::vector<void*>* buffers = new std::vector<void*>();  // never freed, see above
  void* buffer = nullptr;
  C10_CUDA_CHECK(cudaHostAlloc(&buffer, plan_words(plan) * sizeof(uint64_t), cudaHostAllocDefault));
  fill_plan(plan, static_cast<uint64_t*>(buffer));
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

  const uint64_t* words = nullptr;
  at::Tensor uploaded;
  if (capturing) {
    words = captured_plan(plan);
  } else {
    // Staged in pinned memory, which the caching host allocator keeps until the upload on
    // this stream has finished; the device copy is freed in stream order after the kernel.
    at::Tensor staging =
        at::empty({plan_words(plan)}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    fill_plan(plan, reinterpret_cast<uint64_t*>(staging.data_ptr<int64_t>()));
    uploaded = staging.to(at::Device(at::kCUDA, guard.current_device().index()), /*non_blocking=*/true);
    words = reinterpret_cast<const uint64_t*>(uploaded.const_data_ptr<int64_t>());
  }

  const int64_t num_tensors = src.num_tensors;
  const int64_t num_segments = static_cast<int64_t>(plan.segments.size());
  const int64_t num_items = num_tensors * num_segments;
  const int64_t grid = std::min(num_items, kMaxGrid);
  copy_segments_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
      words,
      words + num_tensors,
      reinterpret_cast<const Segment*>(words + 2 * num_tensors),
      num_segments,
      num_items);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace kvreg
