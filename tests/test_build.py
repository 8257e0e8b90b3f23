"""Build checks that need no rebuild of the extension."""

import importlib.util
import pathlib
import shutil
import subprocess

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
