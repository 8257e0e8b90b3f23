#!/usr/bin/env bash
# One pass on a machine with a CUDA GPU, sized to fit a short lease: build the CUDA
# extension in place, run the tests with CUDA placements, the block-copy benchmark, then
# the rest of the suite. What it reports lands in $OUT (default gpu-out/): gpu.txt,
# build.log, tests-cuda.log, bench.log, bench-gpu.json, tests-rest.log.
#
#     bash scripts/gpu_check.sh            # PYTHON=..., TORCH_CUDA_ARCH_LIST=9.0 by default
set -uo pipefail
OUT=${OUT:-gpu-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  echo "cpus $(nproc)"
} | tee "$OUT/gpu.txt"

# The system compiler, not the one Python's sysconfig names (on the lent machines that one
# links a private libstdc++; setup.py refuses such a build).
export CC=${CC:-gcc} CXX=${CXX:-g++} LDSHARED=${LDSHARED:-g++ -shared}
SECONDS=0
if ! KVREG_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=$(nproc) \
    "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi
echo "build: ${SECONDS} s"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import torch_kvreg as kv; assert kv._C.with_cuda and kv._C.cuda_available(), kv._C.__file__" || exit 1

status=0
stage() {  # stage NAME SECONDS COMMAND...: runs with a time limit, keeps the log, shows its tail
  local name=$1 limit=$2
  shift 2
  SECONDS=0
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc, ${SECONDS} s"
  tail -"${TAIL:-25}" "$OUT/$name.log"
  [ "$rc" -eq 0 ] || status=1
}

stage tests-cuda "${CUDA_TEST_LIMIT:-180}" "$PY" -m pytest -q -p no:cacheprovider --tb=short -rs \
  tests/test_copy_blocks.py tests/test_registry.py
stage bench "${BENCH_LIMIT:-200}" "$PY" benchmarks/bench_copy_blocks.py --json "$OUT/bench-gpu.json"
[ -n "${SKIP_REST:-}" ] && exit $status
TAIL=12 stage tests-rest "${REST_LIMIT:-120}" "$PY" -m pytest -q -p no:cacheprovider --tb=short -n 8 \
  --ignore=tests/test_copy_blocks.py --ignore=tests/test_registry.py tests
exit $status
