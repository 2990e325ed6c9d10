#!/usr/bin/env bash
# GPU check of the Triton and CUDA backends, for a CUDA machine with torch and triton already
# installed and no package registry: install the package without downloading anything, build the
# C++/CUDA extensions, run the GPU tests (pytest marker `gpu`: tests/test_triton_gpu.py, then
# tests/test_cuda_gpu.py when the CUDA extension built), then the benchmarks (bench/gpu_bench.py,
# bench/cuda_bench.py). Designed to finish within 8 minutes on an H200.
#
#   bash bench/gpu_check.sh
#
# Environment:
#   OUT                  where logs, junit xml and benchmark json/markdown go (default ./gpu_check_out)
#   PYTHON               interpreter to use (default python3, else python)
#   GPU_CHECK_BUDGET     total seconds to aim for (default 450)
#   GPU_CHECK_BUILD_EXT  1 (default) = build the C++/CUDA extensions (setup.py build_ext --inplace);
#                        a failed build is reported and the Triton checks go on; 0 = Triton only
#   GPU_CHECK_REHEARSAL  1 = rehearse the script on a machine without a GPU: no install, GPU tests
#                        skipped, benchmark in --dry-run mode through Triton's interpreter
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
command -v "$PY" > /dev/null 2>&1 || PY=python
OUT=${OUT:-$ROOT/gpu_check_out}
BUDGET=${GPU_CHECK_BUDGET:-450}
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
unset ROLLINGQ_BACKEND
REHEARSAL=${GPU_CHECK_REHEARSAL:-0}
BENCH_ARGS=()
if [ "$REHEARSAL" = 1 ]; then
  export TRITON_INTERPRET=1
  BENCH_ARGS=(--dry-run)
else
  unset TRITON_INTERPRET
fi
T0=$SECONDS
step() { echo; echo "== $* (t=$((SECONDS - T0)) s)"; }
left() { echo $((BUDGET - (SECONDS - T0))); }

step "environment"
"$PY" - << 'EOF' 2>&1 | tee "$OUT/environment.txt"
import os, platform, sys
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    sys.exit(f"triton cannot be imported: {exc}")
if not torch.cuda.is_available():
    if os.environ.get("GPU_CHECK_REHEARSAL") == "1":
        print("no CUDA device: rehearsal only")
        sys.exit(0)
    sys.exit("no CUDA device: this check needs a GPU")
p = torch.cuda.get_device_properties(0)
print("device", p.name, "sm_%d%d" % (p.major, p.minor), "SMs", p.multi_processor_count,
      "memory %.0f GiB" % (p.total_memory / 2**30))
EOF
if [ "${PIPESTATUS[0]}" != 0 ]; then echo "environment check failed"; exit 2; fi

step "install (no download, no extension build)"
if [ "$REHEARSAL" = 1 ]; then
  echo "rehearsal: not installing; the checks use PYTHONPATH=$ROOT"
elif ROLLINGQ_NO_EXT=1 timeout 120 "$PY" -m pip install --no-build-isolation --no-deps --no-index \
    -e . > "$OUT/install.log" 2>&1; then
  echo "installed in editable mode"
else
  echo "pip install did not work (see install.log); the checks use PYTHONPATH=$ROOT"
fi
CUDA_EXT=0
if [ "${GPU_CHECK_BUILD_EXT:-1}" = 1 ] && [ "$REHEARSAL" != 1 ]; then
  step "C++/CUDA extensions"
  if MAX_JOBS=${MAX_JOBS:-16} timeout 240 "$PY" setup.py build_ext --inplace \
      > "$OUT/build_ext.log" 2>&1; then
    echo "extensions built"
    CUDA_EXT=1
  else
    echo "extension build failed (see build_ext.log); the Triton checks go on"
  fi
fi
"$PY" -c "import rollingq_kernels.triton_attention as ta; \
print('triton backend:', ta.unavailable_reason() or 'available')" || exit 2

step "GPU tests: pytest -m gpu tests/test_triton_gpu.py (untuned configs)"
# the benchmarks keep at least 210 s (and the CUDA step 90 s when its extension built); tests are
# ordered so a time limit cuts the least important
TEST_LIMIT=$(( $(left) - 210 - 90 * CUDA_EXT ))
[ "$TEST_LIMIT" -gt 200 ] && TEST_LIMIT=200
[ "$TEST_LIMIT" -lt 60 ] && TEST_LIMIT=60
ROLLINGQ_TRITON_AUTOTUNE=0 timeout "$TEST_LIMIT" "$PY" -m pytest -m gpu tests/test_triton_gpu.py \
  -q -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml" 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
TEST_RC=${PIPESTATUS[0]}
[ "$TEST_RC" = 124 ] && echo "pytest stopped after ${TEST_LIMIT} s (time limit)"

CUDA_RC=skipped
if [ "$CUDA_EXT" = 1 ]; then
  step "CUDA backend: pytest -m gpu tests/test_cuda_gpu.py, then bench/cuda_bench.py"
  "$PY" -c "import rollingq_kernels.cuda_attention as ca; \
print('cuda backend:', ca.unavailable_reason() or 'available')"
  timeout 60 "$PY" -m pytest -m gpu tests/test_cuda_gpu.py -x -q -p no:cacheprovider \
    --junitxml="$OUT/pytest_cuda.xml" 2>&1 | tee "$OUT/pytest_cuda.log" | tail -25
  CUDA_RC=${PIPESTATUS[0]}
  timeout 30 "$PY" -m bench.cuda_bench 2>&1 | tee "$OUT/cuda_bench.log" | tail -15
fi

step "benchmark: bench/gpu_bench.py (autotuned)"
BENCH_LIMIT=$(left)
[ "$BENCH_LIMIT" -lt 60 ] && BENCH_LIMIT=60
timeout "$BENCH_LIMIT" "$PY" bench/gpu_bench.py --out "$OUT" --budget $((BENCH_LIMIT - 45)) \
  "${BENCH_ARGS[@]}" 2>&1 | tee "$OUT/gpu_bench.log"
BENCH_RC=${PIPESTATUS[0]}
[ "$BENCH_RC" = 124 ] && echo "benchmark stopped after ${BENCH_LIMIT} s (time limit)"

step "done"
echo "pytest rc=$TEST_RC  cuda pytest rc=$CUDA_RC  benchmark rc=$BENCH_RC  total $((SECONDS - T0)) s  outputs in $OUT"
[ "$TEST_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
