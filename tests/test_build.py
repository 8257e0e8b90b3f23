"""Build checks that need no rebuild of the extension."""

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import torch_kvreg

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_setup():
    spec = importlib.util.spec_from_file_location("kvreg_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: setup() does not run
    return module


@pytest.mark.skipif(shutil.which("g++") is None or shutil.which("nm") is None, reason="needs g++ and nm")
def test_build_with_private_libstdcxx_streams_is_detected(tmp_path):
    """A library that instantiates std::ostream code itself (what the GPU machine's
    sysconfig compiler produced, crashing on error messages) is told apart from ours."""
    setup = load_setup()
    private = tmp_path / "private.so"
    source = "#include <ostream>\ntemplate std::ostream& std::ostream::_M_insert<long>(long);\n"
    subprocess.run(
        ["g++", "-shared", "-fPIC", "-x", "c++", "-", "-o", str(private)], input=source, text=True, check=True
    )
    assert setup.defines_libstdcxx_streams(str(private)) is True
    assert setup.defines_libstdcxx_streams(torch_kvreg._C.__file__) is False


def compile_through_cache(tree, cache, *extra):
    """scripts/object_cache.py compiling ``tree``/csrc/x.cpp as torch's ninja file does."""
    env = dict(
        os.environ,
        KVREG_OBJECT_CACHE=str(cache),
        KVREG_REAL_CXX="g++",
        KVREG_OBJECT_CACHE_TREE=os.pathsep.join([str(tree / "csrc"), str(tree / "build")]),
    )
    obj = tree / "build" / "x.o"
    command = [sys.executable, str(ROOT / "scripts" / "object_cache.py"), "-MMD", "-MF", f"{obj}.d", "-O1"]
    command += [f"-I{tree / 'csrc'}", *extra, "-c", "-c", str(tree / "csrc" / "x.cpp"), "-o", str(obj)]
    return subprocess.run(command, env=env, capture_output=True, text=True), obj


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_the_object_cache_reuses_a_compile_across_trees_and_only_for_the_same_input(tmp_path):
    """The wheel's build reuses the in-place build's objects: same preprocessed source and
    flags in another tree -> the stored object (a compile there would name its own path);
    a changed header or flag -> a compile; a missing header fails as the compile would."""
    cache = tmp_path / "cache"
    trees = [tmp_path / name for name in ("a", "b", "c")]
    for tree in trees:
        (tree / "csrc").mkdir(parents=True)
        (tree / "build").mkdir()
        (tree / "csrc" / "x.cpp").write_text('#include "x.h"\nconst char* where() { return __FILE__ X; }\n')
        (tree / "csrc" / "x.h").write_text('#define X "!"\n')
    a, b, c = trees

    done, first = compile_through_cache(a, cache)
    assert done.returncode == 0, done.stderr
    assert len(list(cache.glob("*.o"))) == 1 and str(a).encode() in first.read_bytes()
    done, second = compile_through_cache(b, cache)
    assert done.returncode == 0, done.stderr
    assert second.read_bytes() == first.read_bytes() and len(list(cache.glob("*.o"))) == 1
    # The dependency file names this tree's object and headers (the build tool reads it).
    target, *sources = (b / "build" / "x.o.d").read_text().replace("\\\n", " ").split()
    assert target == f"{second}:" and sorted(sources) == [str(b / "csrc" / "x.cpp"), str(b / "csrc" / "x.h")]

    (c / "csrc" / "x.h").write_text('#define X "?"\n')
    done, third = compile_through_cache(c, cache)
    assert done.returncode == 0, done.stderr
    assert str(c).encode() in third.read_bytes() and len(list(cache.glob("*.o"))) == 2
    done, fourth = compile_through_cache(b, cache, "-O2")
    assert done.returncode == 0, done.stderr
    assert str(b).encode() in fourth.read_bytes() and len(list(cache.glob("*.o"))) == 3

    (c / "csrc" / "x.h").unlink()
    done, _ = compile_through_cache(c, cache)
    assert done.returncode != 0 and "x.h" in done.stderr and len(list(cache.glob("*.o"))) == 3
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".o")] == []  # no scratch left behind


def test_the_object_cache_keeps_the_most_recently_used_objects(tmp_path):
    spec = importlib.util.spec_from_file_location("object_cache", ROOT / "scripts" / "object_cache.py")
    object_cache = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(object_cache)
    for i in range(6):
        (tmp_path / f"{i}.o").write_bytes(b"o")
        os.utime(tmp_path / f"{i}.o", (1000 + i, 1000 + i))
    os.utime(tmp_path / "0.o", (2000, 2000))  # used last
    (tmp_path / "tmp-scratch").mkdir()
    object_cache.prune(str(tmp_path), keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.o", "4.o", "5.o", "tmp-scratch"]
