// CRC-32C (Castagnoli) of memory and of a registered cache's blocks: what verified
// transfers compare (torch_kvreg/verify.py). SSE4.2's crc32 instruction on three
// interleaved streams where the CPU has it (chosen at run time), slicing-by-8 tables where
// it does not; both give the same values.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace kvreg {

// The CRC-32C of `data` continuing from `crc` (0 to start): crc32c(crc32c(0, a), b) is the
// CRC of a followed by b. "123456789" gives 0xE3069283.
uint32_t crc32c(uint32_t crc, const void* data, size_t nbytes);
// The same, by the portable tables whatever the CPU (tests compare the two).
uint32_t crc32c_portable(uint32_t crc, const void* data, size_t nbytes);
// "sse4.2" or "portable": what crc32c runs on this CPU.
std::string crc32c_implementation();

// One CRC-32C per entry of `blocks`: bytes [offset, offset + size) of that dim-0 slice of
// each tensor in `tensors` (empty: all of the cache's, in order), chained in that order.
// size -1: to the end of the slice. Checked before any byte is read (LLM_PARAM_INVALID,
// IndexError-type for a block or tensor out of range); the cache stays registered while
// it is read. HOST caches are read in place (on all of torch's threads); DEVICE slices
// are copied to the host first. Returns an int64 tensor of the CRC values.
at::Tensor checksum_blocks(
    int64_t cache_id, const std::vector<int64_t>& tensors, const at::Tensor& blocks, int64_t offset,
    int64_t size);

}  // namespace kvreg
