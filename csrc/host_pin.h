// Page-locking of registered host memory for the accelerator (CUDA builds); no-op otherwise.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvreg {

// True when this build has CUDA and at least one GPU is visible.
bool cuda_available();

// Page-locks [ptr, ptr + nbytes). Returns true if this call pinned it (unpin_host must undo
// it), false when there is nothing to do: CPU-only build, no GPU, or memory that is already
// page-locked (left as it is). Raises LLM_FAILED if the driver refuses.
bool pin_host(void* ptr, size_t nbytes);

enum class MemoryKind { UNKNOWN, HOST, DEVICE };

// What the accelerator runtime says `ptr` is: DEVICE (device or managed memory), HOST
// (pinned or ordinary host memory), or UNKNOWN when there is no runtime to ask.
MemoryKind memory_kind(const void* ptr);
// The device index owning device memory at `ptr`, or -1.
int64_t memory_device(const void* ptr);

// Waits for all device work (CUDA builds with a GPU), so that memory released or unpinned
// next is not under a copy still in flight. Never throws.
void sync_device() noexcept;

// Undoes a pin_host() that returned true. Never throws.
void unpin_host(void* ptr) noexcept;

}  // namespace kvreg
