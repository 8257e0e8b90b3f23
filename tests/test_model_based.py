"""Model-based test: random sequences of registry and copy calls against a pure-Python model.

The caches are views into a few byte pools; the model keeps the bytes the pools must hold,
so every step checks the ids, usage(), registered_caches() and every byte of memory, not
only the registered parts. CI runs at least 2,000 steps; KVREG_LONG=1 at least 40,000.
"""

import os

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

import torch_kvreg as kv
from torch_kvreg import CacheDesc, DataType, LLMStatusCode, Placement

LONG = os.environ.get("KVREG_LONG") == "1"
POOLS, POOL_BYTES = 3, 4096
LIMITS = kv.Limits(max_addrs=12, max_device_bytes=0, max_host_bytes=6000)
DTYPES = [torch.float32, torch.int8]
# Mostly valid block indices, sometimes out of range.
BLOCK = st.one_of(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3), st.sampled_from([-1, 8, 10**6]))
WIDTH_BYTES = 16  # every block is 16 bytes, whatever the dtype


class Model:
    def __init__(self):
        self.initialized = False
        self.caches = {}  # id -> (pool, [byte offsets], nblocks, dtype)
        self.last_id = 0


class RegistryMachine(RuleBasedStateMachine):
    steps = 0

    def __init__(self):
        super().__init__()
        kv.finalize()
        self.pools = [torch.randint(0, 256, (POOL_BYTES,), dtype=torch.uint8) for _ in range(POOLS)]
        self.expected = [p.clone() for p in self.pools]
        self.model = Model()

    # --- helpers -----------------------------------------------------------------------
    def ranges(self, pool, offsets, nblocks):
        return [(pool, o, o + nblocks * WIDTH_BYTES) for o in offsets]

    def predicted_register_error(self, pool, offsets, nblocks):
        if not self.model.initialized:
            return LLMStatusCode.LLM_FAILED
        new = self.ranges(pool, offsets, nblocks)
        for i, (p, s, e) in enumerate(new):
            for (p2, s2, e2) in new[:i]:
                if p == p2 and s < e2 and s2 < e:
                    return LLMStatusCode.LLM_PARAM_INVALID
        for c_pool, c_offsets, c_blocks, _ in self.model.caches.values():
            for (p, s, e) in new:
                for (p2, s2, e2) in self.ranges(c_pool, c_offsets, c_blocks):
                    if p == p2 and s < e2 and s2 < e:
                        return LLMStatusCode.LLM_PARAM_INVALID
        addrs = sum(len(c[1]) for c in self.model.caches.values()) + len(offsets)
        nbytes = sum(len(c[1]) * c[2] * WIDTH_BYTES for c in self.model.caches.values())
        if addrs > LIMITS.max_addrs or nbytes + len(offsets) * nblocks * WIDTH_BYTES > LIMITS.max_host_bytes:
            return LLMStatusCode.LLM_OUT_OF_MEMORY
        return None

    def view(self, pool, offset, nblocks, dtype):
        raw = self.pools[pool][offset:offset + nblocks * WIDTH_BYTES]
        return raw.view(dtype).view(nblocks, WIDTH_BYTES // dtype.itemsize)

    def expect(self, call, error):
        try:
            result = call()
        except kv.LLMException as exc:
            assert error is not None, f"unexpected {exc}"
            assert exc.status_code == error, f"expected {error.name}, got {exc}"
            return None
        assert error is None, f"expected {error.name}, call succeeded"
        return result

    # --- rules -------------------------------------------------------------------------
    @rule()
    def initialize(self):
        kv.initialize(limits=LIMITS)
        self.model.initialized = True

    @rule()
    def finalize(self):
        kv.finalize()
        self.model.initialized = False
        self.model.caches.clear()

    @rule(pool=st.integers(0, POOLS - 1), slots=st.lists(st.integers(0, 63), min_size=1, max_size=2),
          nblocks=st.integers(4, 8), dtype=st.sampled_from(DTYPES), raw=st.booleans())
    def register(self, pool, slots, nblocks, dtype, raw):
        offsets = [s * 64 for s in slots]
        offsets = [o for o in offsets if o + nblocks * WIDTH_BYTES <= POOL_BYTES] or [0]
        error = self.predicted_register_error(pool, offsets, nblocks)
        tensors = [self.view(pool, o, nblocks, dtype) for o in offsets]
        if raw:
            desc = CacheDesc(len(tensors), DataType.from_torch(dtype), tuple(tensors[0].shape), Placement.HOST)
            call = lambda: kv.register_kv_cache(desc, [t.data_ptr() for t in tensors])  # noqa: E731
        else:
            call = lambda: kv.register_kv_cache(tensors)  # noqa: E731
        cache = self.expect(call, error)
        if cache is not None:
            assert cache.cache_id > self.model.last_id
            self.model.last_id = cache.cache_id
            assert cache.tensor_addrs == tuple(t.data_ptr() for t in tensors)
            self.model.caches[cache.cache_id] = (pool, offsets, nblocks, dtype)

    @rule(pick=st.integers(0, 20))
    def unregister(self, pick):
        ids = sorted(self.model.caches)
        cache_id = ids[pick % len(ids)] if ids and pick < 16 else 10**6 + pick
        if not self.model.initialized:
            error = LLMStatusCode.LLM_FAILED
        else:
            error = None if cache_id in self.model.caches else LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
        self.expect(lambda: kv.unregister_kv_cache(cache_id), error)
        if error is None:
            del self.model.caches[cache_id]

    @precondition(lambda self: len(self.model.caches) >= 1)
    @rule(a=st.integers(0, 100), b=st.integers(0, 100),
          pairs=st.lists(st.tuples(BLOCK, BLOCK), max_size=5))
    def copy(self, a, b, pairs):
        ids = sorted(self.model.caches)
        src_id, dst_id = ids[a % len(ids)], ids[b % len(ids)]
        src, dst = self.model.caches[src_id], self.model.caches[dst_id]
        src_blocks, dst_blocks = [p[0] for p in pairs], [p[1] for p in pairs]
        error = None
        if not self.model.initialized:
            error = LLMStatusCode.LLM_FAILED
        elif len(src[1]) != len(dst[1]) or src[3] != dst[3]:
            error = LLMStatusCode.LLM_PARAM_INVALID
        elif any(not 0 <= s < src[2] for s in src_blocks) or any(not 0 <= d < dst[2] for d in dst_blocks):
            error = LLMStatusCode.LLM_PARAM_INVALID
        elif len(set(dst_blocks)) != len(dst_blocks):
            error = LLMStatusCode.LLM_PARAM_INVALID
        elif src_id == dst_id and set(src_blocks) & set(dst_blocks):
            error = LLMStatusCode.LLM_PARAM_INVALID
        self.expect(lambda: kv.copy_kv_blocks(src_id, dst_id, src_blocks, dst_blocks), error)
        if error is None:
            for s_off, d_off in zip(src[1], dst[1]):
                for s, d in zip(src_blocks, dst_blocks):
                    chunk = self.expected[src[0]][s_off + s * WIDTH_BYTES:s_off + (s + 1) * WIDTH_BYTES].clone()
                    self.expected[dst[0]][d_off + d * WIDTH_BYTES:d_off + (d + 1) * WIDTH_BYTES] = chunk

    # --- invariants --------------------------------------------------------------------
    @invariant()
    def registry_matches_model(self):
        RegistryMachine.steps += 1  # invariants run after every step
        assert kv.is_initialized() == self.model.initialized
        caches = kv.registered_caches()
        assert [c.cache_id for c in caches] == sorted(self.model.caches)
        usage = kv.usage()
        assert usage.num_caches == len(self.model.caches)
        assert usage.num_addrs == sum(len(c[1]) for c in self.model.caches.values())
        assert usage.host_bytes == sum(len(c[1]) * c[2] * WIDTH_BYTES for c in self.model.caches.values())
        assert usage.device_bytes == 0
        for cache in caches:
            pool, offsets, nblocks, dtype = self.model.caches[cache.cache_id]
            assert cache.tensor_addrs == tuple(self.pools[pool].data_ptr() + o for o in offsets)
            assert cache.cache_desc.data_type == DataType.from_torch(dtype)

    @invariant()
    def memory_matches_model(self):
        for real, expected in zip(self.pools, self.expected):
            assert torch.equal(real, expected)

    def teardown(self):
        kv.finalize()


SETTINGS = settings(
    max_examples=1000 if LONG else 100,
    stateful_step_count=50 if LONG else 40,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=not LONG,
)


def test_registry_matches_model():
    RegistryMachine.steps = 0
    run_state_machine_as_test(RegistryMachine, settings=SETTINGS)
    assert RegistryMachine.steps >= (40_000 if LONG else 2_000)
