"""Verified transfers (torch_kvreg.verify): the native CRC-32C against known values and a
pure-Python reference; local copies and remote pulls and pushes (same-host and NIXL paths)
pass clean, and catch bytes corrupted after landing and a source block its owner
overwrote between its CRC and the move, naming exactly those blocks; a verify that is not
a bool is LLM_PARAM_INVALID and moves nothing; the process option verifies every transfer."""

import random

import pytest
import torch

import torch_kvreg as kv
from torch_kvreg import _C, CacheIndex, LLMStatusCode, verify
from torch_kvreg.remote import protocol

from remote_peer import flip_byte, linked_to, paged, running_peer, set_verify_hook

BLOCK = (16, 2, 32)  # 2 KiB fp16 blocks
FAILED = LLMStatusCode.LLM_FAILED


def crc32c_reference(data: bytes, crc: int = 0) -> int:
    """CRC-32C bit by bit (reflected polynomial 0x82F63B78)."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


# --- the checksum ------------------------------------------------------------------------
# RFC 3720 (iSCSI) appendix B.4, and the usual check value.
KNOWN = [
    (b"123456789", 0xE3069283),
    (b"", 0),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]


@pytest.mark.parametrize("portable", [False, True])
def test_crc32c_known_values(portable):
    for data, expected in KNOWN:
        assert _C.crc32c(data, 0, portable) == expected, data
    assert crc32c_reference(b"123456789") == 0xE3069283
    assert _C.crc32c_implementation() in ("pclmulqdq", "sse4.2", "portable")


def test_crc32c_matches_the_reference_at_odd_lengths_and_alignments():
    rng = random.Random(24)
    # Around the native code's boundaries (PCLMULQDQ folding from 256 bytes in 64-byte
    # rounds, crc32 strides of 3 x 256 and 3 x 4096 bytes) and beyond.
    lengths = [0, 1, 7, 8, 9, 63, 64, 65, 255, 256, 257, 319, 320, 321, 383, 767, 768, 769, 1536]
    lengths += [12287, 12288, 12289, 24583, 40000]
    lengths += [rng.randrange(1, 50_000) for _ in range(10)]
    checked = 0
    for length in lengths:
        buffer = rng.randbytes(length + 16)
        for start in (0, 1, 3, 5, 7, 8):
            view = memoryview(buffer)[start : start + length]
            expected = crc32c_reference(bytes(view))
            assert _C.crc32c(view) == expected, (length, start)
            assert _C.crc32c(view, 0, True) == expected, (length, start)
            cut = rng.randrange(0, length + 1)  # continuing from a CRC is the CRC of the whole
            assert _C.crc32c(view[cut:], _C.crc32c(view[:cut])) == expected
            checked += 1
    assert checked == len(lengths) * 6


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


IMPLEMENTATIONS = ["pclmulqdq", "sse4.2", "portable"]


@pytest.fixture
def forced_crc():
    """Forces a CRC-32C implementation (the test hook), then the CPU's pick again."""
    yield _C._test_force_crc32c_implementation
    _C._test_force_crc32c_implementation("auto")


def test_every_crc32c_implementation_matches_the_reference_and_the_others(forced_crc):
    """Each implementation this CPU runs, forced in turn (the CPU alone would pick one):
    known values, then lengths around every stride boundary (PCLMULQDQ's 256-byte start
    and 64-byte rounds, the three crc32 streams' 3 x 256 and 3 x 4096 bytes) and random
    ones, at several alignments, continued from a CRC, and the CRC of cache blocks; all
    agree with the bit-by-bit reference and so with each other."""
    flags = cpu_flags()
    runs_here = {
        "pclmulqdq": {"pclmulqdq", "sse4_2"} <= flags,
        "sse4.2": "sse4_2" in flags,
        "portable": True,
    }
    rng = random.Random(2424)
    lengths = [0, 1, 7, 8, 9, 63, 64, 65, 255, 256, 257, 319, 320, 767, 768, 769, 1023, 1536, 1537]
    lengths += [3 * 4096 - 1, 3 * 4096, 3 * 4096 + 1, 3 * 4096 + 3 * 256 + 17, 2 * 3 * 4096 + 9, 32768, 40000]
    lengths += [rng.randrange(1, 50_000) for _ in range(8)]
    cases = []
    for length in lengths:
        buffer = rng.randbytes(length + 16)
        start = rng.choice((0, 1, 3, 5, 7, 8))
        view = memoryview(buffer)[start : start + length]
        cases.append((view, crc32c_reference(bytes(view)), rng.randrange(0, length + 1)))
    kv.initialize()
    try:
        tensors = paged(2, 4, (64, 8, 32), 9)  # 32 KiB blocks
        cache = kv.register_kv_cache(tensors)
        block_bytes = [bytes(t.view(torch.uint8).reshape(4, -1)[2].numpy()) for t in tensors]
        block_crc = crc32c_reference(block_bytes[1], crc32c_reference(block_bytes[0]))
        checked = {}
        for name in IMPLEMENTATIONS:
            if not runs_here[name]:
                with pytest.raises(ValueError, match="cannot run"):
                    forced_crc(name)
                continue
            forced_crc(name)
            assert _C.crc32c_implementation() == name
            for data, expected in KNOWN:
                assert _C.crc32c(data) == expected, (name, data)
            for view, expected, cut in cases:
                assert _C.crc32c(view) == expected, (name, len(view))
                assert _C.crc32c(view[cut:], _C.crc32c(view[:cut])) == expected, (name, len(view), cut)
            assert verify.checksums(cache.cache_id, None, [2]) == [block_crc], name
            checked[name] = len(cases)
        assert set(checked) == {name for name in IMPLEMENTATIONS if runs_here[name]}
        assert all(count == len(lengths) for count in checked.values())
    finally:
        kv.finalize()
    for bad in ("avx512", "", "Portable"):
        with pytest.raises(ValueError):
            forced_crc(bad)
    forced_crc("auto")
    assert _C.crc32c_implementation() in runs_here and _C.crc32c(b"123456789") == 0xE3069283


def test_checksum_blocks_chains_the_selected_tensors_in_order():
    kv.initialize()
    try:
        tensors = paged(3, 8, BLOCK, 5)
        cache = kv.register_kv_cache(tensors)
        raw = [t.view(torch.uint8).reshape(8, -1) for t in tensors]

        def expected(block, order, offset=0, size=None):
            crc = 0
            for t in order:
                row = bytes(raw[t][block].numpy())
                crc = crc32c_reference(row[offset : None if size is None else offset + size], crc)
            return crc

        assert verify.checksums(cache.cache_id, None, [0, 7, 3]) == [expected(b, [0, 1, 2]) for b in (0, 7, 3)]
        assert verify.checksums(cache.cache_id, [2, 0], torch.tensor([5])) == [expected(5, [2, 0])]
        assert verify.checksums(cache.cache_id, None, [1], 100, 12) == [expected(1, [0, 1, 2], 12, 100)]
        for bad, kind in (([8], IndexError), ([-1], IndexError)):
            with pytest.raises(kv.LLMException) as info:
                kv.errors.raises_llm(verify.checksums)(cache.cache_id, None, bad)
            assert info.value.status_code == LLMStatusCode.LLM_PARAM_INVALID and isinstance(info.value, kind)
        with pytest.raises(kv.LLMIndexError):
            kv.errors.raises_llm(verify.checksums)(cache.cache_id, [3], [0])
        with pytest.raises(kv.LLMParamInvalidError):
            kv.errors.raises_llm(verify.checksums)(cache.cache_id, None, [0], cache.cache_desc.block_nbytes + 1)
    finally:
        kv.finalize()


# --- local copies --------------------------------------------------------------------------
@pytest.fixture
def local_pair():
    kv.initialize()
    src = paged(4, 16, BLOCK, 1)
    dst = [torch.zeros(16, *BLOCK, dtype=torch.float16) for _ in range(4)]
    yield kv.register_kv_cache(src), src, kv.register_kv_cache(dst), dst
    verify.source_checksummed = verify.landing_checked = None
    kv.finalize()


def test_clean_local_copies_pass_verified(local_pair):
    a, src, b, dst = local_pair
    kv.copy_kv_blocks(a, b, [3, 0, 9], [1, 2, 15], verify=True)
    assert all(torch.equal(dst[t][[1, 2, 15]], src[t][[3, 0, 9]]) for t in range(4))
    kv.copy_kv_blocks(a, b, [4], [4], layers=range(1, 2), verify=True)
    assert torch.equal(dst[2][4], src[2][4]) and not torch.equal(dst[0][4], src[0][4])
    transfer = kv.copy_kv_blocks_async(a, b, [5, 6], [5, 6], verify=True)
    assert transfer.wait(5000) == 2 * 4 * a.cache_desc.block_nbytes and transfer.failed_blocks == []
    kv.swap_blocks(a, b, {7: 8}, verify=True)
    kv.copy_kv_cache(a, b, 10, 11, 64, 128, verify=True)
    assert torch.equal(dst[3][11].view(torch.uint8).flatten()[64:192], src[3][10].view(torch.uint8).flatten()[64:192])


def test_a_verified_local_copy_takes_each_blocks_crcs_around_its_copy(local_pair):
    """Between HOST caches a verified copy is one pass: block by block, the source CRC,
    the copy, the landed CRC (the hooks run in those windows, per block, in that order)."""
    a, src, b, dst = local_pair
    events = []

    def source(cache_id, blocks):
        assert cache_id == a.cache_id and len(blocks) == 1
        # The block has not moved yet: its destination still holds what it held.
        events.append(("source", blocks[0], bool(torch.equal(dst[0][pairs[blocks[0]]], src[0][blocks[0]]))))

    def landed(cache_id, blocks):
        assert cache_id == b.cache_id and len(blocks) == 1
        events.append(("landed", blocks[0]))

    pairs = {3: 1, 9: 2, 4: 3}
    verify.source_checksummed, verify.landing_checked = source, landed
    kv.copy_kv_blocks(a, b, list(pairs), list(pairs.values()), verify=True)
    assert events == [e for s_, d_ in pairs.items() for e in (("source", s_, False), ("landed", d_))]
    assert all(torch.equal(dst[t][[1, 2, 3]], src[t][[3, 9, 4]]) for t in range(4))


def test_a_verified_local_copy_moves_nothing_on_bad_input(local_pair):
    a, src, b, dst = local_pair
    calls = [
        (lambda: kv.copy_kv_blocks(a, b, [1, 16], [1, 2], verify=True), IndexError),
        (lambda: kv.copy_kv_blocks(a, b, [1, 2], [3, 3], verify=True), ValueError),
        (lambda: kv.copy_kv_blocks(a, a, [1, 2], [2, 5], verify=True), ValueError),
        (lambda: kv.copy_kv_blocks(a, b, [1], [1, 2], verify=True), ValueError),
        (lambda: kv.copy_kv_cache(a, b, 1, 1, 0, a.cache_desc.block_nbytes + 1, verify=True), ValueError),
        (lambda: kv.copy_kv_blocks_async(a, b, [1, 16], [1, 2], verify=True), IndexError),
    ]
    for call, kind in calls:
        with pytest.raises(kv.LLMException) as info:
            call()
        assert info.value.status_code == LLMStatusCode.LLM_PARAM_INVALID and isinstance(info.value, kind)
    assert all(not t.any() for t in dst)
    before = [t.clone() for t in src]
    with pytest.raises(ValueError):  # the tensor selections must pair up
        _C.copy_blocks_verified(a.cache_id, b.cache_id, torch.tensor([1]), torch.tensor([1]), [0, 1], [0])
    assert all(torch.equal(x, y) for x, y in zip(before, src)) and all(not t.any() for t in dst)


def hooked(where, tensors_of, block):
    """Sets verify's ``where`` hook ("source" or "landed") to flip a bit of ``block`` of
    the cache whose tensors ``tensors_of`` maps its id to."""
    set_verify_hook(tensors_of, (where, next(iter(tensors_of)), block))


@pytest.mark.parametrize("where", ["landed", "source"])
def test_local_copies_catch_a_changed_block_and_name_it(local_pair, where):
    a, src, b, dst = local_pair
    changed = {"landed": (b.cache_id, dst, 2), "source": (a.cache_id, src, 9)}[where]
    hooked(where, {changed[0]: changed[1]}, changed[2])
    failing = 2  # the destination block that receives (or is) the changed one
    with pytest.raises(kv.LLMException) as info:
        kv.copy_kv_blocks(a, b, [3, 9, 4], [1, 2, 3], verify=True)
    assert info.value.status_code == FAILED and info.value.failed_blocks == [failing]
    assert "destination blocks [2]" in str(info.value)
    transfer = kv.copy_kv_blocks_async(a, b, [3, 9, 4], [1, 2, 3], verify=True)
    with pytest.raises(kv.LLMException) as info:
        transfer.wait(5000)
    assert transfer.status == FAILED and transfer.failed_blocks == [failing] and info.value.failed_blocks == [failing]
    # Unverified, the same change goes unnoticed: the comparison is what caught it.
    kv.copy_kv_blocks(a, b, [3, 9, 4], [1, 2, 3])
    kv.copy_kv_blocks_async(a, b, [3, 9, 4], [1, 2, 3]).wait(5000)


def test_local_slice_copy_catches_a_corrupted_byte_in_its_range_only(local_pair):
    a, src, b, dst = local_pair
    hooked("landed", {b.cache_id: dst}, 11)  # flips byte 0 of the slice
    kv.copy_kv_cache(a, b, 10, 11, 64, 128, verify=True)  # byte 0 is outside the bytes compared
    with pytest.raises(kv.LLMException) as info:
        kv.copy_kv_cache(a, b, 10, 11, 0, 128, verify=True)
    assert info.value.failed_blocks == [11]


BAD_VERIFY = [1, 0, "yes", None, 1.0, [True]]


@pytest.mark.parametrize("bad", BAD_VERIFY)
def test_a_verify_that_is_no_bool_is_refused_before_any_byte_moves(local_pair, bad):
    a, src, b, dst = local_pair
    calls = [
        lambda: kv.copy_kv_blocks(a, b, [1], [1], verify=bad),
        lambda: kv.copy_kv_blocks_async(a, b, [1], [1], verify=bad),
        lambda: kv.copy_kv_cache(a, b, 1, 1, verify=bad),
        lambda: kv.swap_blocks(a, b, {1: 1}, verify=bad),
    ]
    for call in calls:
        with pytest.raises(kv.LLMException) as info:
            call()
        assert info.value.status_code == LLMStatusCode.LLM_PARAM_INVALID and isinstance(info.value, TypeError)
    assert all(not t.any() for t in dst)


def test_the_process_option_verifies_every_local_copy():
    with pytest.raises(kv.LLMParamInvalidError):
        kv.initialize(options={"llm.VerifyTransfers": "yes"})
    assert not kv.is_initialized()
    kv.initialize(options={"llm.VerifyTransfers": "1"})
    try:
        dst = [torch.zeros(4, 8)]
        a, b = kv.register_kv_cache([torch.ones(4, 8)]), kv.register_kv_cache(dst)
        hooked("landed", {b.cache_id: dst}, 3)
        with pytest.raises(kv.LLMException) as info:
            kv.copy_kv_blocks(a, b, [0, 1], [2, 3])  # verify not given: the option asks
        assert info.value.failed_blocks == [3]
    finally:
        verify.source_checksummed = verify.landing_checked = None
        kv.finalize()
    assert verify.always is False  # finalize forgets the option


# --- remote transfers ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def peer():
    with running_peer(17) as p:
        yield p


@pytest.fixture(params=["same_host", "nixl"])
def path(request, monkeypatch):
    if request.param == "nixl":
        monkeypatch.setenv("TORCH_KVREG_SAME_HOST_COPY", "0")
    return request.param


@pytest.fixture
def linked(path, peer):
    with linked_to(peer, wait_ms=3000):
        yield path
    peer.call("verify_hook", None)
    verify.source_checksummed = verify.landing_checked = None


def mirrored(peer, num_blocks=16, seed=3):
    remote_id = peer.call("register", (4, num_blocks, BLOCK, seed, True))
    mine = [torch.zeros(num_blocks, *BLOCK, dtype=torch.float16) for _ in range(4)]
    return CacheIndex(peer.cluster_id, remote_id), paged(4, num_blocks, BLOCK, seed), mine, kv.register_kv_cache(mine)


def test_clean_remote_transfers_pass_verified(peer, linked):
    remote, theirs, mine, local = mirrored(peer)
    block = local.cache_desc.block_nbytes
    assert kv.pull_kv_blocks(remote, local, [1, 2, 9], [4, 5, 0], verify=True) == 3 * 4 * block
    assert all(torch.equal(mine[t][[4, 5, 0]], theirs[t][[1, 2, 9]]) for t in range(4))
    transfer = kv.pull_kv_blocks_async(remote, local, [3], [3], layers=range(1, 2), verify=True)
    assert transfer.wait(5000) == 2 * block and transfer.failed_blocks == []
    assert torch.equal(mine[2][3], theirs[2][3]) and not mine[0][3].any()
    assert kv.pull_kv_cache(CacheIndex(peer.cluster_id, remote.cache_id, 7), local, 8, verify=True) == 4 * block
    assert kv.pull_kv_cache_async(remote, local, 6, size=256, verify=True).wait(5000) == 4 * 256
    for t in range(4):
        mine[t][12] = 7.0 + t
    assert kv.push_kv_blocks(local, remote, [12], [13], verify=True) == 4 * block
    assert kv.push_kv_blocks_async(local, remote, [12, 4], [14, 15], verify=True).wait(5000) == 8 * block
    written = peer.call("read", remote.cache_id)
    assert all(torch.all(written[t][13] == 7.0 + t) and torch.equal(written[t][15], theirs[t][1]) for t in range(4))
    assert kv.remote.current_engine().paths == {linked: 6}
    peer.call("unregister", remote.cache_id)


@pytest.mark.parametrize("blocking", [True, False])
def test_a_pull_catches_bytes_corrupted_after_landing(peer, linked, blocking):
    remote, theirs, mine, local = mirrored(peer)
    hooked("landed", {local.cache_id: mine}, 5)
    error, transfer = failure(
        lambda: kv.pull_kv_blocks(remote, local, [1, 2, 3], [4, 5, 6], verify=True),
        lambda: kv.pull_kv_blocks_async(remote, local, [1, 2, 3], [4, 5, 6], verify=True),
        blocking,
    )
    assert error.status_code == FAILED and error.failed_blocks == [5]
    assert transfer is None or transfer.failed_blocks == [5]
    peer.call("unregister", remote.cache_id)


def failure(blocking_call, async_call, blocking):
    """The LLMException of the failing call, and its Transfer (None when blocking)."""
    transfer = None
    with pytest.raises(kv.LLMException) as info:
        if blocking:
            blocking_call()
        else:
            transfer = async_call()
            transfer.wait(5000)
    return info.value, transfer


@pytest.mark.parametrize("blocking", [True, False])
def test_a_pull_catches_a_source_block_its_owner_overwrote_before_it_moved(peer, linked, blocking):
    remote, theirs, mine, local = mirrored(peer)
    peer.call("verify_hook", ("source", remote.cache_id, 2))  # the peer changes it after its CRC
    error, transfer = failure(
        lambda: kv.pull_kv_blocks(remote, local, [1, 2, 3], [4, 5, 6], verify=True),
        lambda: kv.pull_kv_blocks_async(remote, local, [1, 2, 3], [4, 5, 6], verify=True),
        blocking,
    )
    assert error.failed_blocks == [5] and "destination blocks [5]" in str(error)
    flip_byte(theirs, 2)  # what landed is the overwritten block
    assert torch.equal(mine[0][5], theirs[0][2]) and torch.equal(mine[0][4], theirs[0][1])
    peer.call("unregister", remote.cache_id)


@pytest.mark.parametrize("blocking", [True, False])
def test_a_push_catches_bytes_corrupted_after_landing(peer, linked, blocking):
    remote, theirs, mine, local = mirrored(peer)
    peer.call("verify_hook", ("landed", remote.cache_id, 11))
    error, transfer = failure(
        lambda: kv.push_kv_blocks(local, remote, [0, 1], [10, 11], verify=True),
        lambda: kv.push_kv_blocks_async(local, remote, [0, 1], [10, 11], verify=True),
        blocking,
    )
    assert error.failed_blocks == [11]
    assert transfer is None or transfer.failed_blocks == [11]
    peer.call("unregister", remote.cache_id)


@pytest.mark.parametrize("blocking", [True, False])
def test_a_push_catches_a_source_block_overwritten_before_it_moved(peer, linked, blocking):
    remote, theirs, mine, local = mirrored(peer)
    hooked("source", {local.cache_id: mine}, 1)
    error, transfer = failure(
        lambda: kv.push_kv_blocks(local, remote, [0, 1], [10, 11], verify=True),
        lambda: kv.push_kv_blocks_async(local, remote, [0, 1], [10, 11], verify=True),
        blocking,
    )
    assert error.failed_blocks == [11]
    peer.call("unregister", remote.cache_id)


def test_a_corrupted_slice_pull_is_caught(peer, linked):
    remote, theirs, mine, local = mirrored(peer)
    hooked("landed", {local.cache_id: mine}, 8)
    with pytest.raises(kv.LLMException) as info:
        kv.pull_kv_cache(CacheIndex(peer.cluster_id, remote.cache_id, 7), local, 8, verify=True)
    assert info.value.failed_blocks == [8]
    peer.call("unregister", remote.cache_id)


@pytest.mark.parametrize("bad", BAD_VERIFY)
def test_a_remote_verify_that_is_no_bool_is_refused_before_any_byte_moves(peer, linked, bad):
    remote, theirs, mine, local = mirrored(peer)
    calls = [
        lambda: kv.pull_kv_blocks(remote, local, [1], [1], verify=bad),
        lambda: kv.pull_kv_blocks_async(remote, local, [1], [1], verify=bad),
        lambda: kv.push_kv_blocks(local, remote, [1], [1], verify=bad),
        lambda: kv.push_kv_blocks_async(local, remote, [1], [1], verify=bad),
        lambda: kv.pull_kv_cache(remote, local, 1, verify=bad),
        lambda: kv.pull_kv_cache_async(remote, local, 1, verify=bad),
    ]
    kv.pull_kv_blocks(remote, local, [2], [2])  # (a same-host route exists: bad input skips it too)
    for call in calls:
        with pytest.raises(kv.LLMException) as info:
            call()
        assert info.value.status_code == LLMStatusCode.LLM_PARAM_INVALID and isinstance(info.value, TypeError)
    assert not mine[0][1].any() and torch.equal(peer.call("read", remote.cache_id)[0][1], theirs[0][1])
    peer.call("unregister", remote.cache_id)


def test_a_negative_remote_block_is_refused_here_and_the_link_stays_up(peer, linked):
    """A checksums request may not carry a block below 0 (the peer would take it as a
    broken link): a verified transfer refuses it as an unverified one does."""
    remote, theirs, mine, local = mirrored(peer)
    calls = [
        lambda: kv.pull_kv_blocks(remote, local, [0, -1], [0, 1], verify=True),
        lambda: kv.pull_kv_blocks_async(remote, local, [-3], [1], verify=True),
        lambda: kv.push_kv_blocks(local, remote, [0, 1], [0, -1], verify=True),
        lambda: kv.pull_kv_cache(CacheIndex(peer.cluster_id, remote.cache_id, -1), local, 1, verify=True),
    ]
    for call in calls:
        with pytest.raises(kv.LLMException) as info:
            call()
        assert info.value.status_code == LLMStatusCode.LLM_PARAM_INVALID and isinstance(info.value, IndexError)
        assert "-1 is out of range" in str(info.value) or "-3 is out of range" in str(info.value)
    assert not any(t.any() for t in mine)
    assert kv.pull_kv_blocks(remote, local, [2], [2], verify=True) == 4 * local.cache_desc.block_nbytes
    assert torch.equal(mine[1][2], theirs[1][2])
    peer.call("unregister", remote.cache_id)


def test_the_peer_describes_only_its_remote_accessible_caches(peer, linked):
    private = peer.call("register", (4, 16, BLOCK, 3, False))
    local = kv.register_kv_cache([torch.zeros(16, *BLOCK, dtype=torch.float16) for _ in range(4)])
    link = kv.remote.current_engine().link_for(peer.cluster_id)
    for ref in (private, 10**6):
        with pytest.raises(kv.LLMException) as info:
            kv.remote.verify.ask(link, ref, [0], None, 2, -1, landed=False)
        assert info.value.status_code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
    with pytest.raises(kv.LLMException) as info:
        kv.pull_kv_blocks(CacheIndex(peer.cluster_id, private), local, [0], [0], verify=True)
    assert info.value.status_code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
    peer.call("unregister", private)


def test_the_process_option_verifies_every_remote_transfer(peer, path):
    kv.initialize(cluster_id=3, options={"llm.SyncKvCacheWaitTime": "3000", "llm.VerifyTransfers": "1"})
    try:
        assert kv.link_clusters([peer.info])[0] == LLMStatusCode.LLM_SUCCESS
        remote, theirs, mine, local = mirrored(peer)
        kv.pull_kv_blocks(remote, local, [1], [1])
        kv.pull_kv_blocks(remote, local, [1], [1])  # (a same-host route would skip the check)
        peer.call("verify_hook", ("landed", remote.cache_id, 9))
        with pytest.raises(kv.LLMException) as info:
            kv.push_kv_blocks(local, remote, [1], [9])  # verify not given
        assert info.value.failed_blocks == [9]
        peer.call("unregister", remote.cache_id)
    finally:
        peer.call("verify_hook", None)
        kv.finalize()


# --- the wire ---------------------------------------------------------------------------------
def test_checksums_records_round_trip_and_refuse_malformed_fields():
    request = protocol.Checksums(5, None, (1, 2, 3), (0, 2), 2, -1, True)
    assert protocol.parse_request(protocol.decode(protocol.encode(request.to_wire())[4:])) == request
    keyed = protocol.Checksums(None, "req-1", (), None, 2, 512, False, True)
    assert protocol.parse_request(keyed.to_wire()) == keyed
    wire = request.to_wire()
    for field, value in [
        ("blocks", [1, True]),
        ("blocks", [-1]),
        ("blocks", "1"),
        ("blocks", list(range(protocol.MAX_CHECKSUM_BLOCKS + 1))),
        ("landed", 1),
        ("layers", [0]),
        ("layers", [0, 1, 2]),
        ("size", -2),
        ("tensors_per_layer", 0),
    ]:
        with pytest.raises(protocol.ProtocolError):
            protocol.parse_request({**wire, field: value})
    reply = protocol.ChecksumsReply((0, 2**32 - 1))
    assert protocol.ChecksumsReply.parse(reply.to_wire(), 2) == reply
    for crcs, count in (([0, 2**32], 2), ([0], 2), ([-1], 1), ([0.5], 1)):
        with pytest.raises(protocol.ProtocolError):
            protocol.ChecksumsReply.parse({"ok": True, "crcs": crcs}, count)
    assert protocol.VERSION in protocol.HISTORY and "checksums" in protocol.HISTORY[2]
