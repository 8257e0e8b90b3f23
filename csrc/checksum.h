// CRC-32C (Castagnoli) of memory and of a registered cache's blocks: what verified
// transfers compare (torch_kvreg/verify.py). Chosen at run time: PCLMULQDQ folding of four
// 16-byte lanes for inputs of 256 bytes and more where the CPU has it, SSE4.2's crc32
// instruction on three interleaved streams for shorter ones (and where there is no
// PCLMULQDQ), slicing-by-8 tables elsewhere; all give the same values.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace kvreg {

// The CRC-32C of `data` continuing from `crc` (0 to start): crc32c(crc32c(0, a), b) is the
// CRC of a followed by b. "123456789" gives 0xE3069283.
uint32_t crc32c(uint32_t crc, const void* data, size_t nbytes);
// The same, by the portable tables whatever the CPU (tests compare the two).
uint32_t crc32c_portable(uint32_t crc, const void* data, size_t nbytes);
// "pclmulqdq", "sse4.2" or "portable": what crc32c runs on this CPU for long inputs (or
// what the test hook below forced).
std::string crc32c_implementation();
// Test hook: makes crc32c (and every checksum of blocks) run `name` ("pclmulqdq",
// "sse4.2", "portable"), or pick by the CPU again ("auto"), for the whole process; an
// implementation this CPU cannot run, or an unknown name, is LLM_PARAM_INVALID.
// "pclmulqdq" still takes inputs under 256 bytes on "sse4.2", as it does when picked.
void test_force_crc32c_implementation(const std::string& name);

// One CRC-32C per entry of `blocks`: bytes [offset, offset + size) of that dim-0 slice of
// each tensor in `tensors` (empty: all of the cache's, in order), chained in that order.
// size -1: to the end of the slice. Checked before any byte is read (LLM_PARAM_INVALID,
// IndexError-type for a block or tensor out of range); the cache stays registered while
// it is read. HOST caches are read in place (on all of torch's threads); DEVICE slices
// are copied to the host first. Returns an int64 tensor of the CRC values.
at::Tensor checksum_blocks(
    int64_t cache_id, const std::vector<int64_t>& tensors, const at::Tensor& blocks, int64_t offset,
    int64_t size);

// Test hooks of copy_blocks_verified, called with (cache id, block) on the calling thread.
using BlockHook = std::function<void(int64_t, int64_t)>;

// A verified copy between two HOST caches: dim-0 slice src_blocks[j] of each tensor in
// src_tensors (empty: all) goes to dst_blocks[j] of the matching tensor in dst_tensors, and
// row 0 / row 1 of the returned [2, n] int64 tensor hold the CRC-32C of each source block
// (chained over its tensors) and of the destination block once it landed. Block by block:
// the source block's CRC is taken, then it is copied while its lines are still in the
// cache, then the CRC of what landed there is read back (also from the cache), so each
// byte leaves main memory once, as in the unverified copy. `slice`: one pair, bytes
// [offset, offset + size) (size -1: to the end), as copy_kv_cache. Every check of the
// unverified copy is made before any byte moves. `source_taken` runs after a block's
// source CRC, before its copy; `landed` after its copy, before its CRC; with either set
// the pairs go one at a time on the calling thread.
at::Tensor copy_blocks_verified(
    int64_t src_id, int64_t dst_id, const at::Tensor& src_blocks, const at::Tensor& dst_blocks,
    const std::vector<int64_t>& src_tensors, const std::vector<int64_t>& dst_tensors, bool slice,
    int64_t offset, int64_t size, const BlockHook& source_taken, const BlockHook& landed);

}  // namespace kvreg
