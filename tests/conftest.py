import subprocess
import sys

import pytest
import torch

import torch_kvreg


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run the long profiles too")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="long profile: pass --run-slow")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def fresh_registry():
    """Every test starts and ends with a finalized registry, and draws the same random
    tensors in every run."""
    torch_kvreg.finalize()
    torch.manual_seed(0)
    yield
    torch_kvreg.finalize()


@pytest.fixture
def kv():
    torch_kvreg.initialize()
    return torch_kvreg


@pytest.fixture
def through_nixl(monkeypatch):
    """Transfers to peers on this host go through NIXL, as to another host, instead of the
    direct same-host copies (for tests of the NIXL path itself). List it before fixtures
    that link."""
    monkeypatch.setenv("TORCH_KVREG_SAME_HOST_COPY", "0")


def devices():
    """Devices present on this machine."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def snapshot():
    """What a failed call must leave unchanged."""
    return torch_kvreg.usage(), torch_kvreg.registered_caches(), torch_kvreg.is_initialized()


def run_python(code: str) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter (imports, aborts and exit hooks are per process)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
