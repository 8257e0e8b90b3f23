"""Model-based test: random sequences of registry and copy calls against a pure-Python model.

The caches are views into a few byte pools; the model keeps the bytes the pools must hold,
so every step checks the ids, usage(), registered_caches() and every byte of every pool,
not only the registered parts. The machine starts initialized, draws copies between
compatible caches with distinct destination blocks, runs under caps that the sequences
reach, and counts what it exercised: the run fails if it stops reaching non-empty copies
between caches, refusals at either cap, overlap refusals, or unregisters of a cache in use.
CI runs the default profile; KVREG_LONG=1 a long one.
"""

import collections
import os

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

import torch_kvreg as kv
from torch_kvreg import CacheDesc, DataType, LLMStatusCode, Placement

LONG = os.environ.get("KVREG_LONG") == "1"
POOLS, POOL_BYTES = 3, 2048
SLOT_BYTES = 64  # registrations start on a multiple of this; 4-8 blocks span 64-128 bytes
WIDTH_BYTES = 16  # every block is 16 bytes, whatever the dtype
# Both caps bind: 6 addresses (3-6 caches) or 480 bytes (4-7 tensors), whichever comes first.
LIMITS = kv.Limits(max_addrs=6, max_device_bytes=0, max_host_bytes=480)
# unregister of a cache with a transfer in flight gives up after this long
OPTIONS = {"llm.SyncKvCacheWaitTime": "1"}
DTYPES = [torch.float32, torch.float32, torch.float32, torch.int8]  # mostly compatible caches

# What one default-profile run must reach at least (it reaches several times more).
# What one default-profile run must reach at least. Hypothesis' mix of rules varies between
# runs (and with the tests that ran before); these floors sit at a third or less of the
# fewest seen over many seeds, so they fail when a change stops an event, not by chance.
MINIMUM_EVENTS = {
    "cross_cache_copy": 15,  # successful, non-empty, between two different caches
    "self_copy": 80,
    "copy_refused": 30,
    "addr_cap_refused": 100,
    "byte_cap_refused": 8,
    "overlap_refused": 50,
    "unregister_in_use_refused": 100,
    "unregister": 80,
    "finalize_with_caches": 20,
}


class RegistryMachine(RuleBasedStateMachine):
    events = collections.Counter()

    def __init__(self):
        super().__init__()
        kv.finalize()
        gen = torch.Generator().manual_seed(1234)
        self.pools = [torch.randint(0, 256, (POOL_BYTES,), dtype=torch.uint8, generator=gen) for _ in range(POOLS)]
        self.expected = [p.clone() for p in self.pools]
        self.caches = {}  # id -> (pool, [byte offsets], nblocks, dtype)
        self.last_id = 0
        kv.initialize(limits=LIMITS, options=OPTIONS)
        self.initialized = True

    # --- helpers -----------------------------------------------------------------------
    @staticmethod
    def ranges(pool, offsets, nblocks):
        return [(pool, o, o + nblocks * WIDTH_BYTES) for o in offsets]

    def predicted_register_error(self, pool, offsets, nblocks):
        """(status, event name) the registry must answer, in its order of checks."""
        if not self.initialized:
            return LLMStatusCode.LLM_FAILED, "uninitialized"
        new = self.ranges(pool, offsets, nblocks)
        for i, (p, s, e) in enumerate(new):
            for p2, s2, e2 in new[:i]:
                if p == p2 and s < e2 and s2 < e:
                    return LLMStatusCode.LLM_PARAM_INVALID, "overlap_refused"
        for c_pool, c_offsets, c_blocks, _ in self.caches.values():
            for p, s, e in new:
                for p2, s2, e2 in self.ranges(c_pool, c_offsets, c_blocks):
                    if p == p2 and s < e2 and s2 < e:
                        return LLMStatusCode.LLM_PARAM_INVALID, "overlap_refused"
        addrs = sum(len(c[1]) for c in self.caches.values()) + len(offsets)
        if addrs > LIMITS.max_addrs:
            return LLMStatusCode.LLM_OUT_OF_MEMORY, "addr_cap_refused"
        nbytes = sum(len(c[1]) * c[2] * WIDTH_BYTES for c in self.caches.values())
        if nbytes + len(offsets) * nblocks * WIDTH_BYTES > LIMITS.max_host_bytes:
            return LLMStatusCode.LLM_OUT_OF_MEMORY, "byte_cap_refused"
        return None, "register"

    def view(self, pool, offset, nblocks, dtype):
        raw = self.pools[pool][offset : offset + nblocks * WIDTH_BYTES]
        return raw.view(dtype).view(nblocks, WIDTH_BYTES // dtype.itemsize)

    @staticmethod
    def expect(call, error):
        try:
            result = call()
        except kv.LLMException as exc:
            assert error is not None, f"unexpected {exc}"
            assert exc.status_code == error, f"expected {error.name}, got {exc}"
            return None
        assert error is None, f"expected {error.name}, call succeeded"
        return result

    def compatible(self, a, b):
        return len(self.caches[a][1]) == len(self.caches[b][1]) and self.caches[a][3] == self.caches[b][3]

    # --- rules -------------------------------------------------------------------------
    @precondition(lambda self: not self.initialized)
    @rule()
    def initialize(self):
        kv.initialize(limits=LIMITS, options=OPTIONS)
        self.initialized = True

    @precondition(lambda self: self.initialized and len(self.caches) >= 3)
    @rule()
    def finalize(self):
        # Initialize again first: a no-op with the same arguments, LLM_FAILED with others.
        kv.initialize(limits=LIMITS, options=OPTIONS)
        self.expect(lambda: kv.initialize(limits=LIMITS), LLMStatusCode.LLM_FAILED)
        kv.finalize()
        RegistryMachine.events["finalize_with_caches"] += 1
        self.initialized = False
        self.caches.clear()

    @rule(
        pool=st.integers(0, POOLS - 1),
        slots=st.lists(st.integers(0, 14), min_size=1, max_size=2),
        nblocks=st.integers(4, 8),
        dtype=st.sampled_from(DTYPES),
        raw=st.booleans(),
    )
    def register(self, pool, slots, nblocks, dtype, raw):
        offsets = [s * SLOT_BYTES for s in slots]
        error, event = self.predicted_register_error(pool, offsets, nblocks)
        tensors = [self.view(pool, o, nblocks, dtype) for o in offsets]
        if raw:
            desc = CacheDesc(len(tensors), DataType.from_torch(dtype), tuple(tensors[0].shape), Placement.HOST)
            call = lambda: kv.register_kv_cache(desc, [t.data_ptr() for t in tensors])  # noqa: E731
        else:
            call = lambda: kv.register_kv_cache(tensors)  # noqa: E731
        cache = self.expect(call, error)
        RegistryMachine.events[event] += 1
        if cache is not None:
            assert cache.cache_id > self.last_id
            self.last_id = cache.cache_id
            assert cache.tensor_addrs == tuple(t.data_ptr() for t in tensors)
            self.caches[cache.cache_id] = (pool, offsets, nblocks, dtype)

    @precondition(lambda self: self.caches or not self.initialized)
    @precondition(lambda self: self.initialized)
    @rule(pool=st.integers(0, POOLS - 1), dtype=st.sampled_from(DTYPES))
    def register_until_refused(self, pool, dtype):
        """Small caches into free slots until a cap refuses one: the caps, at their edge."""
        for slot in range(POOL_BYTES // SLOT_BYTES):
            offset, nblocks = slot * SLOT_BYTES, SLOT_BYTES // WIDTH_BYTES
            error, event = self.predicted_register_error(pool, [offset], nblocks)
            if event == "overlap_refused":
                continue
            tensor = self.view(pool, offset, nblocks, dtype)
            cache = self.expect(lambda tensor=tensor: kv.register_kv_cache([tensor]), error)
            RegistryMachine.events[event] += 1
            if cache is None:
                return
            assert cache.cache_id > self.last_id
            self.last_id = cache.cache_id
            self.caches[cache.cache_id] = (pool, [offset], nblocks, dtype)

    @rule(pick=st.integers(0, 20))
    def unregister(self, pick):
        ids = sorted(self.caches)
        cache_id = ids[pick % len(ids)] if ids and pick < 18 else 10**6 + pick
        if not self.initialized:
            error = LLMStatusCode.LLM_FAILED
        else:
            error = None if cache_id in self.caches else LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
        self.expect(lambda: kv.unregister_kv_cache(cache_id), error)
        RegistryMachine.events["unregister" if error is None else "unregister_refused"] += 1
        if error is None:
            del self.caches[cache_id]

    @precondition(lambda self: self.initialized and self.caches)
    @rule(pick=st.integers(0, 100))
    def unregister_in_use(self, pick):
        """A transfer in flight (held the way remote transfers hold it) makes unregister
        time out and change nothing; the cache keeps working and unregisters afterwards."""
        cache_id = sorted(self.caches)[pick % len(self.caches)]
        kv._C.hold(cache_id)
        try:
            self.expect(lambda: kv.unregister_kv_cache(cache_id), LLMStatusCode.LLM_TIMEOUT)
            RegistryMachine.events["unregister_in_use_refused"] += 1
            assert kv.get_cache(cache_id).cache_id == cache_id
        finally:
            kv._C.unhold(cache_id)

    def pairs(self):
        ids = sorted(self.caches)
        return [(a, b) for a in ids for b in ids if a != b and self.compatible(a, b)]

    @precondition(lambda self: self.pairs())
    @rule(rnd=st.randoms(use_true_random=False), kind=st.sampled_from(["cross", "cross", "bad_index", "dup_dst"]))
    def copy_between_caches(self, rnd, kind):
        src_id, dst_id = rnd.choice(self.pairs())
        self.copy(rnd, kind, src_id, dst_id)

    @precondition(lambda self: self.caches)
    @rule(rnd=st.randoms(use_true_random=False), kind=st.sampled_from(["self", "incompatible"]))
    def copy_within_or_across_kinds(self, rnd, kind):
        ids = sorted(self.caches)
        src_id = rnd.choice(ids)
        strangers = [i for i in ids if not self.compatible(src_id, i)]
        dst_id = rnd.choice(strangers) if kind == "incompatible" and strangers else src_id
        self.copy(rnd, kind, src_id, dst_id)

    def copy(self, rnd, kind, src_id, dst_id):
        src, dst = self.caches[src_id], self.caches[dst_id]
        n = rnd.randint(1, 4)
        if dst_id == src_id:  # a copy within one cache: no block both read and written
            n = min(n, src[2] // 2)
            blocks = rnd.sample(range(src[2]), 2 * n)
            src_blocks, dst_blocks = blocks[:n], blocks[n:]
        else:
            src_blocks = [rnd.randrange(src[2]) for _ in range(n)]  # reads may repeat
            dst_blocks = rnd.sample(range(dst[2]), n)
        if kind == "bad_index":
            where = rnd.choice(["src", "dst"])
            bad = rnd.choice([-1, (src if where == "src" else dst)[2], 10**6])
            (src_blocks if where == "src" else dst_blocks)[0] = bad
        if kind == "dup_dst" and len(dst_blocks) >= 2:
            dst_blocks[1] = dst_blocks[0]

        error = None
        if not self.initialized:
            error = LLMStatusCode.LLM_FAILED
        elif not self.compatible(src_id, dst_id):
            error = LLMStatusCode.LLM_PARAM_INVALID
        elif any(not 0 <= s < src[2] for s in src_blocks) or any(not 0 <= d < dst[2] for d in dst_blocks):
            error = LLMStatusCode.LLM_PARAM_INVALID  # IndexError-type, status PARAM_INVALID
        elif len(set(dst_blocks)) != len(dst_blocks):
            error = LLMStatusCode.LLM_PARAM_INVALID
        self.expect(lambda: kv.copy_kv_blocks(src_id, dst_id, src_blocks, dst_blocks), error)
        if error is not None:
            RegistryMachine.events["copy_refused"] += 1
            return
        RegistryMachine.events["cross_cache_copy" if dst_id != src_id else "self_copy"] += 1
        for s_off, d_off in zip(src[1], dst[1]):
            chunks = [
                self.expected[src[0]][s_off + s * WIDTH_BYTES : s_off + (s + 1) * WIDTH_BYTES].clone()
                for s in src_blocks
            ]
            for d, chunk in zip(dst_blocks, chunks):
                self.expected[dst[0]][d_off + d * WIDTH_BYTES : d_off + (d + 1) * WIDTH_BYTES] = chunk

    # --- invariants --------------------------------------------------------------------
    @invariant()
    def registry_matches_model(self):
        RegistryMachine.events["steps"] += 1  # invariants run after every step
        assert kv.is_initialized() == self.initialized
        caches = kv.registered_caches()
        assert [c.cache_id for c in caches] == sorted(self.caches)
        usage = kv.usage()
        assert usage.num_caches == len(self.caches)
        assert usage.num_addrs == sum(len(c[1]) for c in self.caches.values())
        assert usage.host_bytes == sum(len(c[1]) * c[2] * WIDTH_BYTES for c in self.caches.values())
        assert usage.device_bytes == 0
        for cache in caches:
            pool, offsets, nblocks, dtype = self.caches[cache.cache_id]
            assert cache.tensor_addrs == tuple(self.pools[pool].data_ptr() + o for o in offsets)
            assert cache.cache_desc.data_type == DataType.from_torch(dtype)
            assert cache.cache_desc.shape[0] == nblocks

    @invariant()
    def memory_matches_model(self):
        for real, expected in zip(self.pools, self.expected):
            assert torch.equal(real, expected)

    def teardown(self):
        kv.finalize()


SETTINGS = settings(
    max_examples=1000 if LONG else 150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=not LONG,
)


def test_registry_matches_model():
    RegistryMachine.events.clear()
    run_state_machine_as_test(RegistryMachine, settings=SETTINGS)
    events = RegistryMachine.events
    print(dict(events))
    missing = {name: events[name] for name, least in MINIMUM_EVENTS.items() if events[name] < least}
    assert not missing, f"the run no longer exercises {missing} (saw {dict(events)})"
