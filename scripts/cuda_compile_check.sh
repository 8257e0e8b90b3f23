#!/usr/bin/env bash
# Compile-and-link check of the CUDA variant against a CUDA build of torch, in its own venv
# and build folder; no GPU needed. Skips (exit 0, loudly) where nvcc or a CUDA torch is
# not to be had; fails on any compile, link or load error.
set -euo pipefail
PYTHON=${PYTHON:-python3}
CUDA_VENV=${CUDA_VENV:-.venv-cuda}
CUDA_TORCH_SPEC=${CUDA_TORCH_SPEC:-torch==2.14.1}
CUDA_ARCHS=${CUDA_ARCHS:-8.0;9.0}

if ! command -v nvcc >/dev/null; then
  echo "SKIPPED: CUDA compile check: nvcc not found"
  exit 0
fi
for dir in "${CUDA_HOME:-}" /usr/local/cuda "$(dirname "$(dirname "$(command -v nvcc)")")"; do
  if [ -n "$dir" ] && [ -f "$dir/include/cuda_runtime_api.h" ]; then
    export CUDA_HOME="$dir"
    break
  fi
done
# A CUDA build of torch takes ~5.5 GB in its venv; the build ~0.5 GB more, temporaries included.
need_mb=${CUDA_CHECK_NEED_MB:-1500}
[ -x "$CUDA_VENV/bin/python" ] || need_mb=$((need_mb + 6500))
free_mb=$(df -Pm . | awk 'NR==2 {print $4}')
tmp_free_mb=$(df -Pm "${TMPDIR:-/tmp}" | awk 'NR==2 {print $4}')
[ "$tmp_free_mb" -lt "$free_mb" ] && free_mb=$tmp_free_mb
if [ "$free_mb" -lt "$need_mb" ]; then
  echo "SKIPPED: CUDA compile check: $free_mb MB free on disk, it needs about $need_mb MB"
  exit 0
fi
[ -x "$CUDA_VENV/bin/python" ] || "$PYTHON" -m venv "$CUDA_VENV"
pip_install() { "$CUDA_VENV/bin/python" -m pip --disable-pip-version-check -q install "$@"; }
if ! "$CUDA_VENV/bin/python" -c "import torch; assert torch.version.cuda" 2>/dev/null; then
  if ! pip_install "$CUDA_TORCH_SPEC"; then
    echo "SKIPPED: CUDA compile check: $CUDA_TORCH_SPEC cannot be installed here"
    exit 0
  fi
fi
pip_install setuptools wheel ninja numpy

# CUDA headers that torch needs beyond the toolkit (cusparse.h, ...) come with its nvidia wheels.
extra_includes=$(ls -d "$PWD/$CUDA_VENV"/lib/python*/site-packages/nvidia/cu*/include 2>/dev/null | tr '\n' ':')
export CPATH="${extra_includes}${CPATH:-}"
rm -rf build-cuda/pkg && mkdir -p build-cuda/pkg
# CFLAGS stands in for Python's own compile flags (-g -O3 -DNDEBUG ...); the extension's own
# (-O3 -Wall ...) still apply. No debug info: half the compile time, and nothing here is
# debugged (asserts stay compiled in).
CFLAGS="-g0" KVREG_CUDA=1 TORCH_CUDA_ARCH_LIST="$CUDA_ARCHS" MAX_JOBS=2 "$CUDA_VENV/bin/python" setup.py -q build_ext \
  --build-temp build-cuda/temp --build-lib build-cuda/pkg
cp -r torch_kvreg/*.py torch_kvreg/remote torch_kvreg/llm_datadist torch_kvreg/include build-cuda/pkg/torch_kvreg/
# Loads and runs the host paths of the CUDA build (no GPU here: copies stay on the CPU).
PYTHONPATH=build-cuda/pkg "$CUDA_VENV/bin/python" -P -c "
import torch, torch_kvreg as kv
assert kv._C.with_cuda and 'build-cuda' in kv._C.__file__, kv._C.__file__
kv.initialize()
t = torch.arange(32.0).reshape(8, 4)
c = kv.register_kv_cache(t)
kv.copy_kv_blocks(c, c, [0], [1])
assert torch.equal(t[1], t[0])
print('CUDA build compiles, links and loads:', kv._C.__file__)
"
