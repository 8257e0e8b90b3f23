"""pull_kv_tokens / push_kv_tokens between processes whose caches differ in geometry: same-host
copies and NIXL, byte for byte against the pure-torch reference."""

import errno
import time

import pytest
import torch
from geometry_ref import expected_after, same_bytes

import torch_kvreg as kv
from torch_kvreg import CacheIndex, KVGeometry

from remote_peer import Peer, paged

pytestmark = pytest.mark.skipif(not kv.remote.nixl_available(), reason="needs the nixl extra")
H, D, LAYERS = 4, 16, 2


@pytest.fixture(scope="module")
def peers():
    started = [Peer(cluster_id=11, wait=False), Peer(cluster_id=12, wait=False)]
    for peer in started:
        peer.ready()
    yield started
    for peer in started:
        peer.close()


@pytest.fixture
def decoder():
    kv.initialize(cluster_id=3, options={"llm.SyncKvCacheWaitTime": "3000"})
    yield kv
    kv.finalize()


def peer_cache(peer, geometry, num_blocks, seed, op="register"):
    """A remote-accessible cache of ``geometry`` on ``peer`` and the same tensors here
    (``op`` "allocate": in shared memory, which a same-host transfer maps here)."""
    count = LAYERS * geometry.tensors_per_layer
    cache_id = peer.call(op, (count, num_blocks, geometry.block_shape, seed, True))
    return cache_id, paged(count, num_blocks, geometry.block_shape, seed)


def local_cache(geometry, num_blocks, seed):
    tensors = paged(LAYERS * geometry.tensors_per_layer, num_blocks, geometry.block_shape, seed)
    return tensors, kv.register_kv_cache(tensors)


def path_counts():
    return dict(kv.remote.current_engine().paths)


def pull_and_check(peer, src_g, dst_g, src_blocks, dst_blocks, op="register", **selection):
    remote_id, remote_tensors = peer_cache(peer, src_g, 8, seed=5, op=op)
    mine, local = local_cache(dst_g, 8, seed=6)
    expected = expected_after(remote_tensors, src_g, mine, dst_g, src_blocks, dst_blocks, **selection)
    assert not same_bytes(expected, mine)
    moved = kv.pull_kv_tokens(
        CacheIndex(peer.cluster_id, remote_id),
        local,
        src_blocks,
        dst_blocks,
        src_geometry=src_g,
        dst_geometry=dst_g,
        **selection,
    )
    assert same_bytes(mine, expected)
    peer.call("unregister", remote_id)
    kv.unregister_kv_cache(local)
    return moved


def push_and_check(peer, src_g, dst_g, src_blocks, dst_blocks, op="register", **selection):
    count = LAYERS * dst_g.tensors_per_layer
    if op == "allocate":
        remote_id, theirs = peer_cache(peer, dst_g, 8, seed=8, op=op)
    else:
        remote_id = peer.call("register_zeros", (count, 8, dst_g.block_shape))
        theirs = [torch.zeros(8, *dst_g.block_shape, dtype=torch.float16) for _ in range(count)]
    mine, local = local_cache(src_g, 8, seed=7)
    expected = expected_after(mine, src_g, theirs, dst_g, src_blocks, dst_blocks, **selection)
    kv.push_kv_tokens(
        local,
        CacheIndex(peer.cluster_id, remote_id),
        src_blocks,
        dst_blocks,
        src_geometry=src_g,
        dst_geometry=dst_g,
        **selection,
    )
    assert same_bytes(peer.call("read", remote_id), expected)
    peer.call("unregister", remote_id)
    kv.unregister_kv_cache(local)


CASES = {
    "block 16 -> 32": (KVGeometry("flash_attn", 16, H, D), KVGeometry("flash_attn", 32, H, D)),
    "block 32 -> 16": (KVGeometry("flash_attn", 32, H, D), KVGeometry("flash_attn", 16, H, D)),
    "NHD -> HND": (KVGeometry("flash_attn", 16, H, D), KVGeometry("flash_attn_hnd", 16, H, D)),
    "split -> interleaved": (KVGeometry("flash_attn_hnd", 16, H, D), KVGeometry("flashinfer", 32, H, D)),
    "vllm flash attn -> flashinfer HND": (
        KVGeometry("vllm_flash_attn", 32, H, D),
        KVGeometry("flashinfer_hnd", 16, H, D),
    ),
    "TP1 -> TP2 rank 1": (KVGeometry("flash_attn", 16, H, D), KVGeometry("vllm_flash_attn_nhd", 32, H, D, 2, 1)),
    # K and V laid out differently (vLLM's CPU layout: K tiles dim-major): each lane its own runs
    "vllm_cpu -> flash_attn NHD": (KVGeometry("vllm_cpu", 16, H, D), KVGeometry("flash_attn", 32, H, D)),
    "HND -> vllm_cpu TP2 rank 0": (KVGeometry("flash_attn_hnd", 16, H, D), KVGeometry("vllm_cpu", 32, H, D, 2, 0)),
    "vllm_cpu 32 -> vllm_cpu 16": (KVGeometry("vllm_cpu", 32, H, D), KVGeometry("vllm_cpu", 16, H, D)),
}


def run_both_directions(peer, through, op="register"):
    before = path_counts()
    for src_g, dst_g in CASES.values():
        moved = pull_and_check(
            peer, src_g, dst_g, [6, 1, 3], [2, 7, 4, 0], op, num_tokens=40, src_offset=3, dst_offset=1
        )
        heads = len(range(max(src_g.heads.start, dst_g.heads.start), min(src_g.heads.stop, dst_g.heads.stop)))
        assert moved == 40 * heads * D * 2 * 2 * LAYERS
        push_and_check(peer, src_g, dst_g, [0, 5], [3, 6, 1], op, num_tokens=30, dst_offset=2)
    after = path_counts()
    assert after.get(through, 0) - before.get(through, 0) == 2 * len(CASES), (before, after)


def test_same_host_pull_and_push(peers, decoder):
    assert kv.link_clusters([peers[0].info])[0] == kv.LLMStatusCode.LLM_SUCCESS
    run_both_directions(peers[0], "same_host")


@pytest.mark.parametrize("copy", ["boxes", "runs"])
def test_mapped_pull_and_push(copy, peers, decoder, monkeypatch):
    """A peer's cache in shared memory is mapped here: transfers between geometries run the
    box kernels of copy_kv_tokens on it (TORCH_KVREG_GEOMETRY_COPY=runs: the plan's runs),
    byte for byte either way, every layout pair both ways."""
    if copy == "runs":
        monkeypatch.setenv("TORCH_KVREG_GEOMETRY_COPY", "runs")
    assert kv.link_clusters([peers[0].info])[0] == kv.LLMStatusCode.LLM_SUCCESS
    boxes_before = sum(kv._C.geometry_box_paths())
    run_both_directions(peers[0], "mapped", "allocate")
    boxes = sum(kv._C.geometry_box_paths()) - boxes_before
    if copy == "runs":
        assert boxes == 0
    else:
        # at least one box per chunk of tokens, per case and direction
        assert boxes >= 2 * len(CASES), boxes


def test_mapped_geometry_copy_refuses_a_tensor_outside_the_region(decoder):
    """The native start checks every peer tensor lies whole inside the mapped region before
    anything is planned or copied (a tensor starting 64 bytes before its end is refused)."""
    g = KVGeometry("flash_attn", 16, H, D)
    cache, tensors = kv.allocate_kv_cache(2, (4, *g.block_shape), torch.float16)
    region = kv._C.shared_region_find(tensors[0].data_ptr(), 1)
    assert region is not None
    mine, local = local_cache(g, 4, seed=3)
    desc = kv.geometry.fields(cache.cache_desc)
    selection = kv.geometry.selection(-1, 0, 0, range(1), None, None)
    blocks = torch.tensor([0]), torch.tensor([1])
    addrs = [t.data_ptr() for t in tensors]
    local_desc = kv.geometry.fields(local.cache_desc)
    local_addrs = list(local.tensor_addrs)
    with pytest.raises(ValueError, match="LLM_PARAM_INVALID: a mapped tensor .* outside the peer.s mapped region"):
        kv._C.mapped_geometry_copy_start(
            region,
            True,
            desc,
            g.fields(),
            [addrs[0], region.base + region.size - 64],
            local_desc,
            g.fields(),
            local_addrs,
            *blocks,
            selection,
        )
    job = kv._C.mapped_geometry_copy_start(
        region, True, desc, g.fields(), addrs, local_desc, g.fields(), local_addrs, *blocks, selection
    )
    assert job.wait(5000) == 1
    assert torch.equal(mine[0][1], tensors[0][0])
    kv.unregister_kv_cache(local)


def mapped_job(src_g, dst_g, num_blocks, src_blocks, dst_blocks, layers):
    """A mapped transfer between geometries from a cache in shared memory here (as a peer's
    would be mapped) to a registered one: (job, source tensors, destination tensors, the
    destination as expected after it, its cache)."""
    cache, theirs = kv.allocate_kv_cache(
        layers * src_g.tensors_per_layer, (num_blocks, *src_g.block_shape), torch.float16
    )
    for seed, tensor in enumerate(theirs):
        tensor.copy_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(seed)))
    region = kv._C.shared_region_find(theirs[0].data_ptr(), 1)
    assert region is not None
    mine = [torch.zeros(len(dst_blocks) + 1, *dst_g.block_shape, dtype=torch.float16) for _ in range(len(theirs))]
    local = kv.register_kv_cache(mine)
    expected = expected_after(theirs, src_g, mine, dst_g, src_blocks, dst_blocks)
    job = kv._C.mapped_geometry_copy_start(
        region,
        True,
        kv.geometry.fields(cache.cache_desc),
        src_g.fields(),
        [t.data_ptr() for t in theirs],
        kv.geometry.fields(local.cache_desc),
        dst_g.fields(),
        list(local.tensor_addrs),
        torch.tensor(src_blocks),
        torch.tensor(dst_blocks),
        kv.geometry.selection(-1, 0, 0, None, None, None),
    )
    return job, theirs, mine, expected, local


# 8 heads x 128 dims, fp16: 4 KiB of K and V per token and layer
BIG_SRC, BIG_DST = KVGeometry("flash_attn", 16, 8, 128), KVGeometry("flash_attn_hnd", 32, 8, 128)


@pytest.mark.parametrize("one_task", [False, True])
def test_mapped_geometry_job_is_split_and_every_box_lands(one_task, decoder):
    """A mapped transfer between geometries of 4 MiB is several tasks that the copy threads
    and the waiting caller (help) share, and every token lands where it should; the test hook
    starts it as before, one task, with the same bytes."""
    kv._C._test_geometry_one_task(one_task)
    try:
        src_blocks = list(range(31, -1, -1))  # 512 tokens, 2 MiB a layer
        job, _theirs, mine, expected, local = mapped_job(
            BIG_SRC, BIG_DST, 32, src_blocks, [5, 0, 13, 2, 9, 11, 7, 15, 3, 1, 8, 6, 14, 4, 10, 12], 2
        )
    finally:
        kv._C._test_geometry_one_task(False)
    assert job.nbytes == 4 << 20
    if one_task:
        assert job.tasks == 1
    else:
        # at most 1 MiB a task (a quarter of the job per copy thread), so four or more
        assert job.tasks >= 4, job.tasks
    assert job.help(10000) == 1
    assert same_bytes(mine, expected)
    kv.unregister_kv_cache(local)


def test_cancelled_split_mapped_geometry_job_ends_cancelled(decoder, monkeypatch):
    """A split job cancelled before its tasks run ends cancelled (-ECANCELED), none of its
    boxes copied; one whose handle is dropped while it waits is let go once its tasks end."""
    monkeypatch.setenv("TORCH_KVREG_PEER_COPY_TEST_PAUSE_US", "200000")  # 0.2 s before each task
    live = kv._C.peer_copy_live_jobs()
    src_blocks, dst_blocks = list(range(32)), list(range(16))
    job, _theirs, mine, expected, local = mapped_job(BIG_SRC, BIG_DST, 32, src_blocks, dst_blocks, 2)
    assert job.tasks >= 4
    job.cancel()
    assert job.help(10000) == -errno.ECANCELED
    assert all(not t.any() for t in mine)
    assert not same_bytes(mine, expected)
    dropped, *_ = mapped_job(BIG_SRC, BIG_DST, 32, src_blocks, dst_blocks, 2)
    del dropped  # cancels it; its tasks hold its state (and the mapping) until they end
    deadline = time.monotonic() + 10
    while kv._C.peer_copy_live_jobs() > live + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert kv._C.peer_copy_live_jobs() == live + 1  # only `job`'s handle is left
    del job
    assert kv._C.peer_copy_live_jobs() == live
    kv.unregister_kv_cache(local)


def test_nixl_pull_and_push(through_nixl, peers, decoder):
    assert kv.link_clusters([peers[0].info])[0] == kv.LLMStatusCode.LLM_SUCCESS
    run_both_directions(peers[0], "nixl")


@pytest.mark.parametrize("path", ["same_host", "nixl"])
def test_tp1_decoder_gathers_from_two_tp2_prefills(path, peers, monkeypatch):
    """Two prefill processes, TP ranks 0 and 1 of 2, each hold half of the heads; one TP-1
    decoder pulls the tokens from both (asynchronously, at once) and holds every head."""
    if path == "nixl":
        monkeypatch.setenv("TORCH_KVREG_SAME_HOST_COPY", "0")
    kv.initialize(cluster_id=3, options={"llm.SyncKvCacheWaitTime": "3000"})
    try:
        assert kv.link_clusters([p.info for p in peers])[0] == kv.LLMStatusCode.LLM_SUCCESS
        decoder_g = KVGeometry("vllm_flash_attn", 32, H, D)
        mine, local = local_cache(decoder_g, 4, seed=9)
        expected = mine
        transfers = []
        before = path_counts()
        for rank, peer in enumerate(peers):
            prefill_g = KVGeometry("flash_attn_hnd", 16, H, D, tp_size=2, tp_rank=rank)
            remote_id, remote_tensors = peer_cache(peer, prefill_g, 6, seed=20 + rank)
            expected = expected_after(remote_tensors, prefill_g, expected, decoder_g, [4, 0, 2], [3, 1], num_tokens=45)
            transfers.append(
                kv.pull_kv_tokens_async(
                    CacheIndex(peer.cluster_id, remote_id),
                    local,
                    [4, 0, 2],
                    [3, 1],
                    45,
                    src_geometry=prefill_g,
                    dst_geometry=decoder_g,
                    notify=f"rank {rank}",
                )
            )
        for transfer in transfers:
            assert transfer.wait(5000) == 45 * (H // 2) * D * 2 * 2 * LAYERS
        assert same_bytes(mine, expected)
        assert path_counts().get(path, 0) - before.get(path, 0) == 2
    finally:
        kv.finalize()


@pytest.mark.parametrize("op", ["register", "allocate"])
def test_unmappable_remote_geometry_moves_nothing(op, peers, decoder):
    """Checked against the peer's desc before any byte moves: a geometry that does not fit
    the remote cache, or another head dim, is LLM_PARAM_INVALID and the local cache is
    untouched (also when the peer's cache is mapped here: "allocate")."""
    kv.link_clusters([peers[1].info])
    src_g = KVGeometry("flash_attn", 16, H, D)
    remote_id, _ = peer_cache(peers[1], src_g, 4, seed=1, op=op)
    dst_g = KVGeometry("flash_attn", 32, H, D)
    mine, local = local_cache(dst_g, 4, seed=2)
    for t in mine:
        t.fill_(float("nan"))
    before = [t.clone() for t in mine]
    index = CacheIndex(peers[1].cluster_id, remote_id)
    bad = [
        dict(src_geometry=KVGeometry("flash_attn", 32, H, D)),  # not the remote cache's block bytes
        dict(src_geometry=KVGeometry("flash_attn", 16, H, 2 * D), dst_geometry=KVGeometry("flash_attn", 32, H, 2 * D)),
        dict(num_tokens=65),  # more than the two destination blocks hold
        dict(dst_geometry=KVGeometry("flash_attn", 32, H, D, tp_size=3)),
    ]
    for case in bad:
        args = dict(src_geometry=src_g, dst_geometry=dst_g, num_tokens=48) | case
        with pytest.raises(kv.LLMParamInvalidError):
            kv.pull_kv_tokens(index, local, [0, 1, 2, 3], [1, 2], **args)
    with pytest.raises(kv.LLMIndexError):
        kv.pull_kv_tokens(index, local, [0, 4], [1], src_geometry=src_g, dst_geometry=dst_g)
    assert same_bytes(mine, before)
    peers[1].call("unregister", remote_id)
