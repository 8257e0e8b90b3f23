// Page-locking of registered host memory for the accelerator (CUDA builds); no-op otherwise.
#include "host_pin.h"

#include "status.h"

#ifdef KVREG_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace kvreg {

#ifdef KVREG_WITH_CUDA

bool cuda_available() {
  static const bool available = [] {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
      cudaGetLastError();  // clear the sticky "no device" error
      return false;
    }
    return count > 0;
  }();
  return available;
}

bool pin_host(void* ptr, size_t nbytes) {
  if (!cuda_available() || nbytes == 0) {
    return false;
  }
  cudaPointerAttributes attributes{};
  if (cudaPointerGetAttributes(&attributes, ptr) == cudaSuccess && attributes.type == cudaMemoryTypeHost) {
    return false;  // already page-locked by its allocator or by someone else
  }
  cudaGetLastError();
  const cudaError_t err = cudaHostRegister(ptr, nbytes, cudaHostRegisterDefault);
  if (err == cudaErrorHostMemoryAlreadyRegistered) {
    cudaGetLastError();
    return false;
  }
  if (err != cudaSuccess) {
    cudaGetLastError();
    KVREG_CHECK(
        false, LLM_FAILED, "cudaHostRegister of ", nbytes, " bytes failed: ", cudaGetErrorString(err),
        "; register with RegisterCfg(pin_host_memory=False) to skip pinning");
  }
  return true;
}

MemoryKind memory_kind(const void* ptr) {
  if (!cuda_available()) {
    return MemoryKind::UNKNOWN;
  }
  cudaPointerAttributes attributes{};
  if (cudaPointerGetAttributes(&attributes, ptr) != cudaSuccess) {
    cudaGetLastError();
    return MemoryKind::UNKNOWN;
  }
  switch (attributes.type) {
    case cudaMemoryTypeDevice:
    case cudaMemoryTypeManaged:
      return MemoryKind::DEVICE;
    default:
      // Pinned, or pageable memory the driver has never seen: with unified addressing,
      // every device allocation is known to the driver, so this is host memory.
      return MemoryKind::HOST;
  }
}

int64_t memory_device(const void* ptr) {
  cudaPointerAttributes attributes{};
  if (!cuda_available() || cudaPointerGetAttributes(&attributes, ptr) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return attributes.device;
}

void sync_device() noexcept {
  if (cuda_available() && cudaDeviceSynchronize() != cudaSuccess) {
    cudaGetLastError();
  }
}

void unpin_host(void* ptr) noexcept {
  if (cudaHostUnregister(ptr) != cudaSuccess) {
    cudaGetLastError();
  }
}

#else  // CPU-only build

bool cuda_available() {
  return false;
}

bool pin_host(void* /*ptr*/, size_t /*nbytes*/) {
  return false;
}

MemoryKind memory_kind(const void* /*ptr*/) {
  return MemoryKind::UNKNOWN;
}

int64_t memory_device(const void* /*ptr*/) {
  return -1;
}

void sync_device() noexcept {}

void unpin_host(void* /*ptr*/) noexcept {}

#endif

}  // namespace kvreg
