"""copy_kv_tokens / plan_kv_tokens: transfers between caches of different block size, layout
and tensor-parallel split, byte for byte against a pure-torch reference."""

import itertools
import random

import pytest
import torch
from geometry_ref import cache_tensors, expected_after, logical, same_bytes

import torch_kvreg
from torch_kvreg import KVGeometry, LLMParamInvalidError
from torch_kvreg.geometry import LAYOUTS

H, D = 4, 8  # the model's KV heads and head dim in most tests


def geometry(layout, block_size, tp_size=1, tp_rank=0, heads=H, head_dim=D):
    return KVGeometry(layout, block_size, heads, head_dim, tp_size, tp_rank)


def run_case(
    src_geometry,
    dst_geometry,
    src_blocks,
    dst_blocks,
    *,
    num_layers=2,
    src_num_blocks=8,
    dst_num_blocks=8,
    dtype=torch.float32,
    seed=0,
    **selection,
):
    """Copies with copy_kv_tokens and checks every byte of the destination against the reference."""
    src_tensors = cache_tensors(src_geometry, num_layers, src_num_blocks, dtype, seed)
    dst_tensors = cache_tensors(dst_geometry, num_layers, dst_num_blocks, dtype, seed + 1000)
    src, dst = torch_kvreg.register_kv_cache(src_tensors), torch_kvreg.register_kv_cache(dst_tensors)
    expected = expected_after(src_tensors, src_geometry, dst_tensors, dst_geometry, src_blocks, dst_blocks, **selection)
    assert not same_bytes(expected, dst_tensors) or selection.get("num_tokens") == 0
    nbytes = torch_kvreg.copy_kv_tokens(
        src, dst, src_blocks, dst_blocks, src_geometry=src_geometry, dst_geometry=dst_geometry, **selection
    )
    assert same_bytes(dst_tensors, expected)
    torch_kvreg.unregister_kv_cache(src)
    torch_kvreg.unregister_kv_cache(dst)
    return nbytes


def test_vllm_cpu_preset_is_where_vllms_cpu_kernel_writes():
    """vLLM's own CPU cache write (ops.cpu_attn_reshape_and_cache, the ``vec`` kernels) puts
    token t's K and V where the vllm_cpu preset says: K tiles dim-major, V tiles token-major."""
    ops = pytest.importorskip("vllm._custom_ops")
    n, b, heads, dim = 3, 32, 2, 32
    cache = torch.zeros(n, heads, b, 2 * dim)
    key_cache, value_cache = cache.view(n, heads, 2 * b, dim).chunk(2, dim=2)  # how vLLM hands it over
    tokens = 40
    key, value = torch.randn(tokens, heads, dim), torch.randn(tokens, heads, dim)
    slots = torch.tensor([2 * b + t for t in range(b)] + [b + t for t in range(tokens - b)])  # blocks 2, then 1
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, "vec")
    ((k, v),) = logical([cache], KVGeometry("vllm_cpu", b, heads, dim))
    assert torch.equal(k[2], key[:b]) and torch.equal(k[1, : tokens - b], key[b:])
    assert torch.equal(v[2], value[:b]) and torch.equal(v[1, : tokens - b], value[b:])


def test_vllm_flash_attn_preset_reads_as_vllms_flash_attention():
    """vLLM 0.32's FlashAttention reads (N, H, B, 2D) as K and V halves of the last dim
    (flash_attn.py: ``kv_cache.transpose(1, 2).split(head_size, dim=-1)``)."""
    n, b = 3, 4
    raw = torch.randn(n, H, b, 2 * D)
    ((k, v),) = logical([raw], geometry("vllm_flash_attn", b))
    fa_k, fa_v = raw.transpose(1, 2).split(D, dim=-1)
    assert torch.equal(k, fa_k) and torch.equal(v, fa_v)


@pytest.mark.parametrize(("src_bs", "dst_bs"), [(16, 32), (32, 16)])
def test_block_sizes(kv, src_bs, dst_bs):
    """Prefill blocks of 16 tokens into decode blocks of 32 and back: every token in its slot,
    from scattered blocks, with token offsets on both sides and a partial last block."""
    src_g, dst_g = geometry("flash_attn", src_bs), geometry("flash_attn", dst_bs)
    src_blocks, dst_blocks = [6, 1, 3, 4], [5, 0, 7, 2]
    num_tokens = 55 if src_bs == 16 else 45
    nbytes = run_case(
        src_g,
        dst_g,
        src_blocks[: (num_tokens + 3 + src_bs - 1) // src_bs],
        dst_blocks,
        num_tokens=num_tokens,
        src_offset=3,
        dst_offset=5,
    )
    assert nbytes == num_tokens * H * D * 4 * 2 * 2  # K and V of two layers
    run_case(src_g, dst_g, [2, 7], [6, 3, 1, 0])  # every slot of the source blocks


LAYOUT_PAIRS = [(a, b) for a, b in itertools.product(LAYOUTS, repeat=2) if a != b]


@pytest.mark.parametrize(("src_layout", "dst_layout"), LAYOUT_PAIRS, ids=lambda x: x)
def test_layouts(kv, src_layout, dst_layout):
    """Every preset into every other: NHD <-> HND, K/V split <-> interleaved, vLLM CPU <->
    FlashAttention, with block sizes that differ too."""
    run_case(geometry(src_layout, 16), geometry(dst_layout, 32), [3, 0, 5], [1, 6], num_tokens=40, src_offset=2)


def test_raw_orders_and_dtypes(kv):
    """Orders beyond the presets (head dim not innermost: element by element) and 2-byte dtypes."""
    run_case(geometry("dth", 8), geometry("kthd", 16), [1, 2], [3], dtype=torch.bfloat16)
    run_case(
        geometry("tkdh", 4),
        geometry("hdt", 4),
        [0, 1, 2],
        [5, 6, 7],
        dtype=torch.float16,
        src_offset=1,
        num_tokens=10,
        dst_offset=2,
    )


@pytest.mark.parametrize("layout", ["flash_attn", "flash_attn_hnd", "vllm_cpu"])
def test_tp1_prefill_to_tp2_decoders(kv, layout):
    """Each rank of a TP-2 decoder takes its half of the heads from a TP-1 prefill cache."""
    prefill = geometry("flash_attn", 16)
    for rank in range(2):
        decoder = geometry(layout, 32, tp_size=2, tp_rank=rank)
        run_case(prefill, decoder, [4, 2, 7], [1, 5], num_tokens=48, seed=rank)


def test_tp1_decoder_gathers_from_tp2_prefills(kv):
    """A TP-1 decoder gathers its heads from two TP-2 prefill ranks: after both copies every
    head of every token is the one its rank held."""
    decoder_g = geometry("vllm_cpu", 32)
    decoder_tensors = cache_tensors(decoder_g, 2, 4, seed=99)
    decoder = torch_kvreg.register_kv_cache(decoder_tensors)
    expected = decoder_tensors
    for rank in range(2):
        prefill_g = geometry("flash_attn_hnd", 16, tp_size=2, tp_rank=rank)
        prefill_tensors = cache_tensors(prefill_g, 2, 6, seed=rank)
        prefill = torch_kvreg.register_kv_cache(prefill_tensors)
        expected = expected_after(prefill_tensors, prefill_g, expected, decoder_g, [5, 0, 3], [2, 1], num_tokens=40)
        plan = torch_kvreg.plan_kv_tokens(
            prefill, decoder, [5, 0, 3], [2, 1], 40, src_geometry=prefill_g, dst_geometry=decoder_g
        )
        assert plan.heads == range(2 * rank, 2 * rank + 2)
        torch_kvreg.copy_kv_tokens(
            prefill, decoder, [5, 0, 3], [2, 1], 40, src_geometry=prefill_g, dst_geometry=decoder_g
        )
    assert same_bytes(decoder_tensors, expected)
    (k, _), _ = logical(decoder_tensors, decoder_g)
    assert not torch.equal(k[2, :, 0], k[2, :, 2])  # the heads came from two different caches


def test_layers_and_heads_subsets(kv):
    """Source layers 1..2 into destination layers 0..1, heads 1..2 only."""
    run_case(
        geometry("flash_attn", 16),
        geometry("flashinfer", 16),
        [2, 3],
        [0, 1],
        num_layers=3,
        layers=range(1, 3),
        dst_layers=range(0, 2),
        heads=range(1, 3),
    )


def test_plan_merges_runs(kv):
    """Runs contiguous on both sides become one segment: whole blocks for the same geometry,
    one per block for HND head slices, per token for NHD head slices."""
    desc = lambda g, n: torch_kvreg.CacheDesc(
        2 * 2 // g.tensors_per_layer, torch_kvreg.DataType.DT_FLOAT, (n, *g.block_shape), torch_kvreg.Placement.HOST
    )
    same = geometry("flash_attn", 16)
    plan = torch_kvreg.plan_kv_tokens(
        desc(same, 8), desc(same, 8), [0, 1, 2, 5], [3, 4, 5, 0], src_geometry=same, dst_geometry=same
    )
    block = 16 * H * D * 4
    assert plan.segments.tolist() == [[0, 3 * block, 3 * block], [5 * block, 0, block]]
    plan = torch_kvreg.plan_kv_tokens(
        desc(same, 8), desc(same, 8), [0, 1], [2, 0], src_geometry=same, dst_geometry=same
    )  # adjacent in the source only: two runs
    assert plan.segments.tolist() == [[0, 2 * block, block], [block, 0, block]]
    assert plan.lanes.tolist() == [[0, 0, 0, 0], [1, 0, 1, 0]]
    hnd, half = geometry("flash_attn_hnd", 16), geometry("flash_attn_hnd", 16, 2, 1)
    plan = torch_kvreg.plan_kv_tokens(desc(hnd, 4), desc(half, 4), [1, 3], [0, 2], src_geometry=hnd, dst_geometry=half)
    assert plan.segments.tolist() == [[block + block // 2, 0, block // 2], [3 * block + block // 2, block, block // 2]]
    nhd_half = geometry("flash_attn", 16, 2, 1)
    plan = torch_kvreg.plan_kv_tokens(
        desc(same, 4), desc(nhd_half, 4), [1], [0], src_geometry=same, dst_geometry=nhd_half
    )
    assert len(plan.segments) == 16 and plan.segments[:, 2].eq(2 * D * 4).all()
    interleaved = geometry("flashinfer", 16)
    plan = torch_kvreg.plan_kv_tokens(
        desc(same, 4), desc(interleaved, 4), [1], [2], src_geometry=same, dst_geometry=interleaved
    )
    assert plan.lanes.tolist() == [[0, 0, 0, 0], [1, 0, 0, block]]  # V: the second half of the block


def test_randomized(kv):
    """Random geometries and selections against the reference; counts what it reached."""
    rng = random.Random(7)
    reached = {"layout_change": 0, "block_change": 0, "tp_change": 0, "offsets": 0}
    for trial in range(60):
        heads = rng.choice([2, 4])
        src_tp, dst_tp = rng.choice([1, 2]), rng.choice([1, 2])
        src_rank, dst_rank = rng.randrange(src_tp), rng.randrange(dst_tp)
        if src_tp == dst_tp == 2 and src_rank != dst_rank:
            dst_rank = src_rank
        src_g = KVGeometry(rng.choice(list(LAYOUTS)), rng.choice([4, 8, 16]), heads, 4, src_tp, src_rank)
        dst_g = KVGeometry(rng.choice(list(LAYOUTS)), rng.choice([4, 8, 16]), heads, 4, dst_tp, dst_rank)
        src_n, dst_n = 6, 6
        src_blocks = rng.sample(range(src_n), rng.randint(1, 4))
        src_offset = rng.randrange(src_g.block_size)
        capacity = len(src_blocks) * src_g.block_size - src_offset
        num_tokens = rng.randint(0, capacity)
        dst_offset = rng.randrange(dst_g.block_size)
        need = -(-(dst_offset + num_tokens) // dst_g.block_size)
        if need > dst_n:
            continue
        dst_blocks = rng.sample(range(dst_n), max(need, 1))
        run_case(
            src_g,
            dst_g,
            src_blocks,
            dst_blocks,
            src_num_blocks=src_n,
            dst_num_blocks=dst_n,
            seed=trial,
            num_tokens=num_tokens,
            src_offset=src_offset,
            dst_offset=dst_offset,
        )
        reached["layout_change"] += src_g.order != dst_g.order
        reached["block_change"] += src_g.block_size != dst_g.block_size
        reached["tp_change"] += src_g.tp_size != dst_g.tp_size
        reached["offsets"] += bool(src_offset and dst_offset and num_tokens)
    assert min(reached.values()) >= 5, reached


# --- bad input -----------------------------------------------------------------------------
BAD = {
    "head_dim differs": dict(dst_geometry=KVGeometry("flash_attn", 32, H, 2 * D)),
    "heads differ": dict(dst_geometry=KVGeometry("flash_attn", 32, 2 * H, D)),
    "tp does not divide heads": dict(dst_geometry=KVGeometry("flash_attn", 32, H, D, tp_size=3)),
    "tp rank out of range": dict(dst_geometry=KVGeometry("flash_attn", 32, H, D, tp_size=2, tp_rank=2)),
    "unknown layout": dict(dst_geometry=KVGeometry("nhd", 32, H, D)),
    "repeated axis": dict(dst_geometry=KVGeometry("ttd", 32, H, D)),
    "zero block size": dict(dst_geometry=KVGeometry("flash_attn", 0, H, D)),
    "geometry does not fit the desc": dict(dst_geometry=KVGeometry("flash_attn", 16, H, D)),
    "tokens do not fit dst": dict(num_tokens=33, dst_blocks=[1]),
    "tokens do not fit src": dict(num_tokens=33, src_offset=0, src_blocks=[1, 2]),
    "offset pushes tokens out": dict(num_tokens=32, dst_offset=1, dst_blocks=[1]),
    "negative offset": dict(src_offset=-1),
    "negative num_tokens": dict(num_tokens=-2),
    "head out of range": dict(heads=range(3, 5)),
    "heads of a rank not held": dict(dst_geometry=KVGeometry("flash_attn", 32, H, D, 2, 1), heads=range(0, 2)),
    "no head in common": dict(
        src_geometry=KVGeometry("flash_attn", 16, H, D, 2, 0), dst_geometry=KVGeometry("flash_attn", 32, H, D, 2, 1)
    ),
    "layers out of range": dict(layers=range(1, 3)),
    "layers differ in length": dict(layers=range(0, 1), dst_layers=range(0, 2)),
    "repeated dst block": dict(dst_blocks=[1, 1]),
    "same cache": dict(same_cache=True),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_unmappable_geometries_move_nothing(kv, case):
    """Every geometry that cannot map is LLM_PARAM_INVALID (a ValueError) and the poisoned
    destination is unchanged."""
    src_g, dst_g = KVGeometry("flash_attn", 16, H, D), KVGeometry("flash_attn", 32, H, D)
    src_tensors = cache_tensors(src_g, 2, 4, seed=1)
    dst_tensors = [torch.full_like(t, float("nan")) for t in cache_tensors(dst_g, 2, 4, seed=2)]
    src, dst = torch_kvreg.register_kv_cache(src_tensors), torch_kvreg.register_kv_cache(dst_tensors)
    args = dict(src_blocks=[0, 3, 1, 2], dst_blocks=[1, 3], src_geometry=src_g, dst_geometry=dst_g)
    args.update(BAD[case])
    target = src if args.pop("same_cache", False) else dst
    before = [t.clone() for t in dst_tensors]
    with pytest.raises(LLMParamInvalidError) as info:
        torch_kvreg.copy_kv_tokens(src, target, **args)
    assert info.value.status_code == torch_kvreg.LLMStatusCode.LLM_PARAM_INVALID
    assert isinstance(info.value, ValueError)
    assert same_bytes(dst_tensors, before)


def test_dtype_mismatch_and_blocks_out_of_range(kv):
    g16, g32 = KVGeometry("flash_attn", 16, H, D), KVGeometry("flash_attn", 32, H, D)
    src = torch_kvreg.register_kv_cache(cache_tensors(g16, 1, 4))
    dst_half = torch_kvreg.register_kv_cache(cache_tensors(g32, 1, 2, dtype=torch.float16))
    dst_tensors = cache_tensors(g32, 1, 2)
    dst = torch_kvreg.register_kv_cache(dst_tensors)
    before = [t.clone() for t in dst_tensors]
    with pytest.raises(LLMParamInvalidError, match="data_type"):
        torch_kvreg.copy_kv_tokens(src, dst_half, [0, 1], [0], src_geometry=g16, dst_geometry=g32)
    with pytest.raises(torch_kvreg.LLMIndexError):
        torch_kvreg.copy_kv_tokens(src, dst, [0, 4], [0], src_geometry=g16, dst_geometry=g32)
    with pytest.raises(torch_kvreg.LLMIndexError):
        torch_kvreg.copy_kv_tokens(src, dst, [0, 1], [2], src_geometry=g16, dst_geometry=g32)
    with pytest.raises(torch_kvreg.LLMTypeError):
        torch_kvreg.copy_kv_tokens(src, dst, [0, 1], [0], src_geometry="flash_attn", dst_geometry=g32)
    with pytest.raises(torch_kvreg.LLMTypeError):
        KVGeometry("flash_attn", 16.0, H, D)
    assert same_bytes(dst_tensors, before)


def test_vllm_registered_layers(kv):
    """Caches registered the way the vLLM connector registers them: vLLM's CPU layer tensors
    (N, H, B, 2D) via register_layer_caches, into a FlashAttention (2, N, B, H, D) one."""
    n_layers, heads, dim = 2, 2, 32
    cpu_g, fa_g = KVGeometry("vllm_cpu", 32, heads, dim), KVGeometry("flash_attn", 16, heads, dim)
    cpu_layers = {f"model.layers.{i}.self_attn.attn": torch.randn(4, heads, 32, 2 * dim) for i in range(n_layers)}
    fa_layers = {f"model.layers.{i}.self_attn.attn": torch.zeros(2, 8, 16, heads, dim) for i in range(n_layers)}
    src = torch_kvreg.register_layer_caches(cpu_layers)
    dst = torch_kvreg.register_layer_caches(fa_layers)
    torch_kvreg.copy_kv_tokens(src, dst, [3], [6, 1], src_geometry=cpu_g, dst_geometry=fa_g)
    for name, layer in cpu_layers.items():
        k_cpu, v_cpu = layer.view(4, heads, 64, dim).chunk(2, dim=2)  # the K and V regions vLLM hands over
        k_tokens = k_cpu[3].reshape(heads, dim, 32).permute(2, 0, 1)  # K tiles are dim-major
        v_tokens = v_cpu[3].transpose(0, 1)
        for kv_index, expected in enumerate((k_tokens, v_tokens)):
            got = torch.cat([fa_layers[name][kv_index, 6], fa_layers[name][kv_index, 1]])  # (32, heads, dim)
            assert torch.equal(got, expected)


def test_tp_that_does_not_divide_the_heads_is_refused_even_when_the_desc_fits(kv):
    """4 heads over TP 3 would hold 1 head per rank by floor division: a desc sized for that
    must still be refused, by the geometry itself."""
    one_head = KVGeometry("flash_attn", 16, 1, D)
    desc = torch_kvreg.CacheDesc(
        2, torch_kvreg.DataType.DT_FLOAT, (4, *one_head.block_shape), torch_kvreg.Placement.HOST
    )
    src_g = KVGeometry("flash_attn", 16, H, D, tp_size=3, tp_rank=0)
    dst_g = KVGeometry("flash_attn", 16, H, D, tp_size=3, tp_rank=0)
    with pytest.raises(LLMParamInvalidError, match="does not divide"):
        torch_kvreg.plan_kv_tokens(desc, desc, [0], [1], src_geometry=src_g, dst_geometry=dst_g)
