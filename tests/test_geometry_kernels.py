"""The host kernels of copy_kv_tokens (csrc/geometry_copy.cpp): boxes of tokens x heads x
dims moved as rows, tiled transposes or single elements. Random shapes, every pair of axis
orders in both directions, every element size, byte for byte against the pure-torch
reference (tests/geometry_ref.py); counts which kernel each case reached."""

import itertools
import os
import random

import pytest
import torch
from geometry_ref import cache_tensors, expected_after, same_bytes

import torch_kvreg
from torch_kvreg import _C, KVGeometry

# Every order of the three axes, K and V in one block at every depth, and K laid out apart
# from V (vLLM's CPU layout and a made-up pair).
ORDERS = [
    *("".join(p) for p in itertools.permutations("thd")),
    "kthd",
    "khtd",
    "thkd",
    "htkd",
    "tkdh",
    "thdk",
    "hkdt/hktd",
    "dth/thd",
]
DTYPES = [torch.uint8, torch.float16, torch.float32, torch.float64]
ROWS, TRANSPOSES, ELEMENTS = range(3)


def paths():
    return _C.geometry_box_paths()


def copy_and_check(rng, src_order, dst_order, dtype, *, heads, head_dim, src_bs, dst_bs, tp, layers=1, blocks=4):
    """One random copy_kv_tokens between the two orders, checked byte for byte."""
    src_tp, dst_tp = tp
    src_rank, dst_rank = rng.randrange(src_tp), rng.randrange(dst_tp)
    if src_tp == dst_tp and src_rank != dst_rank:
        dst_rank = src_rank
    src_g = KVGeometry(src_order, src_bs, heads, head_dim, src_tp, src_rank)
    dst_g = KVGeometry(dst_order, dst_bs, heads, head_dim, dst_tp, dst_rank)
    src_blocks = rng.sample(range(blocks), rng.randint(1, blocks))
    src_offset = rng.randrange(src_bs)
    num_tokens = rng.randint(1, len(src_blocks) * src_bs - src_offset)
    dst_offset = rng.randrange(dst_bs)
    need = -(-(dst_offset + num_tokens) // dst_bs)
    dst_blocks = rng.sample(range(need + 2), need)
    src_tensors = cache_tensors(src_g, layers, blocks, dtype, rng.randrange(1 << 30))
    dst_tensors = cache_tensors(dst_g, layers, need + 2, dtype, rng.randrange(1 << 30))
    selection = dict(num_tokens=num_tokens, src_offset=src_offset, dst_offset=dst_offset)
    expected = expected_after(src_tensors, src_g, dst_tensors, dst_g, src_blocks, dst_blocks, **selection)
    src, dst = torch_kvreg.register_kv_cache(src_tensors), torch_kvreg.register_kv_cache(dst_tensors)
    try:
        torch_kvreg.copy_kv_tokens(
            src, dst, src_blocks, dst_blocks, src_geometry=src_g, dst_geometry=dst_g, **selection
        )
    finally:
        torch_kvreg.unregister_kv_cache(src)
        torch_kvreg.unregister_kv_cache(dst)
    assert same_bytes(dst_tensors, expected), (src_g, dst_g, dtype, selection, src_blocks, dst_blocks)


@pytest.mark.parametrize("strategy", ["stream", "memcpy"])
def test_every_order_pair_both_ways_random_shapes(kv, strategy):
    rng = random.Random(11 if strategy == "stream" else 12)
    torch_kvreg.set_copy_strategy(strategy)
    before = paths()
    reached = {"dtypes": set(), "tp_change": 0, "odd_dims": 0}
    try:
        for src_order, dst_order in itertools.combinations(ORDERS, 2):
            for a, b in ((src_order, dst_order), (dst_order, src_order)):
                dtype = rng.choice(DTYPES)
                heads = rng.choice([1, 2, 4])
                tp = rng.choice([(1, 1), (1, 2), (2, 1)]) if heads > 1 else (1, 1)
                head_dim = rng.choice([3, 8, 12, 16, 24])
                src_bs, dst_bs = rng.choice([1, 3, 8, 16]), rng.choice([1, 5, 8, 32])
                copy_and_check(rng, a, b, dtype, heads=heads, head_dim=head_dim, src_bs=src_bs, dst_bs=dst_bs, tp=tp)
                reached["dtypes"].add(dtype)
                reached["tp_change"] += tp != (1, 1)
                reached["odd_dims"] += head_dim % 8 != 0
    finally:
        torch_kvreg.set_copy_strategy("auto")
    counts = [after - first for after, first in zip(paths(), before)]
    assert len(reached["dtypes"]) == len(DTYPES) and reached["tp_change"] >= 20 and reached["odd_dims"] >= 20, reached
    assert min(counts) >= 50, counts  # rows, transposes and single elements all reached


@pytest.mark.parametrize("strategy", ["stream", "memcpy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("src_order", "dst_order"), [("thd", "hkdt/hktd"), ("hkdt/hktd", "htd"), ("thd", "tdh")])
def test_transposes_of_every_element_size_full_tiles_and_edges(kv, dtype, src_order, dst_order, strategy):
    """Head dims and token counts that fill the vector tiles (8x8 and 8x32 two-byte, 4x4
    four-byte) and leave edges, with streaming and with plain stores."""
    rng = random.Random(3)
    torch_kvreg.set_copy_strategy(strategy)
    before = paths()
    for head_dim, src_bs, dst_bs in ((16, 16, 32), (19, 8, 16), (8, 7, 9), (40, 32, 64), (72, 64, 33)):
        copy_and_check(
            rng, src_order, dst_order, dtype, heads=2, head_dim=head_dim, src_bs=src_bs, dst_bs=dst_bs, tp=(1, 1)
        )
    torch_kvreg.set_copy_strategy("auto")
    assert paths()[TRANSPOSES] > before[TRANSPOSES]


def test_large_copy_fans_out_and_matches_the_runs_path(kv, monkeypatch):
    """A copy big enough for the copy threads, against the reference and the former path."""
    assert torch.get_num_threads() >= 1
    rng = random.Random(5)
    for src_order, dst_order in (("thd", "htd"), ("htd", "hkdt/hktd"), ("hkdt/hktd", "thd"), ("thd", "kthd")):
        src_g = KVGeometry(src_order, 16, 8, 128)
        dst_g = KVGeometry(dst_order, 32, 8, 128)
        src_tensors = cache_tensors(src_g, 2, 64, torch.float16, 1)
        for path in ("boxes", "runs"):
            monkeypatch.setenv("TORCH_KVREG_GEOMETRY_COPY", path)
            dst_tensors = cache_tensors(dst_g, 2, 40, torch.float16, 2)
            src_blocks, dst_blocks = rng.sample(range(64), 48), rng.sample(range(40), 24)
            expected = expected_after(src_tensors, src_g, dst_tensors, dst_g, src_blocks, dst_blocks)
            src, dst = torch_kvreg.register_kv_cache(src_tensors), torch_kvreg.register_kv_cache(dst_tensors)
            before = paths()
            moved = torch_kvreg.copy_kv_tokens(src, dst, src_blocks, dst_blocks, src_geometry=src_g, dst_geometry=dst_g)
            boxes = sum(paths()) - sum(before)
            torch_kvreg.unregister_kv_cache(src)
            torch_kvreg.unregister_kv_cache(dst)
            assert moved == 48 * 16 * 8 * 128 * 2 * 2 * 2
            assert same_bytes(dst_tensors, expected), (src_order, dst_order, path)
            # Boxes: per lane (K and V of 2 layers) one per source block, or one per
            # destination block where tokens are gathered into it; the runs path none.
            assert (48 * 4 >= boxes >= 24 * 4) if path == "boxes" else boxes == 0, (path, boxes)
        assert os.environ["TORCH_KVREG_GEOMETRY_COPY"] == "runs"


@pytest.mark.parametrize("former", [False, True], ids=["current-kernels", "former-kernels"])
def test_k_and_v_apart_and_head_slices_with_either_kernels(kv, former):
    """Where K and V move as two jobs (either side lays them out apart), their boxes of the same
    tokens go side by side (current) or job by job (the former kernels, by the hook), with
    block sizes that cut the two jobs' chunks differently (gathered and per-block chunks);
    head slices of NHD rows (rows with gaps, copied prefetching the next row, or not): every
    byte lands either way."""
    rng = random.Random(21)
    pairs = [
        ("htkd", "hkdt/hktd"),
        ("hkdt/hktd", "htkd"),
        ("thd", "hkdt/hktd"),
        ("hkdt/hktd", "thd"),
        ("thkd", "htd"),
        ("dth/thd", "kthd"),
    ]
    _C._test_geometry_former_kernels(former)
    try:
        for src_order, dst_order in pairs:
            for src_bs, dst_bs in ((16, 32), (32, 16), (7, 5)):
                before = paths()
                copy_and_check(
                    rng,
                    src_order,
                    dst_order,
                    torch.float16,
                    heads=2,
                    head_dim=16,
                    src_bs=src_bs,
                    dst_bs=dst_bs,
                    tp=(1, 1),
                    layers=2,
                    blocks=6,
                )
                assert sum(paths()) - sum(before) >= 4, (src_order, dst_order)  # boxes of K and V, 2 layers
        for tp in ((1, 2), (2, 1), (1, 4)):
            for head_dim, block in ((128, 16), (24, 3), (8, 1)):
                before = paths()[ROWS]
                copy_and_check(
                    rng,
                    "thd",
                    "thd",
                    torch.float16,
                    heads=8,
                    head_dim=head_dim,
                    src_bs=block,
                    dst_bs=block,
                    tp=tp,
                    layers=2,
                    blocks=5,
                )
                assert paths()[ROWS] > before, (tp, head_dim)
    finally:
        _C._test_geometry_former_kernels(False)
