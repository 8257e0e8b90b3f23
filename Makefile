# torch_kvreg: `make demo` and `make test` set everything up from a bare Python 3.10+.
#
# The virtual environment reuses a torch already installed for the system Python; otherwise
# it installs $(TORCH_SPEC) (a CPU build where one is available locally). The extension is
# built in place with ninja, so a second run only rebuilds what changed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PIP := $(PY) -m pip --disable-pip-version-check -q
SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu) setup.py
EXT_STAMP := $(VENV)/.kvreg-built
DEPS_STAMP := $(VENV)/.kvreg-deps
PYTEST_ARGS ?=

.PHONY: all demo demo-pd test bench build clean

all: build

$(PY):
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "venv: reusing the system torch"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi

# torch first, alone, so that nothing below can pull in a different (multi-GB) build;
# nixl-cu12 lists torch as a requirement, which the installed torch satisfies.
$(DEPS_STAMP): $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install setuptools wheel ninja numpy pytest hypothesis
	$(PIP) install "nixl-cu12>=0.6" || echo "warning: nixl-cu12 could not be installed; remote transfers disabled"
	KVREG_SKIP_EXT=1 $(PIP) install --no-build-isolation --no-deps -e .
	@touch $@

$(EXT_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PY) setup.py -q build_ext --inplace
	@touch $@

build: $(EXT_STAMP)

demo: build
	$(PY) examples/quickstart.py

demo-pd: build
	$(PY) examples/disaggregated_prefill_decode.py

test: build
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: build
	$(PY) benchmarks/bench_register.py
	$(PY) benchmarks/bench_copy_blocks.py --json bench-copy.json

clean:
	rm -rf build build-* torch_kvreg/*.so $(EXT_STAMP)
