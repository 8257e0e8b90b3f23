"""allocate_kv_cache: HOST caches in shared memory (a sealed memfd), freed once unregistered
and unreferenced; a same-host peer maps them after the link's handshake, so that its pulls
and pushes are local copies (remote/shared_memory.py), and never reads through a stale
mapping."""

import gc
import os
import time
import types

import numpy as np
import pytest
import torch

import torch_kvreg as kv
from torch_kvreg import _C, CacheIndex, LLMStatusCode, allocate
from torch_kvreg.remote import protocol, shared_memory

from conftest import snapshot
from remote_peer import Peer, linked_to, paged, running_peer

BLOCK = (16, 2, 32)  # 2 KiB fp16 blocks


def live():
    gc.collect()
    return _C.shared_regions_live()


def memfds_mapped_here(owner):
    """Names of the torch_kvreg memfds that process ``owner`` made and this one maps now."""
    tag = f"/memfd:{allocate.MEMFD_PREFIX}{owner}-"
    with open("/proc/self/maps") as maps:
        return {line.split("/memfd:")[1].split()[0] for line in maps if tag in line}


# --- allocation and freeing -----------------------------------------------------------------
def test_allocated_caches_register_like_tensors(kv):
    before = live()
    cache, tensors = kv.allocate_kv_cache(3, (8, 4, 16), torch.bfloat16, kv.RegisterCfg(remote_accessible=True))
    assert [t.shape for t in tensors] == [torch.Size([8, 4, 16])] * 3
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)
    assert cache.cache_desc == kv.CacheDesc(3, kv.DataType.DT_BF16, (8, 4, 16), kv.Placement.HOST)
    assert cache.tensor_addrs == tuple(t.data_ptr() for t in tensors)
    assert all(addr % 4096 == 0 for addr in cache.tensor_addrs)  # page-aligned: a mapping's pages are one tensor's
    assert all(int(t.abs().sum()) == 0 for t in tensors)  # zero-filled
    assert kv.usage() == kv.Usage(1, 3, 0, 3 * 8 * 4 * 16 * 2)
    assert kv.get_cache(cache.cache_id) == cache and kv.registry.remote_accessible(cache)
    assert live() == before + 1  # one mapping for the whole cache
    # Local copies see the tensors' bytes, in both directions.
    tensors[0][2] = 5
    other = kv.register_kv_cache([torch.zeros(8, 4, 16, dtype=torch.bfloat16) for _ in range(3)])
    kv.copy_kv_blocks(cache, other, [2], [6])
    kv.copy_kv_blocks(other, cache, [6], [7])
    assert bool((tensors[0][7] == 5).all()) and bool((tensors[1][7] == 0).all())
    region = allocate.shared_region(cache)
    assert region is not None and os.readlink(f"/proc/self/fd/{region.fd}") == f"/memfd:{region.name} (deleted)"
    assert allocate.shared_region(other) is None  # plain tensors are not shared


@pytest.mark.parametrize("unregister_first", [True, False])
def test_memory_goes_once_unregistered_and_unreferenced(kv, unregister_first):
    before = live()
    cache, tensors = kv.allocate_kv_cache(2, (4, 8), torch.float32)
    view = tensors[1][1:]  # a view holds the mapping too
    del tensors
    if unregister_first:
        kv.unregister_kv_cache(cache)
        assert live() == before + 1  # the view still refers to it
        view.fill_(1.0)  # and it is still mapped
        del view
    else:
        del view
        assert live() == before + 1  # the registry still holds the tensors
        kv.unregister_kv_cache(cache)
    assert live() == before and kv.usage().num_caches == 0


def test_finalize_frees_unreferenced_caches():
    kv.initialize()
    before = live()
    kv.allocate_kv_cache(1, (4,), torch.uint8)
    assert live() == before + 1
    kv.finalize()
    assert live() == before


@pytest.mark.parametrize(
    "args, kind",
    [
        ((0, (4,), torch.float16), ValueError),
        ((241, (4,), torch.float16), ValueError),
        ((1, (), torch.float16), ValueError),
        ((1, (4, 0), torch.float16), ValueError),
        ((1, (4, -2), torch.float16), ValueError),
        ((1, tuple([2] * 33), torch.float16), ValueError),
        ((1, (4,), torch.complex64), ValueError),
        ((1, (4,), "float16"), TypeError),
        ((1, "44", torch.float16), TypeError),
        (("2", (4,), torch.float16), TypeError),
        ((1, (4,), torch.float16, "cfg"), TypeError),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(kv, args, kind):
    before, regions = snapshot(), live()
    with pytest.raises(kv.LLMException) as error:
        kv.allocate_kv_cache(*args)
    assert error.value.status_code == LLMStatusCode.LLM_PARAM_INVALID and isinstance(error.value, kind)
    assert snapshot() == before and live() == regions


def test_limits_give_register_kv_caches_statuses_and_change_nothing():
    kv.initialize(limits=kv.Limits(max_addrs=3, max_device_bytes=0, max_host_bytes=4096))
    kv.allocate_kv_cache(2, (1024,), torch.uint8)
    for args in [(2, (16,), torch.uint8), (1, (2049,), torch.uint8)]:  # 4 addresses; 4097 bytes
        before, regions = snapshot(), live()
        with pytest.raises(kv.LLMException) as error:
            kv.allocate_kv_cache(*args)
        assert error.value.status_code == LLMStatusCode.LLM_OUT_OF_MEMORY
        with pytest.raises(kv.LLMException) as plain:
            kv.register_kv_cache([torch.zeros(*args[1], dtype=torch.uint8) for _ in range(args[0])])
        assert plain.value.status_code == error.value.status_code
        assert snapshot() == before and live() == regions


def test_before_initialize_it_says_so():
    with pytest.raises(kv.LLMException, match="initialize") as error:
        kv.allocate_kv_cache(1, (4,), torch.float16)
    assert error.value.status_code == LLMStatusCode.LLM_FAILED


def test_layer_views_of_one_shared_buffer_are_found(kv):
    backing = allocate.shared_bytes(4 * 4096)
    views = [backing[i * 4096 : (i + 1) * 4096].view(torch.float16).view(2, 1024) for i in range(4)]
    cache = kv.register_kv_cache(views)
    region = allocate.shared_region(cache)
    assert region is not None and region.base == backing.data_ptr() and region.size == 4 * 4096
    # A cache that only partly lies in a region is not shared.
    mixed = kv.register_kv_cache([allocate.shared_bytes(4096), torch.zeros(4096, dtype=torch.uint8)])
    assert allocate.shared_region(mixed) is None


# --- the native side of a mapped copy ---------------------------------------------------------
def test_a_mapped_copy_stays_inside_the_mapping(kv):
    cache, (source,) = kv.allocate_kv_cache(1, (64, 1024), torch.uint8)
    source.copy_(torch.randint(0, 256, (64, 1024), dtype=torch.uint8))
    region = allocate.shared_region(cache)
    fd = os.open(f"/proc/{os.getpid()}/fd/{region.fd}", os.O_RDWR)
    mapped = _C.shared_region_map(fd, region.size)  # this process's own memfd, mapped again
    assert mapped.base != region.base
    target = torch.zeros(64, 1024, dtype=torch.uint8)
    offsets = np.array([3 * 1024, 60 * 1024], dtype=np.uint64)
    lengths = np.array([1024, 4096], dtype=np.uint64)
    job = _C.mapped_copy_start_segments(mapped, True, [target.data_ptr()], [mapped.base], offsets, offsets, lengths)
    assert job.help(10_000) == 1
    assert torch.equal(target[3], source[3]) and torch.equal(target[60:], source[60:]) and int(target[4].sum()) == 0
    for bad_base, bad_length in [(mapped.base + 1, 4096), (mapped.base - 64 * 1024, 1024)]:
        with pytest.raises(ValueError, match="outside the peer's mapped region"):
            _C.mapped_copy_start_segments(
                mapped,
                True,
                [target.data_ptr()],
                [bad_base],
                offsets[1:],
                offsets[1:],
                np.array([bad_length], np.uint64),
            )
    # The job holds the mapping: dropping every other reference leaves it for the job.
    before = live()
    job = _C.mapped_copy_start_segments(mapped, False, [target.data_ptr()], [mapped.base], offsets, offsets, lengths)
    del mapped
    assert job.wait(10_000) == 1
    del job
    assert live() == before - 1


def test_an_unsealed_or_short_memfd_is_not_mapped():
    fd = os.memfd_create("plain")
    os.ftruncate(fd, 8192)
    with pytest.raises(ValueError, match="not a sealed region"):
        _C.shared_region_map(fd, 8192)  # (closed by the refusal)
    kv.initialize()
    cache, _ = kv.allocate_kv_cache(1, (4096,), torch.uint8)
    region = allocate.shared_region(cache)
    with pytest.raises(ValueError, match="not a sealed region"):
        _C.shared_region_map(os.open(f"/proc/self/fd/{region.fd}", os.O_RDWR), region.size + 1)


def test_the_lease_reply_carries_the_region_and_is_checked():
    desc = kv.CacheDesc(1, kv.DataType.DT_UINT8, (4,), kv.Placement.HOST)
    shared = protocol.SharedMemory("torch_kvreg-1-ab", 7, 1 << 20, 8192)
    reply = protocol.AcquireReply(3, protocol.RemoteCache(5, desc, (1 << 20,), shared), b"md")
    wire = protocol.decode(protocol.encode(reply.to_wire())[4:])
    assert protocol.AcquireReply.parse(wire) == reply
    plain = protocol.AcquireReply(3, protocol.RemoteCache(5, desc, (1 << 20,)), b"md")
    assert "shm" not in plain.to_wire() and protocol.AcquireReply.parse(plain.to_wire()).cache.shared is None
    for bad in [{"name": "", "fd": 1, "base": 1, "size": 1}, {"name": "x", "fd": -1, "base": 1, "size": 1},
                {"name": "x", "fd": 1, "base": 2**64 - 1, "size": 2}, [1, 2]]:  # fmt: skip
        with pytest.raises(protocol.ProtocolError):
            protocol.AcquireReply.parse({**wire, "shm": bad})


def test_a_mapping_is_replaced_when_the_lease_names_another_memfd(kv):
    """The name check: the same link and cache id with another memfd (a cache registered
    again) maps that one; the old mapping is dropped, never read."""
    mappings = shared_memory.Mappings()

    class FakeLink:  # hashable by identity, like a Link
        peer_pid, cluster_id = os.getpid(), 9

    link = FakeLink()
    target = torch.zeros(4, 1024, dtype=torch.uint8)
    seen = []
    for fill in (1, 2):
        cache, (source,) = kv.allocate_kv_cache(1, (4, 1024), torch.uint8)
        source.fill_(fill)
        region = allocate.shared_region(cache)
        remote = protocol.RemoteCache(77, cache.cache_desc, cache.tensor_addrs, protocol.SharedMemory(*region))
        segments = tuple(np.array([0], dtype=np.uint64) for _ in range(2)) + (np.array([4096], dtype=np.uint64),)
        lease = types.SimpleNamespace(remote=remote)
        job = mappings.start(link, lease, True, [target.data_ptr()], [remote.addrs[0]], segments, True)
        assert job is not None and job.help(10_000) == 1
        seen.append(int(target[0, 0]))
        assert mappings.mapped() == 1
    assert seen == [1, 2] and mappings.made == 2
    mappings.clear()


# --- a same-host peer -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def peer():
    with running_peer(1) as p:
        yield p


def engine():
    return kv.remote.existing_engine()


def test_pulls_and_pushes_take_the_mapped_path_both_ways(peer):
    remote_id = peer.call("allocate", (4, 64, BLOCK, 11, True))
    expected = paged(4, 64, BLOCK, 11)
    with linked_to(peer):
        local, tensors = kv.allocate_kv_cache(4, (64, *BLOCK), torch.float16)
        src, dst = [5, 63, 0, 17, 18, 19], [1, 2, 3, 40, 41, 42]
        kv.pull_kv_blocks(CacheIndex(1, remote_id), local, src, dst)
        for got, want in zip(tensors, expected):
            assert torch.equal(got[dst], want[src])
        # A plain local cache pulls over the mapping too (only the peer's side is mapped).
        plain_tensors = [torch.zeros(64, *BLOCK, dtype=torch.float16) for _ in range(4)]
        plain = kv.register_kv_cache(plain_tensors)
        kv.pull_kv_blocks(CacheIndex(1, remote_id), plain, list(range(64)), list(range(64)))
        assert all(torch.equal(t, w) for t, w in zip(plain_tensors, expected))
        # Push: our blocks into the peer's cache; the peer sees them.
        for i, tensor in enumerate(tensors):
            tensor[50:53] = float(i + 2)
        kv.push_kv_blocks(local, CacheIndex(1, remote_id), [50, 51, 52], [30, 31, 32])
        back = peer.call("read", remote_id)
        for i, tensor in enumerate(back):
            assert bool((tensor[30:33] == float(i + 2)).all())
            assert torch.equal(tensor[:30], expected[i][:30])
        # Layers: tensors 2 and 3 only.
        kv.pull_kv_blocks(CacheIndex(1, remote_id), local, [30], [60], layers=range(1, 2))
        assert bool((tensors[2][60] == 4.0).all()) and bool((tensors[0][60] == 0).all())
        paths = dict(engine().paths)
        assert paths == {"mapped": 4}, paths
        assert engine().mappings.made == 1 and engine().mappings.starts == 4  # mapped once
        # Unlinking drops the link's mappings at once (not only once they idled).
        assert engine().mappings.mapped() == 1
        assert kv.unlink_clusters([peer.info])[0] == LLMStatusCode.LLM_SUCCESS
        assert engine().mappings.mapped() == 0


def test_async_pulls_keep_the_async_api_over_the_mapping(peer):
    remote_id = peer.call("allocate", (2, 32, BLOCK, 12, True))
    expected = paged(2, 32, BLOCK, 12)
    with linked_to(peer, cluster_id=3):
        local, tensors = kv.allocate_kv_cache(2, (32, *BLOCK), torch.float16)
        transfers = [
            kv.pull_kv_blocks_async(CacheIndex(1, remote_id), local, [i], [31 - i], notify=f"layer-{i}")
            for i in range(8)
        ]
        for transfer in transfers:
            transfer.wait(10_000)
            assert transfer.done() and transfer.status == LLMStatusCode.LLM_SUCCESS and transfer.failed_blocks == []
            assert transfer.nbytes == 2 * expected[0][0].numel() * 2
        for i in range(8):
            assert all(torch.equal(t[31 - i], w[i]) for t, w in zip(tensors, expected))
        deadline = time.monotonic() + 10
        notices = []
        while len(notices) < 8 and time.monotonic() < deadline:
            notices += [n for n in peer.call("notifications") if n[0] == 3]
            time.sleep(0.02)
        assert [message for _, message in notices] == [f"layer-{i}".encode() for i in range(8)]
        assert engine().paths["mapped"] == 8 and "same_host" not in engine().paths


def test_only_remote_accessible_caches_are_mapped(peer):
    closed_id = peer.call("allocate", (1, 8, BLOCK, 13, False))
    plain_id = peer.call("register", (1, 8, BLOCK, 13, True))
    with linked_to(peer, cluster_id=4):
        local, tensors = kv.allocate_kv_cache(1, (8, *BLOCK), torch.float16)
        with pytest.raises(kv.LLMException) as error:
            kv.pull_kv_blocks(CacheIndex(1, closed_id), local, [0], [0])
        assert error.value.status_code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
        # A cache over the peer's own tensors keeps the process_vm path.
        kv.pull_kv_blocks(CacheIndex(1, plain_id), local, [1], [1])
        assert torch.equal(tensors[0][1], paged(1, 8, BLOCK, 13)[0][1])
        assert dict(engine().paths) == {"same_host": 1} and engine().mappings.made == 0
        assert memfds_mapped_here(peer.process.pid) == set()


def test_a_mapping_is_dropped_when_idle_so_freed_memory_goes(peer):
    remote_id = peer.call("allocate", (1, 16, BLOCK, 14, True))
    with linked_to(peer, cluster_id=5):
        local, _ = kv.allocate_kv_cache(1, (16, *BLOCK), torch.float16)
        kv.pull_kv_blocks(CacheIndex(1, remote_id), local, [0], [0])
        assert len(memfds_mapped_here(peer.process.pid)) == 1 and engine().mappings.mapped() == 1
        # The peer frees the cache; our mapping must not keep its memory for long.
        peer.call("unregister", remote_id)
        peer.call("forget", remote_id)
        deadline = time.monotonic() + shared_memory.IDLE_S + 2.0
        while memfds_mapped_here(peer.process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert memfds_mapped_here(peer.process.pid) == set() and engine().mappings.mapped() == 0
        with pytest.raises(kv.LLMException) as error:
            kv.pull_kv_blocks(CacheIndex(1, remote_id), local, [0], [0])
        assert error.value.status_code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST


def test_a_restarted_peer_is_never_read_through_the_old_mapping():
    if not kv.remote.nixl_available():
        pytest.skip("needs the nixl extra")
    first = Peer(6)
    port = first.port
    try:
        first_id = first.call("allocate", (2, 16, BLOCK, 21, True))
        with linked_to(first, cluster_id=7):
            local, tensors = kv.allocate_kv_cache(2, (16, *BLOCK), torch.float16)
            kv.pull_kv_blocks(CacheIndex(6, first_id), local, [3], [3])
            assert torch.equal(tensors[0][3], paged(2, 16, BLOCK, 21)[0][3])
            first.kill()  # no bye: our link (and its mapping) is left behind, dead
            second = Peer(6, options={"llm.ListenIpInfo": f"127.0.0.1:{port}"})
            try:
                second_id = second.call("allocate", (2, 16, BLOCK, 22, True))
                assert second_id == first_id  # the same cache id, another cache
                assert kv.link_clusters([second.info])[0] == LLMStatusCode.LLM_SUCCESS
                kv.pull_kv_blocks(CacheIndex(6, second_id), local, [3, 4], [3, 4])
                fresh = paged(2, 16, BLOCK, 22)
                assert all(torch.equal(t[3:5], w[3:5]) for t, w in zip(tensors, fresh))
                assert engine().mappings.made == 2 and engine().paths["mapped"] == 2
                assert engine().mappings.mapped() == 1  # the dead link's mapping went with it
            finally:
                second.close()
    finally:
        if first.process.is_alive():
            first.close()


def test_switched_off_the_peer_copies_by_process_vm(peer, monkeypatch):
    monkeypatch.setenv(shared_memory.MAP_ENV, "0")
    remote_id = peer.call("allocate", (1, 8, BLOCK, 15, True))
    with linked_to(peer, cluster_id=8):
        local, tensors = kv.allocate_kv_cache(1, (8, *BLOCK), torch.float16)
        kv.pull_kv_blocks(CacheIndex(1, remote_id), local, [2], [2])
        assert torch.equal(tensors[0][2], paged(1, 8, BLOCK, 15)[0][2])
        assert dict(engine().paths) == {"same_host": 1}
    monkeypatch.setenv(shared_memory.MAP_ENV, "maybe")
    with pytest.raises(kv.LLMException):
        shared_memory.enabled()
