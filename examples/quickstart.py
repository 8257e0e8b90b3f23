"""Register a paged KV cache with torch_kvreg, look at it, use the op in a compiled function."""

import torch

import torch_kvreg as kv

LAYERS, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 4, 64, 16, 8, 128
device = "cuda" if torch.cuda.is_available() else "cpu"

kv.initialize(cluster_id=0, role=kv.LlmRole.MIX)

# One K and one V tensor per layer: [num_blocks, block_size, num_kv_heads, head_dim].
kv_cache = [
    torch.zeros(NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=torch.float16, device=device)
    for _ in range(2 * LAYERS)
]
cache = kv.register_kv_cache(kv_cache)
print("registered:", cache)
print("limits:    ", kv.limits())
print("usage:     ", kv.usage())


# Inside torch.compile: the op runs exactly once per call, with the real tensors.
@torch.compile(fullgraph=True, backend="aot_eager")
def register_scratch(k, v):
    cache_id = torch.ops.llm.register_kv_cache([k, v])
    return cache_id


scratch = [torch.zeros(8, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=torch.float16, device=device) for _ in range(2)]
scratch_id = int(register_scratch(*scratch))
print("compiled:   registered cache", scratch_id, "->", kv.get_cache(scratch_id).cache_desc)

kv.unregister_kv_cache(scratch_id)
kv.unregister_kv_cache(cache)
print("after unregister:", kv.usage())
kv.finalize()
