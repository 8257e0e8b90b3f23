"""torch.ops.llm inside torch.compile(fullgraph=True), opcheck, and notebook-style imports."""

import pytest
import torch

import torch_kvreg as kv

from conftest import run_python

BACKENDS = ["aot_eager", "inductor"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled(fn, backend):
    return torch.compile(fn, backend=backend, fullgraph=True)


def next_id():
    """The id the next registration will get (ids increase by one per registration)."""
    probe = kv.register_kv_cache(torch.zeros(1))
    kv.unregister_kv_cache(probe)
    return probe.cache_id + 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_register_and_unregister_once_per_call(kv, backend):
    def step(k, v):
        cache_id = torch.ops.llm.register_kv_cache([k, v])
        torch.ops.llm.unregister_kv_cache(cache_id)
        return k.sum()

    fn = compiled(step, backend)
    k, v = torch.zeros(4, 8), torch.zeros(4, 8)
    for _call in range(1, 4):
        start = next_id()
        fn(k, v)
        assert kv.usage() == kv.Usage(0, 0, 0, 0)
        assert next_id() == start + 2  # exactly one registration (plus the probe) per call


@pytest.mark.parametrize("backend", BACKENDS)
def test_unused_result_still_registers_real_pointers(kv, backend):
    def step(k, v):
        torch.ops.llm.register_kv_cache([k, v])
        return k * 2

    fn = compiled(step, backend)
    k, v = torch.randn(4, 8), torch.randn(4, 8)
    out = fn(k, v)
    assert torch.equal(out, k * 2)
    (cache,) = kv.registered_caches()
    assert cache.tensor_addrs == (k.data_ptr(), v.data_ptr())


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_run_in_program_order(kv, backend):
    """Each re-registration reuses memory that only the unregister just before it freed, so
    moving any unregister later (or a register earlier) makes a register fail with an
    overlap; the ids show the registers kept their order."""

    def step(a, b):
        first = torch.ops.llm.register_kv_cache([a])
        second = torch.ops.llm.register_kv_cache([b])
        torch.ops.llm.unregister_kv_cache(first)
        third = torch.ops.llm.register_kv_cache([a])
        torch.ops.llm.unregister_kv_cache(second)
        fourth = torch.ops.llm.register_kv_cache([b])
        return a + 1, third, fourth

    fn = compiled(step, backend)
    a, b = torch.zeros(2, 2), torch.zeros(3, 2)
    _, third, fourth = fn(a, b)
    caches = kv.registered_caches()
    assert [x.tensor_addrs[0] for x in caches] == [a.data_ptr(), b.data_ptr()]
    assert [x.cache_id for x in caches] == [int(third), int(fourth)]
    assert int(fourth) == int(third) + 1  # first and second came before both
    assert int(third) >= 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_id_flows_into_copy_and_reads_see_new_values(kv, backend):
    def step(src, dst, src_blocks, dst_blocks):
        src_id = torch.ops.llm.register_kv_cache([src])
        dst_id = torch.ops.llm.register_kv_cache([dst])
        torch.ops.llm.copy_kv_blocks(src_id, dst_id, src_blocks, dst_blocks)
        seen = dst[1].clone()  # read right after the copy, inside the graph
        torch.ops.llm.unregister_kv_cache(src_id)
        torch.ops.llm.unregister_kv_cache(dst_id)
        return seen

    fn = compiled(step, backend)
    src, dst = torch.arange(32.0).reshape(4, 8), torch.zeros(4, 8)
    seen = fn(src, dst, torch.tensor([3]), torch.tensor([1]))
    assert torch.equal(seen, src[3])
    assert torch.equal(dst[1], src[3])
    assert kv.usage().num_caches == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_keep_their_type_inside_graphs(kv, backend):
    a = kv.register_kv_cache(torch.zeros(4, 2))
    b = kv.register_kv_cache(torch.zeros(4, 2))

    def step(src_blocks, dst_blocks):
        torch.ops.llm.copy_kv_blocks(a.cache_id, b.cache_id, src_blocks, dst_blocks)
        return src_blocks + 1

    fn = compiled(step, backend)
    with pytest.raises(IndexError, match="^LLM_PARAM_INVALID: src_blocks"):
        fn(torch.tensor([7]), torch.tensor([0]))
    with pytest.raises(ValueError, match="^LLM_PARAM_INVALID: dst_blocks names block 1"):
        fn(torch.tensor([0, 2]), torch.tensor([1, 1]))


def test_opcheck_stateless_ops(kv):
    a = kv.register_kv_cache([torch.randn(4, 8) for _ in range(2)])
    b = kv.register_kv_cache([torch.zeros(4, 8) for _ in range(2)])
    result = torch.library.opcheck(
        torch.ops.llm.copy_kv_blocks.default, (a.cache_id, b.cache_id, torch.tensor([0, 2]), torch.tensor([3, 1]))
    )
    assert set(result.values()) == {"SUCCESS"}
    result = torch.library.opcheck(torch.ops.llm.copy_kv_cache.default, (a.cache_id, b.cache_id, 1, 2, 8, 8))
    assert set(result.values()) == {"SUCCESS"}


STATEFUL_UTILS = ("test_schema", "test_faketensor", "test_autograd_registration")


@pytest.mark.parametrize("util", STATEFUL_UTILS)
def test_opcheck_register_ops(kv, util):
    tensors = [torch.zeros(4, 4), torch.zeros(4, 4)]
    result = torch.library.opcheck(torch.ops.llm.register_kv_cache.default, (tensors,), test_utils=(util,))
    assert result == {util: "SUCCESS"}
    kv.finalize()
    kv.initialize()
    buffer = torch.zeros(16)
    args = (1, int(kv.DataType.DT_FLOAT), [16], int(kv.Placement.HOST), -1, [buffer.data_ptr()])
    result = torch.library.opcheck(torch.ops.llm.register_kv_cache.addrs, args, test_utils=(util,))
    assert result == {util: "SUCCESS"}


@pytest.mark.parametrize("util", STATEFUL_UTILS)
def test_opcheck_unregister(kv, util):
    cache = kv.register_kv_cache(torch.zeros(4))
    result = torch.library.opcheck(torch.ops.llm.unregister_kv_cache.default, (cache.cache_id,), test_utils=(util,))
    assert result == {util: "SUCCESS"}


def test_import_twice_and_reload_do_not_abort():
    code = (
        "import importlib, torch\n"
        "import torch_kvreg\n"
        "import torch_kvreg as again\n"
        "importlib.reload(torch_kvreg._ops)\n"
        "importlib.reload(torch_kvreg)\n"
        "torch_kvreg.initialize()\n"
        "c = torch_kvreg.register_kv_cache(torch.zeros(4))\n"
        "print('ok', c.cache_id, torch_kvreg.usage().num_caches)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "ok 1 1" in result.stdout


def test_second_copy_of_the_library_shares_the_first(tmp_path):
    """A second build (a stale copy, another build folder) loaded beside the first: its _C
    binds to the core library already loaded (same soname), so nothing is defined twice,
    nothing aborts, and both see one registry, in either order of loading."""
    import pathlib
    import shutil

    other = tmp_path / "other"
    (other / "lib").mkdir(parents=True)
    shutil.copy(kv._C.__file__, other / "_C.so")
    core = pathlib.Path(kv._C.__file__).parent / "lib" / "libtorch_kvreg.so"
    shutil.copy(core, other / "lib" / core.name)
    load_copy = (
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('other._C', {str(other / '_C.so')!r})\n"
        "copy = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(copy)\n"
    )
    use_both = (
        "torch_kvreg.initialize()\n"
        "copy.register_tensors([torch.zeros(4)], False, -1, [])\n"
        "torch_kvreg.register_kv_cache(torch.zeros(2))\n"
        "print('shared', torch_kvreg.usage().num_caches, copy.usage().num_caches)\n"
    )
    for code in (
        "import torch, torch_kvreg\n" + load_copy + use_both,
        "import torch\n" + load_copy + "import torch_kvreg\n" + use_both,
    ):
        result = run_python(code)
        assert result.returncode == 0, result.stderr
        assert "shared 2 2" in result.stdout, result.stdout


def test_effect_registration_falls_back_on_older_torch(monkeypatch):
    """Releases without torch.library._register_effectful_op (torch 2.11 on the GPU
    machines) take the effect from torch._higher_order_ops.effects."""
    from torch._higher_order_ops import effects

    from torch_kvreg import _ops

    calls = []
    original = effects._register_effectful_op
    monkeypatch.delattr(torch.library, "_register_effectful_op", raising=False)
    monkeypatch.setattr(
        effects, "_register_effectful_op", lambda op, effect: calls.append((op, effect)) or original(op, effect)
    )
    _ops._mark_ordered("llm::register_kv_cache.addrs")
    assert calls == [(torch.ops.llm.register_kv_cache.addrs, effects._EffectType.ORDERED)]
