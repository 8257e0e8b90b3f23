"""torch_kvreg.llm_datadist: LLM-DataDist's Python API over the native registry. Config and
option translation, registration with keys, local copies, the bad-input table (each call
gets upstream's status and changes nothing), and transfers with a peer process: keys,
layer ranges, pull_cache by CacheKey, transfer_cache_async with a LayerSynchronizer."""

import importlib

import pytest
import torch

import torch_kvreg as kv
from torch_kvreg.llm_datadist import (
    BlocksCacheKey,
    Cache,
    CacheDesc,
    CacheKey,
    CacheKeyByIdAndIndex,
    DataType,
    LayerSynchronizer,
    LLMClusterInfo,
    LLMConfig,
    LLMDataDist,
    LLMException,
    LLMRole,
    LLMStatusCode,
    Placement,
    TransferConfig,
    TransferWithCacheKeyConfig,
)

from remote_peer import Peer, paged

P = LLMStatusCode.LLM_PARAM_INVALID
HOST = Placement.HOST


@pytest.fixture
def datadist():
    dd = LLMDataDist(LLMRole.PROMPT, 3)
    dd.init({"llm.SyncKvCacheWaitTime": "2000"})
    yield dd
    dd.finalize()


def host_desc(num_tensors=2, shape=(4, 8), dtype=DataType.DT_FLOAT):
    return CacheDesc(num_tensors, list(shape), dtype, HOST)


def addrs(tensors):
    return [t.data_ptr() for t in tensors]


# --- structure ------------------------------------------------------------------------------
def test_the_facade_modules_import_each_other_one_way():
    """LLMDataDist makes the CacheManager; the state both read is session.py's, so the cache
    manager never imports the datadist (tests/test_structure.py: no circle anywhere)."""
    structure = importlib.import_module("test_structure")
    found = structure.modules()
    package = "torch_kvreg.llm_datadist"
    imported = {n: structure.imports(n, found[n], set(found)) for n in found if n.startswith(f"{package}.")}
    assert {f"{package}.cache_manager", f"{package}.session"} <= imported[f"{package}.datadist"]
    assert f"{package}.session" in imported[f"{package}.cache_manager"]
    assert not any(f"{package}.datadist" in modules for modules in imported.values())


# --- configuration --------------------------------------------------------------------------
def test_config_generates_upstream_keys():
    config = LLMConfig()
    config.device_id = 1
    config.listen_ip_info = "127.0.0.1:26000"
    config.sync_kv_timeout = 1500
    config.enable_cache_manager = True
    config.enable_remote_cache_accessible = True
    config.local_comm_res = ""
    config.transfer_backend = "hixl"
    options = config.generate_options()
    assert options["ge.exec.deviceId"] == "1" and options["ge.session_device_id"] == "1"
    assert options["llm.listenIpInfo"] == "127.0.0.1:26000"
    assert options["llm.SyncKvCacheWaitTime"] == "1500"
    assert options["llm.EnableCacheManager"] == "1" and options["llm.EnableRemoteCacheAccessible"] == "1"
    assert options["llm.LocalCommRes"] == "" and options["llm.TransferBackend"] == "hixl"
    assert options["llm.MemoryUtilization"] == "0.95"
    datadist = LLMDataDist(LLMRole.PROMPT, 0)
    datadist.init(options)  # every key generate_options makes is accepted
    assert kv.is_initialized() and kv.listen_address() == "127.0.0.1:26000"
    assert kv.registry.option("llm.SyncKvCacheWaitTime") == "1500"
    datadist.finalize()
    datadist.finalize()  # idempotent
    assert not kv.is_initialized()


def test_cluster_info_stores_ips_as_upstream_does():
    info = LLMClusterInfo()
    info.remote_cluster_id = 7
    info.append_remote_ip_info("10.1.2.3", 26000)
    info.append_local_ip_info(0x0100007F, 26001)  # an int is taken as it is
    assert info.remote_ip_info_list == [(0x0302010A, 26000)]  # little-endian bytes of 10.1.2.3
    assert info.local_ip_info_list == [(0x0100007F, 26001)]
    from torch_kvreg.llm_datadist.config import int_to_ip

    assert int_to_ip(info.remote_ip_info_list[0][0]) == "10.1.2.3"


def test_one_initialized_instance_per_process(datadist):
    with pytest.raises(LLMException) as info:
        LLMDataDist(LLMRole.DECODER, 4).init({})
    assert info.value.status_code == LLMStatusCode.LLM_FAILED
    datadist.init({})  # the same instance again: no-op
    manager = datadist.cache_manager
    datadist.finalize()
    with pytest.raises(LLMException) as info:
        manager.register_cache(host_desc(1), addrs([torch.zeros(4, 8)]))
    assert info.value.status_code == LLMStatusCode.LLM_FAILED
    second = LLMDataDist(LLMRole.DECODER, 4)
    second.init({})  # after finalize, another instance may start
    second.finalize()


# --- registration, keys, local copies -----------------------------------------------------
def test_register_allocate_and_keys(datadist):
    manager = datadist.cache_manager
    tensors = [torch.zeros(4, 8) for _ in range(2)]
    keys = [CacheKey(3, 11), CacheKey(3, 2**64 - 1), CacheKey(3, 12, model_id=1)]  # slot 1 unnamed
    cache = manager.register_cache(host_desc(), addrs(tensors), cache_keys=keys)
    assert isinstance(cache, Cache) and not cache.is_blocks_cache and cache.tensor_addrs == addrs(tensors)
    assert kv.cache_keys(cache.cache_id) == ["llm_datadist/req/11/0", "", "llm_datadist/req/12/1"]
    blocks_t = [torch.zeros(6, 8) for _ in range(2)]
    blocks = manager.register_blocks_cache(host_desc(shape=(6, 8)), addrs(blocks_t), BlocksCacheKey(3, 5))
    assert blocks.is_blocks_cache and kv.cache_keys(blocks.cache_id) == ["llm_datadist/blocks/5"]
    assert kv.find_cache_key(BlocksCacheKey(9, 5).registry_key()) == (blocks.cache_id, 0)
    assert kv.registry.remote_accessible(cache.cache_id)  # remotely reachable by default
    private_t = [torch.zeros(4, 8)]
    private = manager.register_cache(host_desc(1), addrs(private_t), remote_accessible=False)
    assert not kv.registry.remote_accessible(private.cache_id)
    allocated = manager.allocate_cache(host_desc(shape=(3, 4)), [CacheKey(3, 20)])
    assert [tuple(t.shape) for t in allocated.tensors] == [(3, 4), (3, 4)]
    assert allocated.tensor_addrs == [t.data_ptr() for t in allocated.tensors]
    assert kv.usage().num_caches == 4
    manager.remove_cache_key(CacheKey(3, 20))
    assert kv.cache_keys(allocated.cache_id) == [""]
    manager.deallocate_cache(allocated)
    assert allocated.tensors is None and kv.usage().num_caches == 3
    for c in (cache, blocks, private):
        manager.unregister_cache(c.cache_id)
    assert kv.usage() == kv.Usage(0, 0, 0, 0)


def test_local_copies(datadist):
    manager = datadist.cache_manager
    src_t = [torch.arange(32.0).reshape(4, 8) + 100 * i for i in range(2)]
    dst_t = [torch.zeros(4, 8) for _ in range(2)]
    src, dst = manager.register_cache(host_desc(), addrs(src_t)), manager.register_cache(host_desc(), addrs(dst_t))
    manager.copy_cache(dst, src, dst_batch_index=3, src_batch_index=1)  # destination first, as upstream
    assert all(torch.equal(d[3], s[1]) for d, s in zip(dst_t, src_t)) and not dst_t[0][:3].any()
    manager.copy_cache(dst, src, 0, 2, offset=8, size=16)  # bytes 8..24 of the slot
    assert torch.equal(dst_t[1][0, 2:6], src_t[1][2, 2:6]) and not dst_t[1][0, :2].any()
    blocks_t = [torch.arange(32.0).reshape(4, 8) for _ in range(2)]
    blocks = manager.register_blocks_cache(host_desc(), addrs(blocks_t))
    manager.copy_blocks(blocks, {0: [2, 3]})
    assert torch.equal(blocks_t[0][2], blocks_t[0][0]) and torch.equal(blocks_t[1][3], blocks_t[1][0])
    other_t = [torch.zeros(4, 8) for _ in range(2)]
    other = manager.register_blocks_cache(host_desc(), addrs(other_t))
    manager.swap_blocks(blocks, other, {1: 0})
    assert torch.equal(other_t[0][0], blocks_t[0][1])


def test_local_copies_take_verify_and_name_what_differs(datadist):
    """verify=True (our extension) on the facade's copies: a block corrupted once it landed
    is LLM_FAILED naming it; the same copies unverified pass; a verify that is no bool is
    LLM_PARAM_INVALID before any byte moves."""
    from torch_kvreg import verify

    manager = datadist.cache_manager
    src_t = [torch.arange(32.0).reshape(4, 8) + 100 * i for i in range(2)]
    dst_t = [torch.zeros(4, 8) for _ in range(2)]
    src = manager.register_blocks_cache(host_desc(), addrs(src_t))
    dst = manager.register_blocks_cache(host_desc(), addrs(dst_t))
    manager.swap_blocks(src, dst, {1: 2}, verify=True)
    manager.copy_blocks(src, {0: [3]}, verify=True)
    manager.copy_cache(dst, src, 1, 0, verify=True)
    assert torch.equal(dst_t[1][2], src_t[1][1]) and torch.equal(src_t[0][3], src_t[0][0])
    assert torch.equal(dst_t[0][1], src_t[0][0])

    def corrupt(cache_id, blocks):
        if cache_id == dst.cache_id:
            dst_t[0][blocks[0]][0] += 1.0

    verify.landing_checked = corrupt
    try:
        calls = [
            lambda: manager.swap_blocks(src, dst, {1: 2}, verify=True),
            lambda: manager.copy_cache(dst, src, 1, 0, verify=True),
        ]
        for call, block in zip(calls, (2, 1)):
            with pytest.raises(LLMException) as info:
                call()
            assert info.value.status_code == LLMStatusCode.LLM_FAILED and info.value.failed_blocks == [block]
        manager.swap_blocks(src, dst, {1: 2})  # unverified: the hook is not even asked
        before = [t.clone() for t in dst_t]
        for call in (
            lambda: manager.swap_blocks(src, dst, {1: 0}, verify=1),
            lambda: manager.copy_blocks(src, {0: [2]}, verify="yes"),
            lambda: manager.copy_cache(dst, src, 0, 1, verify=None),
            lambda: manager.pull_blocks(BlocksCacheKey(9), dst, [0], [0], verify=1),
            lambda: manager.push_blocks(BlocksCacheKey(9), src, [0], [0], verify=0),
            lambda: manager.pull_cache(CacheKeyByIdAndIndex(9, 1), dst, verify="1"),
            lambda: manager.push_cache(CacheKeyByIdAndIndex(9, 1), src, verify=1.0),
        ):
            with pytest.raises(LLMException) as info:
                call()
            assert info.value.status_code == P
        assert all(torch.equal(x, y) for x, y in zip(before, dst_t))
    finally:
        verify.landing_checked = None


# --- bad input: upstream's status, nothing changed ------------------------------------------
class World:
    def __init__(self, datadist):
        self.manager = datadist.cache_manager
        self.datadist = datadist
        self.tensors = [torch.randn(4, 8) for _ in range(2)]
        self.blocks = self.manager.register_blocks_cache(host_desc(), addrs(self.tensors), BlocksCacheKey(3, 0))
        self.batch_t = [torch.randn(4, 8) for _ in range(2)]
        self.batch = self.manager.register_cache(host_desc(), addrs(self.batch_t), [CacheKey(3, 1)])
        self.free = [torch.zeros(4, 8) for _ in range(2)]

    def state(self):
        caches = kv.registered_caches()
        return (
            kv.usage(),
            caches,
            [kv.cache_keys(c) for c in caches],
            [t.clone() for t in self.tensors + self.batch_t],
        )


def cluster(remote_id=None, ip=None):
    info = LLMClusterInfo()
    if remote_id is not None:
        info.remote_cluster_id = remote_id
    if ip is not None:
        info.append_remote_ip_info(ip, 1)
    return info


NE, NOT_EXIST = LLMStatusCode.LLM_FEATURE_NOT_ENABLED, LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
BAD = [
    ("init: unknown option", lambda w: LLMDataDist(LLMRole.MIX, 1).init({"llm.Bogus": "1"}), LLMStatusCode.LLM_FAILED),
    (
        "switch_role: option value not str",
        lambda w: w.datadist.switch_role(LLMRole.PROMPT, {"llm.listenIpInfo": 5}),
        None,
    ),
    ("register: empty addrs", lambda w: w.manager.register_cache(host_desc(), []), P),
    ("register: count mismatch", lambda w: w.manager.register_cache(host_desc(3), addrs(w.free)), P),
    (
        "register: 241 addrs",
        lambda w: w.manager.register_cache(host_desc(241), [4096 * (i + 1) for i in range(241)]),
        P,
    ),
    ("register: null address", lambda w: w.manager.register_cache(host_desc(1), [0]), P),
    ("register: addrs not a list", lambda w: w.manager.register_cache(host_desc(), 4096), P),
    ("register: overlap", lambda w: w.manager.register_cache(host_desc(), addrs(w.tensors)), P),
    (
        "register: duplicate blocks key",
        lambda w: w.manager.register_blocks_cache(host_desc(), addrs(w.free), BlocksCacheKey(9, 0)),
        P,
    ),
    (
        "register: duplicate cache key",
        lambda w: w.manager.register_cache(host_desc(), addrs(w.free), [CacheKey(3, 1)]),
        P,
    ),
    (
        "register: more keys than slots",
        lambda w: w.manager.register_cache(host_desc(), addrs(w.free), [CacheKey(3, 50 + i) for i in range(5)]),
        P,
    ),
    ("register: key of wrong type", lambda w: w.manager.register_cache(host_desc(), addrs(w.free), ["k"]), P),
    (
        "register: remote_accessible not bool",
        lambda w: w.manager.register_cache(host_desc(), addrs(w.free), remote_accessible=1),
        P,
    ),
    (
        "register: desc of wrong type",
        lambda w: w.manager.register_cache(kv.CacheDesc(2, DataType.DT_FLOAT, (4, 8)), addrs(w.free)),
        P,
    ),
    ("CacheDesc: batch_dim_index 1", lambda w: CacheDesc(2, [4, 8], DataType.DT_FLOAT, HOST, 1), P),
    ("CacheDesc: shape of str", lambda w: CacheDesc(2, "48", DataType.DT_FLOAT, HOST), P),
    ("unregister: unknown id", lambda w: w.manager.unregister_cache(10**6), NOT_EXIST),
    ("unregister: id as str", lambda w: w.manager.unregister_cache("1"), P),
    ("deallocate: a blocks cache as batch cache", lambda w: w.manager.deallocate_cache(w.blocks), P),
    ("remove_cache_key: unknown", lambda w: w.manager.remove_cache_key(CacheKey(3, 99)), NOT_EXIST),
    ("copy_cache: batch out of range", lambda w: w.manager.copy_cache(w.batch, w.batch, 0, 4), P),
    ("copy_cache: size 0", lambda w: w.manager.copy_cache(w.batch, w.batch, 0, 1, size=0), P),
    ("copy_blocks: on a batch cache", lambda w: w.manager.copy_blocks(w.batch, {0: [1]}), P),
    ("copy_blocks: block out of range", lambda w: w.manager.copy_blocks(w.blocks, {0: [4]}), P),
    ("copy_blocks: read and written", lambda w: w.manager.copy_blocks(w.blocks, {0: [0]}), P),
    ("swap_blocks: batch caches", lambda w: w.manager.swap_blocks(w.batch, w.blocks, {0: 1}), P),
    ("pull_blocks: empty dst_blocks", lambda w: w.manager.pull_blocks(BlocksCacheKey(1), w.blocks, [0], []), P),
    ("pull_blocks: into a batch cache", lambda w: w.manager.pull_blocks(BlocksCacheKey(1), w.batch, [0], [0]), P),
    ("pull_blocks: from a CacheKey", lambda w: w.manager.pull_blocks(CacheKey(1, 2), w.blocks, [], [0]), NE),
    (
        "pull_blocks: layer range step 2",
        lambda w: w.manager.pull_blocks(BlocksCacheKey(1), w.blocks, [0], [0], src_layer_range=range(0, 4, 2)),
        P,
    ),
    (
        "pull_blocks: tensor_num_per_layer 0",
        lambda w: w.manager.pull_blocks(BlocksCacheKey(1), w.blocks, [0], [0], tensor_num_per_layer=0),
        P,
    ),
    (
        "pull_blocks: unknown keyword",
        lambda w: w.manager.pull_blocks(BlocksCacheKey(1), w.blocks, [0], [0], layers=1),
        P,
    ),
    (
        "pull_blocks: not linked",
        lambda w: w.manager.pull_blocks(BlocksCacheKey(1), w.blocks, [0], [0]),
        LLMStatusCode.LLM_NOT_YET_LINK,
    ),
    ("pull_cache: blocks cache", lambda w: w.manager.pull_cache(CacheKeyByIdAndIndex(1, 1), w.blocks), P),
    ("pull_cache: CacheKey with both ids", lambda w: w.manager.pull_cache(CacheKey(1, 2, 0, 3), w.batch), P),
    ("push_cache: size not -1", lambda w: w.manager.push_cache(CacheKeyByIdAndIndex(1, 1), w.batch, size=8), P),
    ("push_cache: BlocksCacheKey", lambda w: w.manager.push_cache(BlocksCacheKey(1), w.batch), P),
    ("push_blocks: batch cache", lambda w: w.manager.push_blocks(BlocksCacheKey(1), w.batch, [0], [0]), P),
    (
        "transfer_cache_async: TransferConfig",
        lambda w: w.manager.transfer_cache_async(w.blocks, Never(), [TransferConfig(1, [4096])]),
        NE,
    ),
    (
        "TransferWithCacheKeyConfig: ranges differ",
        lambda w: TransferWithCacheKeyConfig(BlocksCacheKey(1), range(0, 2), range(0, 1)),
        P,
    ),
    ("link: no remote ip", lambda w: w.datadist.link_clusters([cluster(1)]), P),
    ("link: timeout 0", lambda w: w.datadist.link_clusters([cluster(1, "127.0.0.1")], 0), P),
    ("link: not a list", lambda w: w.datadist.link_clusters(cluster(1, "127.0.0.1")), P),
    ("link: cluster id unset", lambda w: w.datadist.link_clusters([cluster(None, "127.0.0.1")]), P),
    ("unlink: force not bool", lambda w: w.datadist.unlink_clusters([cluster(1)], force=1), P),
    ("cluster info: bad ip", lambda w: cluster(1, "not-an-ip"), P),
    ("switch_role: to PROMPT without address", lambda w: w.datadist.switch_role(LLMRole.PROMPT, {}), P),
    ("link(comm_name)", lambda w: w.datadist.link("comm", {0: 0, 1: 1}, "{}"), NE),
    ("remap_registered_memory", lambda w: w.manager.remap_registered_memory([]), NE),
]


class Never(LayerSynchronizer):
    def synchronize_layer(self, layer_index, timeout_in_millis):
        return False


@pytest.mark.parametrize("name,call,status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_upstream_status_and_changes_nothing(datadist, name, call, status):
    world = World(datadist)
    before = world.state()
    with pytest.raises(LLMException) as info:
        call(world)
    if status is None:  # a wrong Python type
        assert isinstance(info.value, TypeError) and info.value.status_code == P
    else:
        assert info.value.status_code == status, info.value
    assert str(info.value).startswith(info.value.status_code.name + ": ")
    after = world.state()
    assert after[:3] == before[:3] and all(torch.equal(a, b) for a, b in zip(after[3], before[3]))


def test_bad_input_table_covers_the_surface():
    names = [b[0] for b in BAD]
    assert len(set(names)) == len(names)
    called = set().union(*(b[1].__code__.co_names for b in BAD))
    for method in (
        "init",
        "register_cache",
        "register_blocks_cache",
        "unregister_cache",
        "deallocate_cache",
        "remove_cache_key",
        "copy_cache",
        "copy_blocks",
        "swap_blocks",
        "pull_blocks",
        "pull_cache",
        "push_cache",
        "push_blocks",
        "transfer_cache_async",
        "link_clusters",
        "unlink_clusters",
        "switch_role",
    ):
        assert method in called, method


# --- with a peer process ---------------------------------------------------------------------
BLOCK = (4, 16)


def llm_cluster(peer) -> LLMClusterInfo:
    info = LLMClusterInfo()
    info.remote_cluster_id = peer.cluster_id
    info.append_remote_ip_info(peer.host, peer.port)
    return info


@pytest.fixture(scope="module")
def peer():
    if not kv.remote.nixl_available():
        pytest.skip("needs the nixl extra")
    p = Peer(cluster_id=8)
    yield p
    p.close()


def test_keys_and_layer_ranges_with_a_peer(peer, datadist):
    manager = datadist.cache_manager
    assert datadist.link_clusters([llm_cluster(peer)]) == (LLMStatusCode.LLM_SUCCESS, [LLMStatusCode.LLM_SUCCESS])
    # The peer's blocks cache: 4 layers x (K, V), named BlocksCacheKey(8, model_id=2).
    blocks_id = peer.call("register_keyed", (8, 6, BLOCK, 21, [BlocksCacheKey(0, 2).registry_key()]))
    theirs = paged(8, 6, BLOCK, 21)
    mine = [torch.zeros(6, *BLOCK, dtype=torch.float16) for _ in range(4)]  # 2 layers x (K, V)
    local = manager.register_blocks_cache(CacheDesc(4, [6, *BLOCK], DataType.DT_FLOAT16, HOST), addrs(mine))
    # Their layers 2..3 into our layers 0..1.
    manager.pull_blocks(
        BlocksCacheKey(8, 2), local, [1, 4], [0, 5], src_layer_range=range(2, 4), dst_layer_range=range(0, 2)
    )
    for t in range(4):
        assert torch.equal(mine[t][[0, 5]], theirs[4 + t][[1, 4]])
        assert not mine[t][1:5].any()
    with pytest.raises(LLMException) as info:  # model 3 was never registered there
        manager.pull_blocks(BlocksCacheKey(8, 3), local, [0], [0])
    assert info.value.status_code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
    with pytest.raises(LLMException) as info:  # layer 4 does not exist there
        manager.pull_blocks(
            BlocksCacheKey(8, 2), local, [0], [0], src_layer_range=range(3, 5), dst_layer_range=range(0, 2)
        )
    assert info.value.status_code == P
    # Push our layer 1 into their layer 0, one tensor per layer.
    manager.push_blocks(
        BlocksCacheKey(8, 2),
        local,
        [5],
        [3],
        src_layer_range=range(1, 2),
        dst_layer_range=range(0, 1),
        tensor_num_per_layer=1,
    )
    now = peer.call("read", blocks_id)
    assert torch.equal(now[0][3], mine[1][5]) and torch.equal(now[1][3], theirs[1][3])
    # A batch cache with request keys: pull_cache by CacheKey lands the named slot.
    keys = ["", CacheKey(0, 41).registry_key(), CacheKey(0, 42).registry_key()]
    batch_id = peer.call("register_keyed", (2, 3, BLOCK, 22, keys))
    batch_theirs = paged(2, 3, BLOCK, 22)
    slots = [torch.zeros(2, *BLOCK, dtype=torch.float16) for _ in range(2)]
    batch = manager.register_cache(CacheDesc(2, [2, *BLOCK], DataType.DT_FLOAT16, HOST), addrs(slots))
    manager.pull_cache(CacheKey(8, 42), batch, batch_index=1)
    assert torch.equal(slots[0][1], batch_theirs[0][2]) and torch.equal(slots[1][1], batch_theirs[1][2])
    manager.pull_cache(CacheKeyByIdAndIndex(8, batch_id, 1), batch, batch_index=0, size=64)
    assert torch.equal(slots[0][0].flatten()[:32], batch_theirs[0][1].flatten()[:32])
    assert not slots[0][0].flatten()[32:].any()
    # verify=True (our extension): a block corrupted once it landed fails the pull, naming it.
    theirs_upper = {"src_layer_range": range(2, 4), "dst_layer_range": range(0, 2)}
    manager.pull_blocks(BlocksCacheKey(8, 2), local, [2], [1], verify=True, **theirs_upper)
    manager.pull_cache(CacheKey(8, 41), batch, batch_index=0, verify=True)
    manager.push_blocks(
        BlocksCacheKey(8, 2), local, [1], [0], src_layer_range=range(0, 2), dst_layer_range=range(2, 4), verify=True
    )
    assert torch.equal(slots[1][0], batch_theirs[1][1]) and torch.equal(peer.call("read", blocks_id)[7][0], mine[3][1])
    from torch_kvreg import verify

    def corrupt(cache_id, blocks):
        if cache_id == local.cache_id:
            for block in blocks:
                mine[0][block].view(-1)[0] += 1.0

    verify.landing_checked = corrupt
    try:
        with pytest.raises(LLMException) as info:
            manager.pull_blocks(BlocksCacheKey(8, 2), local, [2, 3], [1, 4], verify=True, **theirs_upper)
        assert info.value.status_code == LLMStatusCode.LLM_FAILED and info.value.failed_blocks == [1, 4]
        manager.pull_blocks(BlocksCacheKey(8, 2), local, [2, 3], [1, 4], **theirs_upper)  # unverified: passes
    finally:
        verify.landing_checked = None
    assert peer.settled_leases() == {}
    peer.call("unregister", blocks_id)
    peer.call("unregister", batch_id)
    datadist.unlink_clusters([llm_cluster(peer)])


class Layers(LayerSynchronizer):
    """Layers before ``stop`` are ready; the rest never are. Records the calls."""

    def __init__(self, stop):
        self.stop, self.calls = stop, []

    def synchronize_layer(self, layer_index, timeout_in_millis):
        self.calls.append((layer_index, timeout_in_millis))
        return layer_index < self.stop


@pytest.mark.parametrize("ready_layers", [3, 1, 0])
def test_transfer_cache_async_moves_only_synchronized_layers(peer, datadist, ready_layers):
    manager = datadist.cache_manager
    datadist.link_clusters([llm_cluster(peer)])
    key = BlocksCacheKey(0, 10 + ready_layers).registry_key()
    remote_id = peer.call("register_keyed", (6, 4, BLOCK, 23, [key]))
    before = paged(6, 4, BLOCK, 23)
    mine = [torch.full((4, *BLOCK), float(t + 1), dtype=torch.float16) for t in range(6)]  # 3 layers
    local = manager.register_blocks_cache(CacheDesc(6, [4, *BLOCK], DataType.DT_FLOAT16, HOST), addrs(mine))
    layers = Layers(ready_layers)
    config = TransferWithCacheKeyConfig(BlocksCacheKey(8, 10 + ready_layers), range(0, 3), range(0, 3))
    task = manager.transfer_cache_async(local, layers, [config], [0, 2], [3, 1])
    results = task.get_results(10_000)
    expected = LLMStatusCode.LLM_SUCCESS if ready_layers == 3 else LLMStatusCode.LLM_TIMEOUT
    assert results == [expected] and task.synchronize(1000) == expected
    assert [c[0] for c in layers.calls] == list(range(min(ready_layers + 1, 3)))  # stops at the first False
    assert all(c[1] == 2000 for c in layers.calls)  # llm.SyncKvCacheWaitTime
    now = peer.call("read", remote_id)
    for t in range(6):
        if t // 2 < ready_layers:  # a synchronized layer: blocks 0, 2 -> 3, 1
            assert torch.all(now[t][[3, 1]] == t + 1) and torch.equal(now[t][[0, 2]], before[t][[0, 2]])
        else:  # never moved
            assert torch.equal(now[t], before[t])
    peer.call("unregister", remote_id)
    datadist.unlink_clusters([llm_cluster(peer)])
