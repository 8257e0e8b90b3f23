"""The C++ API (llm_datadist/llm_datadist.h + libtorch_kvreg.so): a program built with
`python -m torch_kvreg.config --cflags --libs` runs without Python and without
LD_LIBRARY_PATH; in a Python process, C++ (a component loaded with ctypes) shares the one
registry with Python and links, pulls and pushes through the Python layer; bad calls get
upstream's statuses and change nothing."""

import ctypes
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import torch_kvreg as kv
from torch_kvreg import LLMStatusCode as S
from torch_kvreg.options import UPSTREAM, Form

from remote_peer import Peer, paged, set_verify_hook

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")
u64, i64, u32, i32 = ctypes.c_uint64, ctypes.c_int64, ctypes.c_uint32, ctypes.c_int32
DT_FLOAT, DT_FLOAT16, HOST = 0, 1, 0
DECODER = 2


def config_flags(*which: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "torch_kvreg.config", *which], capture_output=True, text=True, check=True
    ).stdout
    return out.split()


def compile_cpp(source: pathlib.Path, output: pathlib.Path, *extra: str) -> None:
    command = ["c++", "-std=c++17", *extra, str(source), *config_flags("--cflags", "--libs"), "-o", str(output)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_config_command_prints_what_a_program_needs():
    flags = config_flags("--cflags", "--libs")
    include = pathlib.Path(flags[0][2:])
    assert flags[0].startswith("-I") and (include / "llm_datadist" / "llm_datadist.h").is_file()
    assert "-ltorch_kvreg" in flags and any(f.startswith("-Wl,-rpath,") for f in flags)
    usage = subprocess.run([sys.executable, "-m", "torch_kvreg.config"], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_header_needs_only_the_standard_library(tmp_path):
    source = tmp_path / "only_header.cpp"
    source.write_text('#include "llm_datadist/llm_datadist.h"\nint main() { return llm_datadist::LLM_SUCCESS; }\n')
    include = config_flags("--cflags")
    result = subprocess.run(
        ["c++", "-std=c++17", "-fsyntax-only", *include, str(source)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_demo_program_runs_without_python_or_library_path(tmp_path):
    program = tmp_path / "demo"
    compile_cpp(ROOT / "examples" / "cpp" / "llm_datadist_demo.cpp", program)
    env = {key: value for key, value in os.environ.items() if key not in ("LD_LIBRARY_PATH", "PYTHONPATH")}
    result = subprocess.run([str(program)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "DEMO OK" in result.stdout and "FAIL" not in result.stdout
    assert "libpython" not in subprocess.run(["ldd", str(program)], capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    library = tmp_path_factory.mktemp("shim") / "libcapi_shim.so"
    compile_cpp(ROOT / "tests" / "cpp" / "capi_shim.cpp", library, "-shared", "-fPIC")
    lib = ctypes.CDLL(str(library))
    p_u64, p_i64, p_str = ctypes.POINTER(u64), ctypes.POINTER(i64), ctypes.POINTER(ctypes.c_char_p)
    signatures = {
        "shim_create": (None, [u64, i32]),
        "shim_destroy": (None, []),
        "shim_initialize": (u32, [p_str, p_str, ctypes.c_int]),
        "shim_finalize": (None, []),
        "shim_set_role": (u32, [i32, ctypes.c_char_p]),
        "shim_set_role_options": (u32, [i32, p_str, p_str, ctypes.c_int]),
        "shim_register": (u32, [u32, u32, i32, p_i64, ctypes.c_int, p_u64, ctypes.c_int, p_i64]),
        "shim_unregister": (u32, [i64]),
        "shim_allocate": (u32, [u32, u32, i32, p_i64, ctypes.c_int, p_i64, p_u64]),
        "shim_deallocate": (u32, [i64]),
        "shim_copy_blocks": (u32, [i64, i64, p_u64, ctypes.c_int, p_u64, ctypes.c_int]),
        "shim_copy_cache": (u32, [i64, i64, u32, u32, u64, i64]),
        "shim_link": (u32, [u64, ctypes.c_char_p, ctypes.c_uint16, i32, ctypes.c_int]),
        "shim_unlink": (u32, [u64, i32, ctypes.c_bool]),
        "shim_pull_blocks": (u32, [u64, i64, i64, p_u64, p_u64, ctypes.c_int, i32, i32, i32, i32, ctypes.c_int]),
        "shim_pull_blocks_verify": (u32, [u64, i64, i64, p_u64, p_u64, ctypes.c_int, ctypes.c_int]),
        "shim_push_blocks": (u32, [i64, u64, i64, p_u64, p_u64, ctypes.c_int]),
        "shim_pull_cache": (u32, [u64, i64, u32, i64, u32, i64]),
        "shim_push_cache": (u32, [i64, u32, u64, i64, u32]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib


def arr(ctype, values):
    values = list(values)
    return (ctype * max(len(values), 1))(*values)


class Cpp:
    """The C++ API, one call per method, statuses as LLMStatusCode."""

    def __init__(self, lib, cluster_id=0, role=3):
        self.lib = lib
        lib.shim_create(cluster_id, role)

    def initialize(self, **options):
        keys = arr(ctypes.c_char_p, [k.encode() for k in options])
        values = arr(ctypes.c_char_p, [v.encode() for v in options.values()])
        return S(self.lib.shim_initialize(keys, values, len(options)))

    def set_role_options(self, role, **options):
        keys = arr(ctypes.c_char_p, [k.encode() for k in options])
        values = arr(ctypes.c_char_p, [v.encode() for v in options.values()])
        return S(self.lib.shim_set_role_options(role, keys, values, len(options)))

    def register(self, addrs, shape, num_tensors=None, data_type=DT_FLOAT, placement=HOST):
        cache_id = i64(-1)
        status = S(
            self.lib.shim_register(
                placement,
                len(addrs) if num_tensors is None else num_tensors,
                data_type,
                arr(i64, shape),
                len(shape),
                arr(u64, addrs),
                len(addrs),
                ctypes.byref(cache_id),
            )
        )
        return status, cache_id.value

    def __getattr__(self, name):
        function = getattr(self.lib, f"shim_{name}")
        return lambda *args: (lambda r: r if r is None else S(r))(function(*args))


def ptrs(tensors):
    return [t.data_ptr() for t in tensors]


def test_one_registry_for_cpp_and_python(shim):
    cpp = Cpp(shim)
    assert cpp.initialize(**{"llm.SyncKvCacheWaitTime": "1500"}) == S.LLM_SUCCESS
    assert kv.is_initialized() and kv.registry.option("llm.SyncKvCacheWaitTime") == "1500"
    from_cpp = [torch.arange(32.0).reshape(4, 8) + 100 * t for t in range(2)]
    status, cpp_id = cpp.register(ptrs(from_cpp), [4, 8])
    assert status == S.LLM_SUCCESS
    assert kv.usage().num_caches == 1 and kv.get_cache(cpp_id).tensor_addrs == tuple(ptrs(from_cpp))
    from_python = [torch.zeros(4, 8) for _ in range(2)]
    py_cache = kv.register_kv_cache(from_python)
    # C++ copies between a C++ and a Python registration: block 3 into groups [0] and [2].
    assert cpp.copy_blocks(cpp_id, py_cache.cache_id, arr(u64, [3]), 1, arr(u64, [0, 2]), 2) == S.LLM_SUCCESS
    assert all(torch.equal(d[0], s[3]) and torch.equal(d[2], s[3]) for d, s in zip(from_python, from_cpp))
    assert cpp.copy_cache(cpp_id, py_cache.cache_id, 1, 3, 8, 16) == S.LLM_SUCCESS  # bytes 8..24 of slot 1
    assert torch.equal(from_python[1][3, 2:6], from_cpp[1][1, 2:6]) and not from_python[1][3, :2].any()
    # Each side unregisters what the other registered.
    assert cpp.unregister(py_cache.cache_id) == S.LLM_SUCCESS
    kv.unregister_kv_cache(cpp_id)
    assert kv.usage() == kv.Usage(0, 0, 0, 0)
    cache_id, first = i64(), u64()
    assert (
        S(shim.shim_allocate(HOST, 2, DT_FLOAT16, arr(i64, [3, 5]), 2, ctypes.byref(cache_id), ctypes.byref(first)))
        == S.LLM_SUCCESS
    )
    assert kv.get_cache(cache_id.value).tensor_addrs[0] == first.value
    assert kv.usage().host_bytes == 2 * 3 * 5 * 2
    assert cpp.deallocate(cache_id.value) == S.LLM_SUCCESS and kv.usage().num_caches == 0
    cpp.finalize()
    assert not kv.is_initialized()
    cpp.destroy()


def test_register_before_initialize_fails(shim):
    cpp = Cpp(shim)
    memory = torch.zeros(8)
    assert cpp.register([memory.data_ptr()], [8]) == (S.LLM_FAILED, -1)
    assert cpp.copy_blocks(1, 2, arr(u64, [0]), 1, arr(u64, [0]), 1) == S.LLM_FAILED
    assert cpp.link(1, b"127.0.0.1", 1, 100, 1) == S.LLM_FAILED
    cpp.destroy()


def bad_calls(cpp, world):
    a, b, free = world["a"], world["b"], world["free"]
    addr = free[0].data_ptr()
    return [
        ("241 addresses", lambda: cpp.register([4096 * (i + 1) for i in range(241)], [1])[0], S.LLM_PARAM_INVALID),
        ("count mismatch", lambda: cpp.register([addr], [4], num_tensors=2)[0], S.LLM_PARAM_INVALID),
        ("null address", lambda: cpp.register([0], [4])[0], S.LLM_PARAM_INVALID),
        ("misaligned address", lambda: cpp.register([addr + 2], [4])[0], S.LLM_PARAM_INVALID),
        ("address over 63 bits", lambda: cpp.register([2**63 + 4096], [4])[0], S.LLM_PARAM_INVALID),
        ("DT_UNDEFINED", lambda: cpp.register([addr], [4], data_type=28)[0], S.LLM_PARAM_INVALID),
        ("rank 0", lambda: cpp.register([addr], [])[0], S.LLM_PARAM_INVALID),
        ("negative dim", lambda: cpp.register([addr], [-4])[0], S.LLM_PARAM_INVALID),
        ("placement 7", lambda: cpp.register([addr], [4], placement=7)[0], S.LLM_PARAM_INVALID),
        (
            "overlap with a live cache",
            lambda: cpp.register([world["a_tensors"][0].data_ptr()], [2])[0],
            S.LLM_PARAM_INVALID,
        ),
        ("unregister unknown", lambda: cpp.unregister(10**9), S.LLM_KV_CACHE_NOT_EXIST),
        ("deallocate unknown (upstream: success)", lambda: cpp.deallocate(10**9), S.LLM_SUCCESS),
        (
            "copy blocks out of range",
            lambda: cpp.copy_blocks(a, b, arr(u64, [8]), 1, arr(u64, [0]), 1),
            S.LLM_PARAM_INVALID,
        ),
        (
            "copy blocks past 2**63",
            lambda: cpp.copy_blocks(a, b, arr(u64, [2**63]), 1, arr(u64, [0]), 1),
            S.LLM_PARAM_INVALID,
        ),
        (
            "copy blocks: no destination group",
            lambda: cpp.copy_blocks(a, b, arr(u64, [0]), 1, arr(u64, []), 0),
            S.LLM_PARAM_INVALID,
        ),
        (
            "copy blocks: duplicate in a group",
            lambda: cpp.copy_blocks(a, b, arr(u64, [0, 1]), 2, arr(u64, [3, 4, 5, 5]), 2),
            S.LLM_PARAM_INVALID,
        ),
        (
            "copy blocks: second group out of range",  # checked before the first group moves
            lambda: cpp.copy_blocks(a, b, arr(u64, [0]), 1, arr(u64, [1, 9]), 2),
            S.LLM_PARAM_INVALID,
        ),
        (
            "copy blocks unknown cache",
            lambda: cpp.copy_blocks(10**9, b, arr(u64, [0]), 1, arr(u64, [0]), 1),
            S.LLM_KV_CACHE_NOT_EXIST,
        ),
        ("copy cache batch out of range", lambda: cpp.copy_cache(a, b, 8, 0, 0, -1), S.LLM_PARAM_INVALID),
        ("copy cache offset past the slot", lambda: cpp.copy_cache(a, b, 0, 0, 33, -1), S.LLM_PARAM_INVALID),
        ("copy cache offset over int64", lambda: cpp.copy_cache(a, b, 0, 0, 2**63, -1), S.LLM_PARAM_INVALID),
        ("link 17 clusters", lambda: cpp.link(1, b"127.0.0.1", 1, 100, 17), S.LLM_CLUSTER_NUM_EXCEED_LIMIT),
        ("link timeout 0", lambda: cpp.link(1, b"127.0.0.1", 1, 0, 1), S.LLM_PARAM_INVALID),
        ("unlink not linked", lambda: cpp.unlink(5, 100, False), S.LLM_NOT_YET_LINK),
        (
            "pull blocks not linked",
            lambda: cpp.pull_blocks(5, 1, a, arr(u64, [0]), arr(u64, [0]), 1, -1, -1, -1, -1, 2),
            S.LLM_NOT_YET_LINK,
        ),
        (
            "pull blocks bad layer range",
            lambda: cpp.pull_blocks(5, 1, a, arr(u64, [0]), arr(u64, [0]), 1, 2, 1, -1, -1, 2),
            S.LLM_PARAM_INVALID,
        ),
        ("push cache not linked", lambda: cpp.push_cache(a, 0, 5, 1, 0), S.LLM_NOT_YET_LINK),
        ("set role 9", lambda: cpp.set_role(9, None), S.LLM_PARAM_INVALID),
        ("initialize again, other options", lambda: cpp.initialize(**{"llm.SyncKvCacheWaitTime": "7"}), S.LLM_FAILED),
        ("initialize with an unknown option", lambda: cpp.initialize(**{"llm.Bogus": "1"}), S.LLM_PARAM_INVALID),
    ]


def test_bad_calls_get_upstream_statuses_and_change_nothing(shim):
    cpp = Cpp(shim)
    assert cpp.initialize() == S.LLM_SUCCESS
    a_tensors = [torch.randn(8, 8) for _ in range(2)]
    b_tensors = [torch.randn(8, 8) for _ in range(2)]
    world = {
        "a_tensors": a_tensors,
        "free": [torch.zeros(16)],
        "a": cpp.register(ptrs(a_tensors), [8, 8])[1],
        "b": cpp.register(ptrs(b_tensors), [8, 8])[1],
    }
    calls = bad_calls(cpp, world)
    assert len(calls) >= 25
    for name, call, expected in calls:
        before = (kv.usage(), kv.registered_caches(), [t.clone() for t in a_tensors + b_tensors])
        assert call() == expected, name
        after = (kv.usage(), kv.registered_caches(), a_tensors + b_tensors)
        assert after[:2] == before[:2], name
        assert all(torch.equal(x, y) for x, y in zip(after[2], before[2])), name
    cpp.finalize()
    cpp.destroy()


def test_options_are_read_with_the_option_table(shim):
    """Initialize and SetRole take the option table's upstream keys (torch_kvreg/options.py,
    read by its C++ copy) as LLMDataDist.init does; a key it does not take or a bad value is
    LLM_PARAM_INVALID and changes nothing."""
    for key, option in UPSTREAM.items():
        cpp = Cpp(shim, cluster_id=5)
        value, native = {
            Form.IGNORED: ("anything", None),
            Form.ADDRESS: ("", None),  # upstream's "not listening"
            Form.DEVICE_LIST: ("1;2", "1"),
            Form.SAME: ("1", "1") if option.sets == "llm.VerifyTransfers" else ("1500", "1500"),
        }[option.form]
        assert cpp.initialize(**{key: value}) == S.LLM_SUCCESS, key
        assert kv.registry.cluster_id() == 5 and kv.registry.option(option.sets or key) == native, key
        cpp.finalize()
        cpp.destroy()
    cpp = Cpp(shim)
    bad = [
        {"llm.Bogus": "1"},
        {"llm.LinkSecret": "s3cret"},  # torch_kvreg.initialize's key, not upstream's
        {"llm.SyncKvCacheWaitTime": "0"},
        {"llm.SyncKvCacheWaitTime": "2147483648"},
        {"llm.VerifyTransfers": "yes"},
        {"ge.exec.deviceId": "x;1"},
        {"ge.exec.deviceId": "1", "llm.DeviceId": "2"},
        {"llm.ListenIpInfo": "localhost:1"},  # checked by the Python layer
    ]
    for options in bad:
        assert cpp.initialize(**options) == S.LLM_PARAM_INVALID, options
        assert not kv.is_initialized(), options
    assert cpp.initialize(**{"llm.SyncKvCacheWaitTime": "1500"}) == S.LLM_SUCCESS
    assert kv.registry.option("llm.DeviceId") is None
    for options in bad[:-1] + [{"llm.ListenIpInfo": "nowhere"}]:
        assert cpp.set_role_options(DECODER, **options) == S.LLM_PARAM_INVALID, options
        assert kv.is_initialized() and kv.registry.option("llm.SyncKvCacheWaitTime") == "1500", options
    assert cpp.set_role_options(DECODER, **{"llm.MemoryUtilization": "0.9", "llm.listenIpInfo": ""}) == S.LLM_SUCCESS
    cpp.finalize()
    cpp.destroy()


@pytest.mark.skipif(not kv.remote.nixl_available(), reason="needs the nixl extra")
def test_link_pull_push_from_cpp_in_a_python_process(shim):
    peer = Peer(cluster_id=6)
    try:
        remote_id = peer.call("register", (4, 8, (16, 8), 31, True))  # 2 layers x (K, V), fp16 blocks
        theirs = paged(4, 8, (16, 8), 31)
        cpp = Cpp(shim, cluster_id=2, role=2)
        assert cpp.initialize() == S.LLM_SUCCESS
        mine = [torch.zeros(8, 16, 8, dtype=torch.float16) for _ in range(2)]  # one layer
        status, local_id = cpp.register(ptrs(mine), [8, 16, 8], data_type=DT_FLOAT16)
        assert status == S.LLM_SUCCESS
        host = peer.host.encode()
        assert cpp.link(6, host, peer.port, 3000, 1) == S.LLM_SUCCESS
        assert cpp.link(6, host, peer.port, 3000, 1) == S.LLM_ALREADY_LINK
        # Their layer 1 (inclusive pair 1..1) into our layer 0.
        assert (
            cpp.pull_blocks(6, remote_id, local_id, arr(u64, [2, 5]), arr(u64, [0, 7]), 2, 1, 1, 0, 0, 2)
            == S.LLM_SUCCESS
        )
        assert torch.equal(mine[0][[0, 7]], theirs[2][[2, 5]]) and torch.equal(mine[1][[0, 7]], theirs[3][[2, 5]])
        assert not mine[0][1:7].any()
        assert (
            cpp.pull_blocks(6, 10**6, local_id, arr(u64, [0]), arr(u64, [0]), 1, -1, -1, -1, -1, 2)
            == S.LLM_KV_CACHE_NOT_EXIST
        )
        mine[0][4].fill_(7.0)
        mine[1][4].fill_(8.0)
        assert cpp.push_blocks(local_id, 6, remote_id, arr(u64, [4]), arr(u64, [6]), 1) == S.LLM_PARAM_INVALID
        assert cpp.pull_cache(6, remote_id, 3, local_id, 1, -1) == S.LLM_PARAM_INVALID  # 4 tensors vs 2
        peer.call("unregister", remote_id)
        two = peer.call("register", (2, 8, (16, 8), 32, True))
        assert cpp.push_blocks(local_id, 6, two, arr(u64, [4]), arr(u64, [6]), 1) == S.LLM_SUCCESS
        now = peer.call("read", two)
        assert torch.all(now[0][6] == 7.0) and torch.all(now[1][6] == 8.0)
        assert cpp.pull_cache(6, two, 3, local_id, 1, -1) == S.LLM_SUCCESS
        assert torch.equal(mine[1][1], paged(2, 8, (16, 8), 32)[1][3])
        assert cpp.push_cache(local_id, 0, 6, two, 5) == S.LLM_SUCCESS
        assert torch.equal(peer.call("read", two)[0][5], mine[0][0])
        assert peer.settled_leases() == {}
        assert cpp.unlink(6, 1000, False) == S.LLM_SUCCESS
        assert cpp.pull_cache(6, two, 3, local_id, 1, -1) == S.LLM_NOT_YET_LINK
        peer.call("unregister", two)
        cpp.finalize()
        cpp.destroy()
    finally:
        peer.close()


def test_a_pull_from_cpp_verifies_when_its_ext_param_asks(shim):
    """KvCacheExtParam::verify (our extension, a byte upstream reserves): 1 compares every
    block's CRC once it landed (a byte corrupted after landing is LLM_FAILED), 0 leaves it
    to the option (unverified here: the same corruption passes), 2 is LLM_PARAM_INVALID."""
    peer = Peer(cluster_id=7)
    try:
        remote_id = peer.call("register", (2, 8, (16, 8), 33, True))
        theirs = paged(2, 8, (16, 8), 33)
        cpp = Cpp(shim, cluster_id=3, role=2)
        assert cpp.initialize() == S.LLM_SUCCESS
        mine = [torch.zeros(8, 16, 8, dtype=torch.float16) for _ in range(2)]
        status, local_id = cpp.register(ptrs(mine), [8, 16, 8], data_type=DT_FLOAT16)
        assert status == S.LLM_SUCCESS
        assert cpp.link(7, peer.host.encode(), peer.port, 3000, 1) == S.LLM_SUCCESS
        src, dst = arr(u64, [1, 4]), arr(u64, [2, 6])
        assert cpp.pull_blocks_verify(7, remote_id, local_id, src, dst, 2, 1) == S.LLM_SUCCESS
        assert torch.equal(mine[1][[2, 6]], theirs[1][[1, 4]])
        set_verify_hook({local_id: mine}, ("landed", local_id, 6))  # flips a bit once it landed
        try:
            assert cpp.pull_blocks_verify(7, remote_id, local_id, src, dst, 2, 1) == S.LLM_FAILED
            assert cpp.pull_blocks_verify(7, remote_id, local_id, src, dst, 2, 0) == S.LLM_SUCCESS
            mine[0].zero_()
            assert cpp.pull_blocks_verify(7, remote_id, local_id, src, dst, 2, 2) == S.LLM_PARAM_INVALID
            assert not mine[0].any()  # refused before any byte moved
        finally:
            set_verify_hook({}, None)
        assert cpp.unlink(7, 1000, False) == S.LLM_SUCCESS
        peer.call("unregister", remote_id)
        cpp.finalize()
        cpp.destroy()
    finally:
        peer.close()
