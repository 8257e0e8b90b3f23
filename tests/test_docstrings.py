"""The runnable example in every public docstring keeps running."""

import doctest
import importlib

import pytest

MODULES = [
    "torch_kvreg.errors",
    "torch_kvreg.types",
    "torch_kvreg.registry",
    "torch_kvreg.transfer",
    "torch_kvreg.inflight",
    "torch_kvreg.remote.api",
    "torch_kvreg.config",
    "torch_kvreg.options",
    "torch_kvreg.llm_datadist",
    "torch_kvreg.llm_datadist.config",
    "torch_kvreg.llm_datadist.types",
    "torch_kvreg.llm_datadist.datadist",
    "torch_kvreg.llm_datadist.session",
    "torch_kvreg.layouts",
    "torch_kvreg.geometry",
    "torch_kvreg.remote.plan",
    "torch_kvreg.vllm.settings",  # imports vllm (its package does)
    "torch_kvreg.vllm.shapes",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0
    assert result.failed == 0
