"""copy_kv_blocks / swap_blocks / copy_kv_cache against a plain-torch reference."""

import os
import random
import subprocess
import sys
import zlib

import pytest
import torch

import torch_kvreg
from torch_kvreg import DataType

from conftest import devices

ALL_DTYPES = [DataType(d).to_torch() for d in DataType if d != DataType.DT_UNDEFINED]
PLACEMENTS = [(s, d) for s in devices() for d in devices()]


@pytest.fixture(name="kv")
def initialized_kv():
    # Two 240-tensor caches at once: raise the cumulative address cap.
    torch_kvreg.initialize(limits=torch_kvreg.Limits(1024, 50 * 2**30, 20 * 2**30))
    return torch_kvreg


def filled(shape, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (int(torch.Size(shape).numel()) * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        raw = raw % 2  # only 0 and 1 are bools; torch's own copies normalise other bytes
    return raw.view(dtype).reshape(shape).to(device)


def make_cache(num_tensors, shape, dtype, device, seed):
    tensors = [filled(shape, dtype, device, seed + i) for i in range(num_tensors)]
    return tensors, torch_kvreg.register_kv_cache(tensors)


def reference(src_tensors, dst_tensors, src_blocks, dst_blocks):
    expected = [t.clone() for t in dst_tensors]
    for s, d in zip(src_blocks, dst_blocks):
        for i, src in enumerate(src_tensors):
            expected[i][d] = src[s].to(expected[i].device)
    return expected


def same_bytes(a, b):
    return torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype(kv, dtype):
    src_tensors, src = make_cache(2, (6, 3, 4), dtype, "cpu", 1)
    dst_tensors, dst = make_cache(2, (5, 3, 4), dtype, "cpu", 100)
    expected = reference(src_tensors, dst_tensors, [5, 0, 2], [1, 4, 0])
    kv.copy_kv_blocks(src, dst, [5, 0, 2], [1, 4, 0])
    assert all(same_bytes(a, b) for a, b in zip(dst_tensors, expected))


@pytest.mark.parametrize("src_device,dst_device", PLACEMENTS)
@pytest.mark.parametrize("count", ["zero", "one", "many", "all", "consecutive"])
@pytest.mark.parametrize("num_tensors,shape", [(1, (16, 8)), (4, (16, 4, 2, 3)), (240, (16, 2))])
@pytest.mark.parametrize("form", ["list", "cpu_tensor", "device_tensor", "int32"])
def test_matches_reference(kv, src_device, dst_device, count, num_tensors, shape, form):
    rng = random.Random(zlib.crc32(f"{count}-{num_tensors}-{form}".encode()))  # the same in every process
    num_blocks = shape[0]
    src_tensors, src = make_cache(num_tensors, shape, torch.float16, src_device, 7)
    dst_tensors, dst = make_cache(num_tensors, shape, torch.float16, dst_device, 70)
    n = {"zero": 0, "one": 1, "many": 5, "all": num_blocks, "consecutive": 6}[count]
    if count == "consecutive":
        src_blocks, dst_blocks = list(range(3, 3 + n)), list(range(8, 8 + n))
    else:
        src_blocks = [rng.randrange(num_blocks) for _ in range(n)]  # reads may repeat
        dst_blocks = rng.sample(range(num_blocks), n)
    expected = reference(src_tensors, dst_tensors, src_blocks, dst_blocks)
    if form == "list":
        args = (src_blocks, dst_blocks)
    else:
        dtype = torch.int32 if form == "int32" else torch.int64
        device = dst_device if form == "device_tensor" else "cpu"
        args = tuple(torch.tensor(b, dtype=dtype, device=device) for b in (src_blocks, dst_blocks))
    kv.copy_kv_blocks(src, dst, *args)
    if "cuda" in (src_device, dst_device):
        torch.cuda.synchronize()
    assert all(same_bytes(a, b) for a, b in zip(dst_tensors, expected))
    assert all(
        same_bytes(a, b)
        for a, b in zip(src_tensors, [filled(shape, torch.float16, "cpu", 7 + i) for i in range(num_tensors)])
    )


def test_same_cache_disjoint_blocks(kv):
    tensors, cache = make_cache(2, (8, 4), torch.float32, "cpu", 3)
    expected = reference(tensors, tensors, [0, 1, 2], [5, 6, 7])
    kv.copy_kv_blocks(cache, cache, [0, 1, 2], [5, 6, 7])
    assert all(same_bytes(a, b) for a, b in zip(tensors, expected))


def test_swap_blocks(kv):
    src_tensors, src = make_cache(2, (8, 4), torch.bfloat16, "cpu", 5)
    dst_tensors, dst = make_cache(2, (8, 4), torch.bfloat16, "cpu", 50)
    mapping = {7: 0, 2: 3, 3: 4}
    expected = reference(src_tensors, dst_tensors, list(mapping), list(mapping.values()))
    kv.swap_blocks(src, dst, mapping)
    assert all(same_bytes(a, b) for a, b in zip(dst_tensors, expected))


@pytest.mark.parametrize("src_device,dst_device", PLACEMENTS)
def test_copy_kv_cache_bytes(kv, src_device, dst_device):
    src_tensors, src = make_cache(3, (4, 8, 2), torch.float32, src_device, 9)  # 64-byte slices
    dst_tensors, dst = make_cache(3, (4, 8, 2), torch.float32, dst_device, 90)
    expected = [t.clone().cpu() for t in dst_tensors]
    for s, e in zip(src_tensors, expected):
        e.view(4, -1).view(torch.uint8)[2, 16:40] = s.cpu().view(4, -1).view(torch.uint8)[1, 16:40]
    kv.copy_kv_cache(src, dst, src_batch_index=1, dst_batch_index=2, offset=16, size=24)
    assert all(same_bytes(a, b) for a, b in zip(dst_tensors, expected))
    kv.copy_kv_cache(src, dst, 3, 0)  # size=-1: the whole slice
    assert all(same_bytes(d[0], s[3]) for d, s in zip(dst_tensors, src_tensors))


def test_long_consecutive_run_is_split_and_correct(kv):
    # 3 MiB per tensor in one run: split into several segments, copied by several threads.
    src_tensors, src = make_cache(2, (768, 1024), torch.float32, "cpu", 11)
    dst_tensors, dst = make_cache(2, (768, 1024), torch.float32, "cpu", 110)
    kv.copy_kv_blocks(src, dst, list(range(768)), list(range(768)))
    assert all(same_bytes(a, b) for a, b in zip(src_tensors, dst_tensors))


def test_device_cache_on_cpu_only_build_is_feature_not_enabled(kv):
    if kv._C.with_cuda:
        pytest.skip("this build has CUDA")
    host = torch.zeros(4, 4)
    host_cache = kv.register_kv_cache(host)
    device_cache = kv.register_kv_cache(kv.CacheDesc(1, DataType.DT_FLOAT, (4, 4), kv.Placement.DEVICE), [1 << 40])
    with pytest.raises(kv.LLMException) as info:
        kv.copy_kv_blocks(host_cache, device_cache, [0], [0])
    assert info.value.status_code == kv.LLMStatusCode.LLM_FEATURE_NOT_ENABLED


@pytest.mark.cuda
def test_cuda_copy_is_ordered_on_current_stream(kv):
    src_tensors, src = make_cache(2, (64, 256), torch.float16, "cuda", 1)
    dst_tensors, dst = make_cache(2, (64, 256), torch.float16, "cuda", 2)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        kv.copy_kv_blocks(src, dst, list(range(64)), list(reversed(range(64))))
        flipped = dst_tensors[0].flip(0).clone()  # same stream: sees the copy
    stream.synchronize()
    assert same_bytes(flipped, src_tensors[0])  # random bytes hold NaNs: compare bytes


@pytest.mark.parametrize("block_bytes", [1024, 2048, 32768, 1040])
@pytest.mark.parametrize("count", [1, 3, 4, 7, 13])
def test_large_scattered_blocks(kv, block_bytes, count):
    """Blocks big enough for the streaming and four-way interleaved copies, in groups of four
    and leftovers; 1040-byte blocks are not 64-byte aligned and take the plain path."""
    rng = random.Random(block_bytes * 100 + count)
    shape = (32, block_bytes // 4)
    src_tensors, src = make_cache(3, shape, torch.float32, "cpu", 21)
    dst_tensors, dst = make_cache(3, shape, torch.float32, "cpu", 22)
    src_blocks, dst_blocks = rng.sample(range(32), count), rng.sample(range(32), count)
    expected = reference(src_tensors, dst_tensors, src_blocks, dst_blocks)
    kv.copy_kv_blocks(src, dst, src_blocks, dst_blocks)
    assert all(same_bytes(a, b) for a, b in zip(dst_tensors, expected))


@pytest.mark.cuda
@pytest.mark.parametrize("src_device,dst_device", [("cuda", "cuda"), ("cpu", "cuda"), ("cuda", "cpu")])
def test_copy_captured_in_cuda_graph_replays(kv, src_device, dst_device):
    src_tensors, src = make_cache(2, (32, 512), torch.float16, src_device, 31)
    dst_tensors, dst = make_cache(2, (32, 512), torch.float16, dst_device, 32)
    src_blocks, dst_blocks = torch.tensor([4, 9, 10, 11]), torch.tensor([0, 30, 31, 2])
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph, stream=stream):
        kv.copy_kv_blocks(src, dst, src_blocks, dst_blocks)
    for _round in range(2):
        for t in src_tensors:
            t.copy_(torch.randn_like(t, device="cpu").to(t.device))  # new data after capture
        torch.cuda.synchronize()
        graph.replay()
        torch.cuda.synchronize()
        for s, d in zip(src_tensors, dst_tensors):
            assert same_bytes(d[dst_blocks], s[src_blocks])


@pytest.mark.cuda
def test_device_block_lists_rejected_during_capture(kv):
    _, src = make_cache(1, (8, 64), torch.float16, "cuda", 41)
    _, dst = make_cache(1, (8, 64), torch.float16, "cuda", 42)
    blocks = torch.tensor([1, 2], device="cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(kv.LLMParamInvalidError, match="captured"):
        with torch.cuda.graph(graph):
            kv.copy_kv_blocks(src, dst, blocks, blocks + 3)


def test_host_copies_run_on_torch_threads(kv):
    """at::parallel_for is inlined into the extension: built without OpenMP where torch uses
    it, every host copy would run on one thread."""
    assert kv._C.with_openmp == torch.backends.openmp.is_available()


FORKED_CHILD_COPY = """
import os, numpy as np, torch, torch_kvreg as kv
kv.initialize()
s = [torch.randn(256, 4096) for _ in range(4)]
d = [torch.zeros(256, 4096) for _ in range(4)]
a, b = kv.register_kv_cache(s), kv.register_kv_cache(d)
kv.copy_kv_blocks(a, b, list(range(0, 256, 2)), list(range(128)))  # parent runs threads
expected = s[0].numpy()[1::2].copy()
pid = os.fork()
if pid == 0:  # only the op and numpy here: torch's own threaded ops hang after fork
    kv.copy_kv_blocks(a, b, list(range(1, 256, 2)), list(range(128)))
    os._exit(0 if np.array_equal(d[0].numpy()[:128], expected) else 3)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_copy_in_child_forked_after_threaded_copy():
    """OpenMP cannot start threads in a child forked after the parent used them (it hangs);
    a forked child copies on its own thread and gets the right bytes."""
    done = subprocess.run([sys.executable, "-c", FORKED_CHILD_COPY], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["child", "0"]


def test_checks_on_huge_caches_use_memory_of_the_list_not_the_cache():
    """Raw-address caches (and descs from remote peers) can claim 2**40 blocks: checking
    the block lists must not allocate per block of the cache. Nothing is copied here."""
    torch_kvreg.initialize(limits=torch_kvreg.Limits(240, 0, 1 << 42))
    desc = torch_kvreg.CacheDesc(1, DataType.DT_INT8, (1 << 40, 1), torch_kvreg.Placement.HOST)
    no_pin = torch_kvreg.RegisterCfg(pin_host_memory=False)
    first = torch_kvreg.register_kv_cache(desc, [1 << 44], no_pin)
    second = torch_kvreg.register_kv_cache(desc, [(1 << 44) + (1 << 41)], no_pin)
    before = torch_kvreg.usage(), torch_kvreg.registered_caches()
    with pytest.raises(torch_kvreg.LLMParamInvalidError, match="names block 5 more than once"):
        torch_kvreg.copy_kv_blocks(first, second, [0, 1], [5, 5])
    with pytest.raises(torch_kvreg.LLMParamInvalidError, match="both read and written"):
        torch_kvreg.copy_kv_blocks(first, first, [7, 3], [9, 7])
    with pytest.raises(torch_kvreg.LLMIndexError):
        torch_kvreg.copy_kv_blocks(first, second, [1 << 40], [0])
    assert (torch_kvreg.usage(), torch_kvreg.registered_caches()) == before
    # The planner alone (what the remote path calls) passes valid lists over such a cache.
    fields = (1, int(DataType.DT_INT8), [1 << 40, 1], int(torch_kvreg.Placement.HOST), -1)
    rows = torch_kvreg._C.plan_blocks(
        fields, 1, fields, 2, torch.tensor([3, 1, 2]), torch.tensor([10, 11, 12]), 1 << 20
    )
    assert rows.tolist() == [[1, 11, 2], [3, 10, 1]]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_layers_copy_only_their_tensors(kv, asynchronous):
    """layers=range(a, b): the same layers of both caches, tensors i*tpl .. (i+1)*tpl-1."""
    src = [torch.full((6, 4), float(t + 1)) for t in range(6)]  # 3 layers x (K, V)
    dst = [torch.zeros(6, 4) for _ in range(6)]
    a, b = kv.register_kv_cache(src), kv.register_kv_cache(dst)
    if asynchronous:
        assert kv.copy_kv_blocks_async(a, b, [1, 2], [4, 0], layers=range(1, 3)).wait(5000) == 2 * 4 * 4 * 4
    else:
        kv.copy_kv_blocks(a, b, [1, 2], [4, 0], layers=range(1, 3))
    for t in range(6):
        copied = t >= 2
        assert torch.all(dst[t][[4, 0]] == (t + 1 if copied else 0)), t
        assert not dst[t][1:4].any() and not dst[t][5].any()
    kv.copy_kv_blocks(a, b, [5], [5], layers=range(0, 6), tensors_per_layer=1)  # one tensor per layer
    assert all(torch.all(dst[t][5] == t + 1) for t in range(6))
    before = (kv.usage(), kv.registered_caches(), [d.clone() for d in dst])
    for call in (
        lambda: kv.copy_kv_blocks(a, b, [0], [0], layers=range(0, 4)),
        lambda: kv.copy_kv_blocks(a, b, [0], [0], layers=range(0, 2, 2)),
        lambda: kv.copy_kv_blocks(a, b, [0], [0], layers=range(0, 1), tensors_per_layer=0),
        lambda: kv.copy_kv_blocks_async(a, b, [0], [9], layers=range(0, 1)),
        lambda: kv.copy_kv_blocks_async(a, b, [0], [0], layers=(0, 1)),
    ):
        with pytest.raises(kv.LLMException) as info:
            call()
        assert info.value.status_code == kv.LLMStatusCode.LLM_PARAM_INVALID
    assert (kv.usage(), kv.registered_caches()) == before[:2]
    assert all(torch.equal(x, y) for x, y in zip(dst, before[2]))


# --- copy strategies -------------------------------------------------------------------------
@pytest.fixture
def strategy_restored():
    before = torch_kvreg.copy_strategy()
    yield
    torch_kvreg.set_copy_strategy(before)


@pytest.mark.parametrize(
    "strategy", ["memcpy", "stream", "stream_noprefetch", "memcpy:single", "stream:single", "stream_noprefetch:single"]
)
@pytest.mark.parametrize("block_shape", [(16, 8, 128), (16, 1, 64), (3, 7, 5), (64,)])
def test_every_copy_strategy_moves_the_right_bytes(strategy, block_shape, strategy_restored):
    """32 KiB, 2 KiB, 210-byte (odd, unaligned tails) and 256-byte blocks, random and
    consecutive, across tensors: each strategy writes exactly the destination blocks."""
    torch_kvreg.set_copy_strategy(strategy)
    assert torch_kvreg.copy_strategy() == strategy
    torch_kvreg.initialize()
    try:
        gen = torch.Generator().manual_seed(len(block_shape))
        src = [torch.randn(64, *block_shape, generator=gen).half() for _ in range(6)]
        dst = [torch.randn(64, *block_shape, generator=gen).half() for _ in range(6)]
        before = [t.clone() for t in dst]
        a, b = torch_kvreg.register_kv_cache(src), torch_kvreg.register_kv_cache(dst)
        order = torch.randperm(64, generator=gen)
        for src_blocks, dst_blocks in (
            (order[:24].tolist(), order[24:48].tolist()),
            (list(range(8, 40)), list(range(30, 62))),
        ):
            torch_kvreg.copy_kv_blocks(a, b, src_blocks, dst_blocks)
            untouched = sorted(set(range(64)) - set(dst_blocks))
            for s, d, old in zip(src, dst, before):
                assert torch.equal(d[dst_blocks].view(torch.int16), s[src_blocks].view(torch.int16))
                assert torch.equal(d[untouched].view(torch.int16), old[untouched].view(torch.int16))
                old.copy_(d)
    finally:
        torch_kvreg.finalize()


def test_auto_measures_on_the_first_large_copy_and_keeps_the_bytes(strategy_restored):
    torch_kvreg.set_copy_strategy("auto")
    assert torch_kvreg.copy_strategy() == "auto"
    torch_kvreg.initialize(limits=torch_kvreg.Limits(240, 2**40, 2**40))
    try:
        src = [torch.randn(512, 16, 8, 128).half() for _ in range(8)]  # 8 x 16 MiB
        dst = [torch.zeros_like(t) for t in src]
        a, b = torch_kvreg.register_kv_cache(src), torch_kvreg.register_kv_cache(dst)
        small = list(range(4))
        torch_kvreg.copy_kv_blocks(a, b, small, small)  # 1 MiB: too small to measure
        assert torch_kvreg.copy_strategy() == "auto"
        order = torch.randperm(512).tolist()
        torch_kvreg.copy_kv_blocks(a, b, order[:300], order[200:500])  # 75 MiB, measured on its own items
        assert torch_kvreg.copy_strategy() in [
            name + threads for name in ("memcpy", "stream", "stream_noprefetch") for threads in ("", ":single")
        ]
        for s, d in zip(src, dst):  # the measured chunks moved their blocks too
            assert torch.equal(d[order[200:500]].view(torch.int16), s[order[:300]].view(torch.int16))
    finally:
        torch_kvreg.finalize()


def test_bad_strategies_are_refused_and_change_nothing(strategy_restored):
    torch_kvreg.set_copy_strategy("memcpy")
    for name, error in (
        ("fast", torch_kvreg.LLMParamInvalidError),
        ("", torch_kvreg.LLMParamInvalidError),
        ("auto:single", torch_kvreg.LLMParamInvalidError),
        ("memcpy:double", torch_kvreg.LLMParamInvalidError),
        (3, torch_kvreg.LLMTypeError),
    ):
        with pytest.raises(error):
            torch_kvreg.set_copy_strategy(name)
        assert torch_kvreg.copy_strategy() == "memcpy"


ENV_PROBE = """
import torch, torch_kvreg as kv
kv.initialize(limits=kv.Limits(240, 2**40, 2**40))
src = [torch.randn(512, 16, 8, 128).half() for _ in range(8)]
dst = [torch.zeros_like(t) for t in src]
a, b = kv.register_kv_cache(src), kv.register_kv_cache(dst)
try:
    kv.copy_kv_blocks(a, b, list(range(400)), list(range(400)))
    print(kv.copy_strategy(), all(torch.equal(d[:400], s[:400]) for s, d in zip(src, dst)))
except kv.LLMException as exc:
    print(exc.status_code.name, exc)
"""


@pytest.mark.parametrize("value", ["memcpy", "stream_noprefetch:single", "bogus"])
def test_the_environment_sets_the_strategy(value):
    result = subprocess.run(
        [sys.executable, "-c", ENV_PROBE],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TORCH_KVREG_COPY": value},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    if value == "bogus":
        assert result.stdout.startswith("LLM_PARAM_INVALID") and "TORCH_KVREG_COPY" in result.stdout
    else:
        assert result.stdout.split() == [value, "True"]  # kept, not measured over
