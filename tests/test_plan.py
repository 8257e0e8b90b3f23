"""The block-transfer planner (shared by local copies and the remote path) against a
pure-Python reference: which lists are refused, and that the segments move exactly the
requested blocks, sorted by source, coalesced, never longer than the cap."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_kvreg as kv
from torch_kvreg import DataType, Placement
from torch_kvreg.remote import plan

BLOCK_NBYTES = 8  # (num_blocks, 4) int16


def fields(num_blocks):
    return (2, int(DataType.DT_INT16), [num_blocks, 4], int(Placement.HOST), -1)


def reference_error(src_blocks, dst_blocks, src_n, dst_n):
    if len(src_blocks) != len(dst_blocks):
        return kv.LLMParamInvalidError
    if any(not 0 <= b < src_n for b in src_blocks) or any(not 0 <= b < dst_n for b in dst_blocks):
        return kv.LLMIndexError
    if len(set(dst_blocks)) != len(dst_blocks):
        return kv.LLMParamInvalidError
    return None


lists = st.lists(st.integers(-2, 40), max_size=24)


@st.composite
def run_lists(draw):
    """Pairs made of runs of consecutive blocks on both sides, in shuffled order: what
    coalescing and its cap must handle."""
    src_blocks, dst_blocks = [], []
    for _ in range(draw(st.integers(0, 4))):
        src_start, dst_start, length = draw(st.integers(0, 30)), draw(st.integers(0, 30)), draw(st.integers(1, 9))
        src_blocks += range(src_start, src_start + length)
        dst_blocks += range(dst_start, dst_start + length)
    order = draw(st.permutations(range(len(src_blocks))))
    return [src_blocks[i] for i in order], [dst_blocks[i] for i in order]


@settings(max_examples=400, deadline=None)
@given(
    pairs=st.one_of(st.tuples(lists, lists), run_lists()),
    src_n=st.integers(1, 40),
    dst_n=st.integers(1, 40),
    max_run=st.integers(1, 6),
    huge=st.booleans(),
)
def test_planner_matches_reference(pairs, src_n, dst_n, max_run, huge):
    src_blocks, dst_blocks = pairs
    # huge: the caches claim 2**40 extra blocks, so the checks take the sorted-list path.
    extra = (1 << 40) if huge else 0
    expected_error = reference_error(src_blocks, dst_blocks, src_n + extra, dst_n + extra)
    call = lambda: kv._C.plan_blocks(  # noqa: E731
        fields(src_n + extra),
        1,
        fields(dst_n + extra),
        2,
        torch.tensor(src_blocks, dtype=torch.int64),
        torch.tensor(dst_blocks, dtype=torch.int64),
        max_run * BLOCK_NBYTES,
    )
    if expected_error is not None:
        with pytest.raises(expected_error):
            kv.errors.raises_llm(call)()
        return
    rows = call().tolist()
    moved = {}
    for src_offset, dst_offset, nbytes in rows:
        assert nbytes % BLOCK_NBYTES == 0 and 0 < nbytes <= max_run * BLOCK_NBYTES
        for k in range(nbytes // BLOCK_NBYTES):
            dst = dst_offset // BLOCK_NBYTES + k
            assert dst not in moved
            moved[dst] = src_offset // BLOCK_NBYTES + k
    assert moved == dict(zip(dst_blocks, src_blocks))
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)  # sources walked in order
    # Coalesced: no two neighbouring segments could have been one.
    for (s0, d0, n0), (s1, d1, _) in zip(rows, rows[1:]):
        assert not (s1 == s0 + n0 and d1 == d0 + n0 and n0 < max_run * BLOCK_NBYTES)


def test_planner_rejects_incompatible_descs():
    other = (2, int(DataType.DT_INT16), [8, 5], int(Placement.HOST), -1)
    with pytest.raises(kv.LLMParamInvalidError, match="differ in shape"):
        kv.errors.raises_llm(kv._C.plan_blocks)(fields(8), 1, other, 2, torch.tensor([0]), torch.tensor([0]), 64)
    with pytest.raises(kv.LLMParamInvalidError, match="outside|does not fit"):
        kv.errors.raises_llm(kv._C.plan_slice)(fields(8), 1, fields(8), 2, 0, 1, 0, BLOCK_NBYTES + 1)
    assert kv._C.plan_slice(fields(8), 1, fields(8), 2, 3, 5, 0, -1).tolist() == [[24, 40, 8]]


def test_descriptor_rows_list_every_segment_of_every_tensor_in_order():
    addrs = [1 << 40, (1 << 40) + (1 << 20), (1 << 41)]
    offsets = np.array([0, 4096, 65536], dtype=np.uint64)
    lengths = np.array([4096, 8192, 512], dtype=np.uint64)
    rows = plan.descriptors(addrs, 3, offsets, lengths)
    expected = [[a + int(o), int(n), 3] for a in addrs for o, n in zip(offsets, lengths)]
    assert rows.dtype == np.uint64 and rows.tolist() == expected
    single = plan.descriptors(addrs, 0, offsets[1:2], lengths[1:2])
    assert single.tolist() == [[a + 4096, 8192, 0] for a in addrs]
