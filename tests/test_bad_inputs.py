"""Catalogue of bad inputs: each gets its exception class and status, and changes nothing."""

import pytest
import torch

import torch_kvreg as kv
from torch_kvreg import CacheDesc, DataType, LLMStatusCode, Placement

P = LLMStatusCode.LLM_PARAM_INVALID
HOST = Placement.HOST
Value, Index, Type, NotExist = kv.LLMParamInvalidError, kv.LLMIndexError, kv.LLMTypeError, kv.LLMKVCacheNotExistError


class World:
    """Two registered host caches (A and B, 2 tensors of [8, 4] fp32) and a spare one."""

    def __init__(self):
        kv.initialize()
        self.a_tensors = [torch.randn(8, 4) for _ in range(2)]
        self.b_tensors = [torch.randn(8, 4) for _ in range(2)]
        self.a = kv.register_kv_cache(self.a_tensors)
        self.b = kv.register_kv_cache(self.b_tensors)
        self.half = kv.register_kv_cache([torch.zeros(8, 4, dtype=torch.float16) for _ in range(2)])
        self.free = torch.zeros(64)

    def raw(self, desc, addrs):
        return kv.register_kv_cache(desc, addrs)

    def state(self):
        return (
            kv.usage(),
            kv.registered_caches(),
            kv.is_initialized(),
            [t.clone() for t in self.a_tensors + self.b_tensors],
        )


def f32(shape, n=1):
    return CacheDesc(n, DataType.DT_FLOAT, shape, HOST)


def G(block_size, heads, head_dim, tp_size=1, tp_rank=0, layout="flash_attn"):
    return kv.KVGeometry(layout, block_size, heads, head_dim, tp_size, tp_rank)


def geo(src_geometry, dst_geometry):
    return {"src_geometry": src_geometry, "dst_geometry": dst_geometry}


CASES = [
    # register, tensor form
    ("empty list", lambda w: kv.register_kv_cache([]), Value, P),
    ("241 tensors", lambda w: kv.register_kv_cache([torch.zeros(1) for _ in range(241)]), Value, P),
    ("list of ints", lambda w: kv.register_kv_cache([1, 2]), Type, P),
    ("a string", lambda w: kv.register_kv_cache("cache"), Type, P),
    ("None", lambda w: kv.register_kv_cache(None), Type, P),
    ("mixed dtypes", lambda w: kv.register_kv_cache([torch.zeros(4), torch.zeros(4, dtype=torch.float64)]), Value, P),
    ("mixed shapes", lambda w: kv.register_kv_cache([torch.zeros(4), torch.zeros(5)]), Value, P),
    ("mixed devices", lambda w: kv.register_kv_cache([torch.zeros(4), torch.zeros(4, device="meta")]), Value, P),
    ("non-contiguous", lambda w: kv.register_kv_cache(torch.zeros(4, 6).t()), Value, P),
    ("zero-size", lambda w: kv.register_kv_cache(torch.zeros(0, 4)), Value, P),
    ("rank 0", lambda w: kv.register_kv_cache(torch.tensor(1.0)), Value, P),
    ("rank 33", lambda w: kv.register_kv_cache(torch.zeros([1] * 33)), Value, P),
    ("complex dtype", lambda w: kv.register_kv_cache(torch.zeros(4, dtype=torch.complex64)), Value, P),
    ("meta tensor", lambda w: kv.register_kv_cache(torch.zeros(4, device="meta")), Value, P),
    ("sparse tensor", lambda w: kv.register_kv_cache(torch.zeros(4, 4).to_sparse()), Value, P),
    ("exact duplicate", lambda w: kv.register_kv_cache(w.a_tensors), Value, P),
    ("partial overlap", lambda w: kv.register_kv_cache(w.a_tensors[0][4:]), Value, P),
    ("same tensor twice in a call", lambda w: kv.register_kv_cache([w.free, w.free]), Value, P),
    ("overlapping views in a call", lambda w: kv.register_kv_cache([w.free[:32], w.free[16:48]]), Value, P),
    ("cfg of wrong type", lambda w: kv.register_kv_cache(w.free, {"pin": True}), Type, P),
    (
        "address cap crossed",
        lambda w: kv.register_kv_cache([torch.zeros(1) for _ in range(235)]),
        kv.LLMException,
        LLMStatusCode.LLM_OUT_OF_MEMORY,
    ),
    # register, raw-address form
    ("raw null address", lambda w: w.raw(f32((4,)), [0]), Value, P),
    ("raw misaligned address", lambda w: w.raw(f32((4,)), [w.free.data_ptr() + 2]), Value, P),
    ("raw count mismatch", lambda w: w.raw(f32((4,), 2), [w.free.data_ptr()]), Value, P),
    ("raw negative address", lambda w: w.raw(f32((4,)), [-4096]), Value, P),
    ("raw address over 63 bits", lambda w: w.raw(f32((4,)), [2**64 - 4096]), Value, P),
    ("raw addrs not a sequence", lambda w: w.raw(f32((4,)), w.free.data_ptr()), Type, P),
    ("raw float address", lambda w: w.raw(f32((4,)), [4096.0]), Type, P),
    (
        "raw DT_UNDEFINED",
        lambda w: w.raw(CacheDesc(1, DataType.DT_UNDEFINED, (4,), HOST), [w.free.data_ptr()]),
        Value,
        P,
    ),
    ("raw zero dim", lambda w: w.raw(f32((4, 0)), [w.free.data_ptr()]), Value, P),
    ("raw negative dim", lambda w: w.raw(f32((-4,)), [w.free.data_ptr()]), Value, P),
    ("raw rank 0", lambda w: w.raw(f32(()), [w.free.data_ptr()]), Value, P),
    ("raw rank 33", lambda w: w.raw(f32([1] * 33), [w.free.data_ptr()]), Value, P),
    ("raw zero tensors", lambda w: w.raw(f32((4,), 0), []), Value, P),
    ("raw 241 addresses", lambda w: w.raw(f32((1,), 241), [4096 * (i + 1) for i in range(241)]), Value, P),
    ("raw overlap with live cache", lambda w: w.raw(f32((4,)), [w.a.tensor_addrs[1] + 16]), Value, P),
    ("raw size overflow", lambda w: w.raw(f32((2**40, 2**40)), [4096]), Value, P),
    (
        "raw host cap crossed",
        lambda w: w.raw(f32((21 * 2**28,)), [1 << 44]),
        kv.LLMException,
        LLMStatusCode.LLM_OUT_OF_MEMORY,
    ),
    # unregister and queries
    ("unregister unknown id", lambda w: kv.unregister_kv_cache(10**9), NotExist, LLMStatusCode.LLM_KV_CACHE_NOT_EXIST),
    ("unregister id as str", lambda w: kv.unregister_kv_cache("1"), Type, P),
    ("get unknown id", lambda w: kv.get_cache(-1), NotExist, LLMStatusCode.LLM_KV_CACHE_NOT_EXIST),
    ("get id as float", lambda w: kv.get_cache(1.0), Type, P),
    # initialize
    ("unknown option", lambda w: kv.initialize(options={"llm.Bogus": "1"}), Value, P),
    ("option value not str", lambda w: kv.initialize(options={"llm.SyncKvCacheWaitTime": 5}), Type, P),
    ("bad listen address", lambda w: kv.initialize(options={"llm.ListenIpInfo": "localhost"}), Value, P),
    ("bad wait time", lambda w: kv.initialize(options={"llm.SyncKvCacheWaitTime": "-3"}), Value, P),
    ("negative cluster id", lambda w: kv.initialize(cluster_id=-1), Value, P),
    ("unknown role", lambda w: kv.initialize(role=7), Value, P),
    ("limits of wrong type", lambda w: kv.initialize(limits=(1, 2, 3)), Type, P),
    ("different arguments", lambda w: kv.initialize(cluster_id=5), kv.LLMException, LLMStatusCode.LLM_FAILED),
    # transfers
    ("block out of range", lambda w: kv.copy_kv_blocks(w.a, w.b, [8], [0]), Index, P),
    ("negative block", lambda w: kv.copy_kv_blocks(w.a, w.b, [0], [-1]), Index, P),
    ("huge block index", lambda w: kv.copy_kv_blocks(w.a, w.b, [2**70], [0]), Index, P),
    ("block index one past int64", lambda w: kv.copy_kv_blocks(w.a, w.b, (0, 2**63), (0, 1)), Index, P),
    ("a bool among int blocks", lambda w: kv.copy_kv_blocks(w.a, w.b, [0, True], [0, 1]), Type, P),
    ("a float among int blocks", lambda w: kv.copy_kv_blocks(w.a, w.b, [0, 1], [0, 1.0]), Type, P),
    ("one bad index among good ones", lambda w: kv.copy_kv_blocks(w.a, w.b, [0, 1, 9], [0, 1, 2]), Index, P),
    ("duplicate destination", lambda w: kv.copy_kv_blocks(w.a, w.b, [0, 1], [3, 3]), Value, P),
    ("unequal block lists", lambda w: kv.copy_kv_blocks(w.a, w.b, [0, 1], [0]), Value, P),
    (
        "unknown src cache",
        lambda w: kv.copy_kv_blocks(10**9, w.b, [0], [0]),
        NotExist,
        LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
    ),
    ("float block tensor", lambda w: kv.copy_kv_blocks(w.a, w.b, torch.tensor([0.0]), [0]), Type, P),
    ("2-D block tensor", lambda w: kv.copy_kv_blocks(w.a, w.b, torch.zeros(1, 1, dtype=torch.long), [0]), Value, P),
    ("bool block", lambda w: kv.copy_kv_blocks(w.a, w.b, [True], [0]), Type, P),
    ("block read and written", lambda w: kv.copy_kv_blocks(w.a, w.a, [0, 1], [1, 2]), Value, P),
    ("incompatible dtypes", lambda w: kv.copy_kv_blocks(w.a, w.half, [0], [0]), Value, P),
    ("copy_kv_cache offset past slice", lambda w: kv.copy_kv_cache(w.a, w.b, 0, 0, offset=17), Value, P),
    ("copy_kv_cache size past slice", lambda w: kv.copy_kv_cache(w.a, w.b, 0, 0, offset=8, size=9), Value, P),
    ("copy_kv_cache batch out of range", lambda w: kv.copy_kv_cache(w.a, w.b, 8, 0), Index, P),
    ("swap_blocks with a list", lambda w: kv.swap_blocks(w.a, w.b, [(0, 1)]), Type, P),
    # asynchronous transfers: checked before anything is queued
    ("async copy block out of range", lambda w: kv.copy_kv_blocks_async(w.a, w.b, [0], [8]), Index, P),
    ("async copy duplicate destination", lambda w: kv.copy_kv_blocks_async(w.a, w.b, [0, 1], [2, 2]), Value, P),
    ("async copy read and written", lambda w: kv.copy_kv_blocks_async(w.a, w.a, [0, 1], [1, 2]), Value, P),
    ("async copy incompatible", lambda w: kv.copy_kv_blocks_async(w.a, w.half, [0], [0]), Value, P),
    (
        "async copy unknown cache",
        lambda w: kv.copy_kv_blocks_async(w.a, 10**9, [0], [0]),
        NotExist,
        LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
    ),
    # verified transfers (torch_kvreg.verify): verify must be a bool; checked as unverified ones
    ("verify an int", lambda w: kv.copy_kv_blocks(w.a, w.b, [0], [1], verify=1), Type, P),
    ("verify a str", lambda w: kv.copy_kv_blocks(w.a, w.b, [0], [1], verify="true"), Type, P),
    ("verify None", lambda w: kv.copy_kv_blocks_async(w.a, w.b, [0], [1], verify=None), Type, P),
    ("verify a float", lambda w: kv.copy_kv_cache(w.a, w.b, 0, 1, verify=1.0), Type, P),
    ("verify a list", lambda w: kv.swap_blocks(w.a, w.b, {0: 1}, verify=[True]), Type, P),
    ("verified block out of range", lambda w: kv.copy_kv_blocks(w.a, w.b, [8], [0], verify=True), Index, P),
    ("verified destination out of range", lambda w: kv.copy_kv_blocks(w.a, w.b, [0], [8], verify=True), Index, P),
    ("verified duplicate destination", lambda w: kv.copy_kv_blocks(w.a, w.b, [0, 1], [3, 3], verify=True), Value, P),
    ("verified incompatible", lambda w: kv.copy_kv_blocks(w.a, w.half, [0], [0], verify=True), Value, P),
    ("verified bad layers", lambda w: kv.copy_kv_blocks(w.a, w.b, [0], [0], layers=range(2, 3), verify=True), Value, P),
    ("verified async out of range", lambda w: kv.copy_kv_blocks_async(w.a, w.b, [0], [8], verify=True), Index, P),
    ("verified slice offset", lambda w: kv.copy_kv_cache(w.a, w.b, 0, 1, 17, verify=True), Value, P),
    ("verified slice index", lambda w: kv.copy_kv_cache(w.a, w.b, 8, 1, verify=True), Index, P),
    ("wait for an unknown transfer", lambda w: kv.inflight.take(10**9), Value, P),
    ("wait with a float timeout", lambda w: kv.inflight.completed().wait(1.5), Type, P),
    ("wait with a negative timeout", lambda w: kv.inflight.completed().wait(-1), Value, P),
    # transfers between geometries (A and B: one layer of 16-byte fp32 blocks)
    (
        "tokens, head_dim differs",
        lambda w: kv.copy_kv_tokens(w.a, w.b, [0], [1], **geo(G(1, 1, 4), G(2, 1, 2))),
        Value,
        P,
    ),
    (
        "tokens, dtype differs",
        lambda w: kv.copy_kv_tokens(w.a, w.half, [0], [1], **geo(G(1, 1, 4), G(1, 1, 4))),
        Value,
        P,
    ),
    (
        "tokens, TP does not divide",
        lambda w: kv.copy_kv_tokens(w.a, w.b, [0], [1], **geo(G(1, 2, 2), G(1, 2, 2, 3))),
        Value,
        P,
    ),
    (
        "tokens, no head in common",
        lambda w: kv.copy_kv_tokens(w.a, w.b, [0], [1], **geo(G(2, 2, 2, 2), G(2, 2, 2, 2, 1))),
        Value,
        P,
    ),
    ("tokens do not fit", lambda w: kv.copy_kv_tokens(w.a, w.b, [0, 1], [2], **geo(G(1, 1, 4), G(1, 1, 4))), Value, P),
    (
        "tokens, geometry not the desc's",
        lambda w: kv.copy_kv_tokens(w.a, w.b, [0], [1], **geo(G(1, 1, 4), G(2, 1, 4))),
        Value,
        P,
    ),
    (
        "tokens, unknown layout",
        lambda w: kv.copy_kv_tokens(w.a, w.b, [0], [1], **geo(G(1, 1, 4), G(1, 1, 4, layout="NHD"))),
        Value,
        P,
    ),
    ("tokens, one cache", lambda w: kv.copy_kv_tokens(w.a, w.a, [0], [1], **geo(G(1, 1, 4), G(1, 1, 4))), Value, P),
    (
        "tokens, block out of range",
        lambda w: kv.copy_kv_tokens(w.a, w.b, [8], [1], **geo(G(1, 1, 4), G(1, 1, 4))),
        Index,
        P,
    ),
    (
        "tokens, geometry a str",
        lambda w: kv.copy_kv_tokens(w.a, w.b, [0], [1], src_geometry="flash_attn", dst_geometry=G(1, 1, 4)),
        Type,
        P,
    ),
    (
        "plan, heads out of range",
        lambda w: kv.plan_kv_tokens(w.a, w.b, [0], [1], heads=range(1, 2), **geo(G(1, 1, 4), G(1, 1, 4))),
        Value,
        P,
    ),
    # settings: the CPU copy strategy, the link secret
    ("unknown copy strategy", lambda w: kv.set_copy_strategy("fastest"), Value, P),
    ("auto on one thread", lambda w: kv.set_copy_strategy("auto:single"), Value, P),
    ("copy strategy not a str", lambda w: kv.set_copy_strategy(1), Type, P),
    ("empty link secret", lambda w: kv.initialize(options={"llm.LinkSecret": ""}), Value, P),
    ("link secret over 4 KiB", lambda w: kv.initialize(options={"llm.LinkSecret": "s" * 5000}), Value, P),
]


@pytest.mark.parametrize("name,call,error,status", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_and_changes_nothing(name, call, error, status):
    world = World()
    before, strategy = world.state(), kv.copy_strategy()
    with pytest.raises(error) as info:
        call(world)
    assert info.value.status_code == status
    assert str(info.value).startswith(status.name + ": ")
    after = world.state()
    assert after[:3] == before[:3] and kv.copy_strategy() == strategy
    assert kv.registry.option("llm.LinkSecret") is None
    assert all(torch.equal(x, y) for x, y in zip(after[3], before[3]))


def test_catalogue_covers_every_entry_point_and_error_class():
    """Dropping the cases of one entry point, one exception class or one status fails here."""
    names = [case[0] for case in CASES]
    assert len(set(names)) == len(names)
    called = set().union(*(case[1].__code__.co_names for case in CASES))
    for entry_point in (
        "register_kv_cache",
        "raw",
        "unregister_kv_cache",
        "get_cache",
        "initialize",
        "copy_kv_blocks",
        "copy_kv_cache",
        "swap_blocks",
        "copy_kv_blocks_async",
        "take",
        "wait",
        "set_copy_strategy",
        "copy_kv_tokens",
        "plan_kv_tokens",
    ):
        assert entry_point in called, entry_point
    assert {case[2] for case in CASES} == {Value, Index, Type, NotExist, kv.LLMException}
    assert {case[3] for case in CASES} == {
        P,
        LLMStatusCode.LLM_OUT_OF_MEMORY,
        LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
        LLMStatusCode.LLM_FAILED,
    }


def test_calls_after_finalize_fail_cleanly():
    world = World()
    kv.finalize()
    for call in (
        lambda: kv.register_kv_cache(world.free),
        lambda: kv.unregister_kv_cache(world.a),
        lambda: kv.copy_kv_blocks(world.a, world.b, [0], [0]),
        lambda: kv.get_cache(world.a.cache_id),
        lambda: kv.register_kv_cache(f32((4,)), [world.free.data_ptr()]),
    ):
        with pytest.raises(kv.LLMException) as info:
            call()
        assert info.value.status_code == LLMStatusCode.LLM_FAILED
        assert "initialize()" in str(info.value)
        assert kv.usage() == kv.Usage(0, 0, 0, 0)


@pytest.mark.parametrize(
    "call,builtin,status",
    [
        (lambda w: torch.ops.llm.register_kv_cache([torch.zeros(0)]), ValueError, "LLM_PARAM_INVALID"),
        (
            lambda w: torch.ops.llm.copy_kv_blocks(w.a.cache_id, w.b.cache_id, torch.tensor([99]), torch.tensor([0])),
            IndexError,
            "LLM_PARAM_INVALID",
        ),
        (
            lambda w: torch.ops.llm.copy_kv_blocks(w.a.cache_id, w.b.cache_id, torch.tensor([0.5]), torch.tensor([0])),
            TypeError,
            "LLM_PARAM_INVALID",
        ),
        (lambda w: torch.ops.llm.unregister_kv_cache(12345678), RuntimeError, "LLM_KV_CACHE_NOT_EXIST"),
    ],
)
def test_raw_ops_raise_builtin_types(call, builtin, status):
    world = World()
    before = world.state()
    with pytest.raises(builtin) as info:
        call(world)
    assert not isinstance(info.value, kv.LLMException)
    assert str(info.value).startswith(status + ": ")
    assert world.state()[:3] == before[:3]
