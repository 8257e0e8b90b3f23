import gc
import weakref

import pytest
import torch

import torch_kvreg as kv
from torch_kvreg import CacheDesc, DataType, LLMStatusCode, Placement, RegisterCfg

from conftest import devices, run_python


def paged_cache(layers=2, blocks=8, device="cpu", dtype=torch.float16):
    return [torch.zeros(blocks, 16, 2, 8, dtype=dtype, device=device) for _ in range(2 * layers)]


def test_lifecycle_and_idempotent_initialize():
    assert not kv.is_initialized()
    kv.initialize(1, kv.LlmRole.PROMPT, options={"llm.SyncKvCacheWaitTime": "500"})
    kv.initialize(1, kv.LlmRole.PROMPT, options={"llm.SyncKvCacheWaitTime": "500"})  # re-run cell
    assert kv.is_initialized()
    with pytest.raises(kv.LLMException) as info:
        kv.initialize(2, kv.LlmRole.PROMPT)
    assert info.value.status_code == LLMStatusCode.LLM_FAILED
    assert "finalize" in str(info.value)
    kv.finalize()
    kv.finalize()  # no-op
    assert not kv.is_initialized()
    kv.initialize(2, kv.LlmRole.DECODER)  # different arguments after finalize are fine
    assert kv.is_initialized()


def test_calls_before_initialize_say_so():
    with pytest.raises(kv.LLMException) as info:
        kv.register_kv_cache(torch.zeros(4))
    assert info.value.status_code == LLMStatusCode.LLM_FAILED
    assert "torch_kvreg.initialize()" in str(info.value)


@pytest.mark.parametrize("device", devices())
def test_register_derives_desc_and_addresses(kv, device):
    tensors = paged_cache(device=device)
    cache = kv.register_kv_cache(tensors)
    assert cache.cache_id > 0
    assert cache.tensor_addrs == tuple(t.data_ptr() for t in tensors)
    assert cache.cache_desc == CacheDesc.from_tensors(tensors)
    assert cache.cache_desc.placement == (Placement.HOST if device == "cpu" else Placement.DEVICE)
    assert kv.get_cache(cache.cache_id) == cache
    assert kv.registered_caches() == [cache]
    usage = kv.usage()
    field = "host_bytes" if device == "cpu" else "device_bytes"
    assert (usage.num_caches, usage.num_addrs, getattr(usage, field)) == (1, 4, cache.cache_desc.nbytes)
    kv.unregister_kv_cache(cache)
    assert kv.usage() == kv.Usage(0, 0, 0, 0)
    assert kv.registered_caches() == []


def test_single_tensor_and_cfg_keyword(kv):
    cache = kv.register_kv_cache(torch.zeros(3, 5), cfg=RegisterCfg(pin_host_memory=False))
    assert cache.cache_desc.num_tensors == 1


def test_ids_positive_unique_increasing_across_finalize(kv):
    ids = []
    for _ in range(3):
        ids.append(kv.register_kv_cache(torch.zeros(4)).cache_id)
        kv.unregister_kv_cache(ids[-1])
    kv.finalize()
    kv.initialize()
    ids.append(kv.register_kv_cache(torch.zeros(4)).cache_id)
    assert ids == sorted(set(ids)) and ids[0] > 0


def test_raw_address_form(kv):
    buffers = [torch.arange(24, dtype=torch.int32).reshape(4, 6) for _ in range(2)]
    desc = CacheDesc(2, DataType.DT_INT32, (4, 6), Placement.HOST)
    cache = kv.register_kv_cache(desc, [b.data_ptr() for b in buffers])
    assert cache.cache_desc == desc
    assert cache.tensor_addrs == tuple(b.data_ptr() for b in buffers)
    assert kv.usage().host_bytes == 2 * 4 * 6 * 4
    kv.unregister_kv_cache(cache.cache_id)


def test_raw_form_device_bytes_are_counted_apart(kv):
    if kv._C.cuda_available():
        memory = torch.zeros(1024, device="cuda")
        addr = memory.data_ptr()
    else:
        addr = 1 << 40  # never dereferenced: registration does not touch memory
    cache = kv.register_kv_cache(CacheDesc(1, DataType.DT_FLOAT, (1024,), Placement.DEVICE), [addr])
    assert kv.usage().device_bytes == 4096 and kv.usage().host_bytes == 0
    kv.unregister_kv_cache(cache)


def test_storage_kept_alive_until_unregister(kv):
    tensor = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    ref = weakref.ref(tensor)
    cache = kv.register_kv_cache(tensor)
    del tensor
    gc.collect()
    assert ref() is not None  # the registry holds it
    out = torch.zeros(8, 8)
    out_cache = kv.register_kv_cache(out)
    kv.copy_kv_blocks(cache, out_cache, [5], [0])
    assert torch.equal(out[0], torch.arange(40, 48, dtype=torch.float32))
    kv.unregister_kv_cache(cache)
    gc.collect()
    assert ref() is None


def test_finalize_releases_everything(kv):
    tensors = paged_cache()
    refs = [weakref.ref(t) for t in tensors]
    kv.register_kv_cache(tensors)
    kv.register_kv_cache(torch.zeros(10))
    del tensors
    kv.finalize()
    gc.collect()
    assert all(r() is None for r in refs)
    assert kv.usage() == kv.Usage(0, 0, 0, 0)
    assert kv.registered_caches() == []


def test_finalize_waits_bounded_and_keeps_memory_a_transfer_still_uses(kv, caplog):
    """A transfer that never ends (here a hold nobody releases) delays finalize by at most
    llm.SyncKvCacheWaitTime; its cache is unregistered but its memory stays owned and
    unregistrable until the transfer ends; the other caches go at once."""
    import time

    from torch_kvreg import _C

    kv.finalize()
    kv.initialize(options={"llm.SyncKvCacheWaitTime": "200"})
    busy, idle = torch.arange(32.0).reshape(8, 4), torch.zeros(8, 4)
    busy_ref, idle_ref = weakref.ref(busy), weakref.ref(idle)
    busy_cache = kv.register_kv_cache(busy)
    kv.register_kv_cache(idle)
    _C.hold(busy_cache.cache_id)
    del busy, idle
    start = time.monotonic()
    with caplog.at_level("WARNING", logger="torch_kvreg"):
        kv.finalize()
    assert 0.15 < time.monotonic() - start < 2.0
    assert "1 cache(s) still had transfers in flight after 200 ms" in caplog.text
    gc.collect()
    assert idle_ref() is None and busy_ref() is not None  # the busy memory is still owned
    assert _C.orphans() == 1
    kv.initialize()
    assert kv.usage() == kv.Usage(0, 0, 0, 0) and kv.registered_caches() == []
    with pytest.raises(kv.LLMParamInvalidError, match="finalize unregistered while a transfer still uses it"):
        kv.register_kv_cache(busy_ref())
    assert kv.usage() == kv.Usage(0, 0, 0, 0) and kv.registered_caches() == []  # the refusal changed nothing
    assert _C.orphans() == 1
    _C.unhold(busy_cache.cache_id)  # the transfer ends: the memory goes
    assert _C.orphans() == 0
    gc.collect()
    assert busy_ref() is None


def test_default_limits_and_cumulative_address_cap(kv):
    assert kv.limits() == kv.Limits(240, 50 * 2**30, 20 * 2**30)
    keep = [torch.zeros(2) for _ in range(240)]
    first = kv.register_kv_cache(keep[:200])
    second = kv.register_kv_cache(keep[200:])
    assert kv.usage().num_addrs == 240
    with pytest.raises(kv.LLMException) as info:
        kv.register_kv_cache(torch.zeros(2))
    assert info.value.status_code == LLMStatusCode.LLM_OUT_OF_MEMORY
    kv.unregister_kv_cache(first)
    kv.register_kv_cache(torch.zeros(2))
    kv.unregister_kv_cache(second)


def test_configurable_byte_caps():
    kv.initialize(limits=kv.Limits(max_addrs=1000, max_device_bytes=0, max_host_bytes=4096))
    assert kv.limits().max_addrs == 1000
    kv.register_kv_cache(torch.zeros(512))  # 2 KiB
    kv.register_kv_cache(torch.zeros(512))  # 4 KiB: exactly at the cap
    with pytest.raises(kv.LLMException) as info:
        kv.register_kv_cache(torch.zeros(1))
    assert info.value.status_code == LLMStatusCode.LLM_OUT_OF_MEMORY
    assert kv.usage().host_bytes == 4096
    addr = 1 << 40
    if not kv._C.cuda_available():
        with pytest.raises(kv.LLMException) as info:
            kv.register_kv_cache(CacheDesc(1, DataType.DT_FLOAT, (1,), Placement.DEVICE), [addr])
        assert info.value.status_code == LLMStatusCode.LLM_OUT_OF_MEMORY


def test_overlap_names_conflicting_cache(kv):
    base = torch.zeros(100)
    cache = kv.register_kv_cache(base[:50])
    with pytest.raises(kv.LLMParamInvalidError) as info:
        kv.register_kv_cache(base[40:60])
    assert f"cache id {cache.cache_id}" in str(info.value)
    neighbour = kv.register_kv_cache(base[50:])  # touching is not overlapping
    assert neighbour.cache_id > cache.cache_id


# One int8 pool; a live registration covers bytes [100, 200). (start, end) of the new range.
LIVE = (100, 200)
ACROSS_CALLS = [
    ("left touch", (50, 100), True),
    ("right touch", (200, 260), True),
    ("one byte over the left edge", (50, 101), False),
    ("one byte over the right edge", (199, 260), False),
    ("new contains live", (90, 210), False),
    ("live contains new", (120, 130), False),
    ("exact duplicate", (100, 200), False),
    ("first byte only", (100, 101), False),
    ("last byte only", (199, 200), False),
]


@pytest.mark.parametrize("name,new,accepted", ACROSS_CALLS, ids=[c[0] for c in ACROSS_CALLS])
@pytest.mark.parametrize("form", ["tensors", "addrs"])
def test_overlap_table_across_calls(kv, name, new, accepted, form):
    pool = torch.zeros(1000, dtype=torch.int8)
    live = kv.register_kv_cache(pool[LIVE[0] : LIVE[1]])
    before = (kv.usage(), kv.registered_caches())
    view = pool[new[0] : new[1]]
    if form == "tensors":
        call = lambda: kv.register_kv_cache(view)  # noqa: E731
    else:
        desc = CacheDesc(1, DataType.DT_INT8, (new[1] - new[0],), Placement.HOST)
        call = lambda: kv.register_kv_cache(desc, [view.data_ptr()])  # noqa: E731
    if accepted:
        cache = call()
        assert kv.usage().host_bytes == before[0].host_bytes + new[1] - new[0]
        kv.unregister_kv_cache(cache)
    else:
        with pytest.raises(kv.LLMParamInvalidError) as info:
            call()
        assert f"registered cache id {live.cache_id}" in str(info.value)
    assert (kv.usage(), kv.registered_caches()) == before


# Two tensors of one call, both `size` bytes, at these offsets of the pool. (A tensor of a
# call cannot contain another: all have the same size, so containment is the duplicate.)
WITHIN_ONE_CALL = [
    ("touching, in order", (0, 10), 10, True),
    ("touching, reversed", (10, 0), 10, True),
    ("one byte, in order", (0, 9), 10, False),
    ("one byte, reversed", (9, 0), 10, False),
    ("same address", (5, 5), 10, False),
    ("one-byte tensors side by side", (3, 4), 1, True),
]


@pytest.mark.parametrize("name,offsets,size,accepted", WITHIN_ONE_CALL, ids=[c[0] for c in WITHIN_ONE_CALL])
def test_overlap_table_within_one_call(kv, name, offsets, size, accepted):
    pool = torch.zeros(64, dtype=torch.int8)
    desc = CacheDesc(2, DataType.DT_INT8, (size,), Placement.HOST)
    addrs = [pool.data_ptr() + o for o in offsets]
    before = (kv.usage(), kv.registered_caches())
    if accepted:
        cache = kv.register_kv_cache(desc, addrs)
        assert cache.tensor_addrs == tuple(addrs)
        kv.unregister_kv_cache(cache)
    else:
        with pytest.raises(kv.LLMParamInvalidError) as info:
            kv.register_kv_cache(desc, addrs)
        assert "of this call overlap" in str(info.value)
        if offsets[0] != offsets[1]:  # the views form refuses it the same way
            with pytest.raises(kv.LLMParamInvalidError):
                kv.register_kv_cache([pool[o : o + size] for o in offsets])
    assert (kv.usage(), kv.registered_caches()) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only torch: pinning is a no-op")
def test_pinning_is_noop_without_cuda(kv):
    tensor = torch.zeros(16)
    cache = kv.register_kv_cache(tensor, RegisterCfg(pin_host_memory=True))
    assert not tensor.is_pinned()
    kv.unregister_kv_cache(cache)
    assert not tensor.is_pinned()


@pytest.mark.cuda
def test_host_memory_pinned_and_unpinned():
    kv.initialize()
    tensor = torch.zeros(1 << 16)
    assert not tensor.is_pinned()
    cache = kv.register_kv_cache(tensor)
    assert tensor.is_pinned()
    kv.unregister_kv_cache(cache)
    assert not tensor.is_pinned()
    already = torch.zeros(1 << 16).pin_memory()
    cache = kv.register_kv_cache(already)
    kv.unregister_kv_cache(cache)
    assert already.is_pinned()  # memory pinned by someone else is left as it is
    unpinned = torch.zeros(1 << 16)
    kv.register_kv_cache(unpinned, RegisterCfg(pin_host_memory=False))
    assert not unpinned.is_pinned()


def test_finalize_runs_at_exit():
    code = (
        "import atexit\n"
        "def check():\n"
        "    import torch_kvreg\n"
        "    print('after-exit', torch_kvreg.is_initialized(), torch_kvreg.usage().num_caches)\n"
        "atexit.register(check)\n"  # registered first, so it runs after torch_kvreg's hook
        "import torch, torch_kvreg\n"
        "torch_kvreg.initialize()\n"
        "keep = [torch.zeros(8, 8) for _ in range(4)]\n"
        "torch_kvreg.register_kv_cache(keep)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "after-exit False 0" in result.stdout


def test_unregister_waits_for_held_transfer_then_times_out():
    import threading
    import time

    kv.initialize(options={"llm.SyncKvCacheWaitTime": "200"})
    cache = kv.register_kv_cache(torch.zeros(4, 4))
    kv._C.hold(cache.cache_id)  # a transfer in flight, as the remote layer counts one
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="^LLM_TIMEOUT"):
        torch.ops.llm.unregister_kv_cache(cache.cache_id)
    assert 0.15 < time.monotonic() - start < 5
    assert kv.registered_caches() == [cache]  # nothing changed
    with pytest.raises(kv.LLMException) as info:
        kv.unregister_kv_cache(cache)
    assert info.value.status_code == LLMStatusCode.LLM_TIMEOUT
    # the transfer ends while unregister waits: unregister then succeeds
    threading.Timer(0.05, kv._C.unhold, args=(cache.cache_id,)).start()
    kv.unregister_kv_cache(cache)
    assert kv.registered_caches() == []


def test_reallocated_tensor_is_refused_not_copied_into(kv):
    tensor = torch.zeros(4, 8)
    cache = kv.register_kv_cache(tensor)
    source = kv.register_kv_cache(torch.ones(4, 8))
    tensor.resize_(4096, 8)  # grows: the storage is reallocated, the old memory freed
    with pytest.raises(kv.LLMException) as info:
        kv.copy_kv_blocks(source, cache, [0], [0])
    assert info.value.status_code == LLMStatusCode.LLM_FAILED
    assert "reallocated" in str(info.value)
    kv.unregister_kv_cache(cache)  # still possible, and nothing else changed
    assert kv.registered_caches() == [source]


def test_set_keeps_the_registered_memory_alive(kv):
    tensor = torch.arange(32.0).reshape(4, 8)
    cache = kv.register_kv_cache(tensor)
    tensor.set_(torch.zeros(4, 8))  # the tensor now points elsewhere; the registry does not
    out = torch.zeros(4, 8)
    kv.copy_kv_blocks(cache, kv.register_kv_cache(out), [2], [0])
    assert torch.equal(out[0], torch.arange(16.0, 24.0))


def test_default_wait_time_is_one_second():
    """Without llm.SyncKvCacheWaitTime, unregister waits 1000 ms for a transfer in flight."""
    import time

    kv.initialize()
    cache = kv.register_kv_cache(torch.zeros(4))
    kv._C.hold(cache.cache_id)
    start = time.monotonic()
    with pytest.raises(kv.LLMException) as info:
        kv.unregister_kv_cache(cache)
    waited = time.monotonic() - start
    kv._C.unhold(cache.cache_id)
    assert info.value.status_code == LLMStatusCode.LLM_TIMEOUT
    assert 0.9 <= waited < 3.0, waited
    kv.unregister_kv_cache(cache)


def test_the_native_records_have_named_read_only_fields():
    """What the native module returns about the registry is records with named fields (no
    positional tuples), and the Python types are built from those names."""
    from torch_kvreg import _C

    kv.initialize(7, kv.LlmRole.DECODER, options={"llm.SyncKvCacheWaitTime": "300"})
    tensors = [torch.zeros(4, 8, dtype=torch.float16) for _ in range(2)]
    cache = kv.register_kv_cache(tensors, RegisterCfg(remote_accessible=True), keys=["", "req-1"])
    record = _C.get_cache(cache.cache_id)
    assert type(record).__name__ == "CacheRecord" and not isinstance(record, tuple)
    assert (record.cache_id, record.num_tensors, record.data_type, record.shape) == (cache.cache_id, 2, 1, [4, 8])
    assert (record.placement, record.device_index, record.remote_accessible) == (Placement.HOST, -1, True)
    assert record.addrs == [t.data_ptr() for t in tensors] and record.keys == ["", "req-1"]
    assert (record.layer_names, record.name_layers) == ([], [])
    assert repr(record).startswith(f"CacheRecord(cache_id={cache.cache_id}, num_tensors=2, data_type=1, shape=[4, 8],")
    with pytest.raises(AttributeError):
        record.remote_accessible = False  # a copy of the registry's facts, read-only
    config = _C.config()
    assert (config.cluster_id, config.role, config.device_id, config.wait_ms) == (7, 2, -1, 300)
    assert config.options == {"llm.SyncKvCacheWaitTime": "300"} and config.limits == _C.limits() == _C.default_limits()
    assert kv.limits() == kv.Limits(
        config.limits.max_addrs, config.limits.max_device_bytes, config.limits.max_host_bytes
    )
    usage = _C.usage()
    assert (usage.num_caches, usage.num_addrs, usage.device_bytes, usage.host_bytes) == (1, 2, 0, 128)
    assert kv.usage() == kv.Usage(1, 2, 0, 128) and kv.registry.remote_accessible(cache)
