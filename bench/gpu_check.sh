#!/usr/bin/env bash
# GPU check: is it right, and how fast? For a CUDA machine with torch, triton and pytest installed
# and no package registry; runs from a bare checkout (nothing is installed: PYTHONPATH is used).
#
#   bash bench/gpu_check.sh                  # OUT=dir for everything (default ./gpu_check_out)
#
# Parts, each with its own time slice; each writes its results as it goes and is stopped with
# SIGINT (pytest then still writes its junit xml and its failure report):
#   0  environment; in the background: Triton kernels of the smoke part compiled in parallel into
#      Triton's cache, and (only when nvcc and ninja exist) the CUDA extension for this GPU's arch
#   a  bench/gpu_smoke.py: parity at the benchmark shapes vs the float64 reference (verdict in
#      about a minute; D = 768 and SDPA's D = 768 baseline in subprocesses)
#   b  pytest -m "gpu and not slow" tests/test_triton_gpu.py (most informative tests first)
#      b and d run pytest through bench/pytest_isolated.py: a test that kills the process is
#      reported as crashed and the tests after it still run
#   c  bench/gpu_bench.py: TFLOP/s vs SDPA flash, every timed output checked, tuned configs kept
#   d  the CUDA extension's GPU tests and benchmark, when it built
# Then OUT/summary.md: pass/fail per part and the TFLOP/s table (bench/gpu_summary.py).
#
# Environment:
#   OUT                  output directory
#   PYTHON               interpreter (default python3, else python)
#   GPU_CHECK_BUDGET     total seconds to aim for (default 500; the parts' slices scale with it)
#   GPU_CHECK_BUILD_EXT  0 = skip the CUDA extension (default 1: built when nvcc and ninja exist)
#   GPU_CHECK_REHEARSAL  1 = rehearse on a machine without a GPU: Triton's interpreter, tiny
#                        shapes, no CUDA extension (what `make test` runs)
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
command -v "$PY" > /dev/null 2>&1 || PY=python
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export OUT
BUDGET=${GPU_CHECK_BUDGET:-500}
REHEARSAL=${GPU_CHECK_REHEARSAL:-0}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
unset ROLLINGQ_BACKEND
if [ "$REHEARSAL" = 1 ]; then
  export TRITON_INTERPRET=1 GPU_CHECK_REHEARSAL=1
else
  unset TRITON_INTERPRET
fi
PARTS="$OUT/parts.tsv"
: > "$PARTS"
T0=$SECONDS
elapsed() { echo $((SECONDS - T0)); }
left() { echo $((BUDGET - (SECONDS - T0))); }
step() { echo; echo "== $* (t=$(elapsed) s)"; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >> "$PARTS"; }
# slice NOMINAL: a part's limit, scaled to the budget (NOMINAL is for the default 500 s)
slice() { echo $(( $1 * BUDGET / 500 )); }
# run_part NAME LIMIT LOG CMD...: SIGINT at LIMIT, SIGKILL 20 s later; output to LOG and stdout
run_part() {
  local name=$1 limit=$2 log=$3; shift 3
  local t=$SECONDS
  timeout -s INT -k 20 "$limit" "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "-- $name stopped by its ${limit} s limit"
  record "$name" "$rc" $((SECONDS - t))
  return 0
}

# crash_note PART LOG: when a test of PART killed its process (bench/pytest_isolated.py reran
# the others), say so in the summary; for compiled code, also whether a minimal extension built
# by this machine's compiler crashes the same way (bench/toolchain_probe.py)
crash_note() {
  local crashed
  crashed=$(grep -c '^CRASHED: ' "$2" 2> /dev/null)
  [ "${crashed:-0}" -gt 0 ] || return 0
  local note="$crashed test(s) crashed their process (CRASHED lines in $(basename "$2"))"
  if [ "$1" = "tests:cuda" ] && [ "$(left)" -gt 90 ]; then
    timeout 80 "$PY" bench/toolchain_probe.py > "$OUT/toolchain_probe.log" 2>&1
    note="$note; toolchain probe: $(grep '^VERDICT' "$OUT/toolchain_probe.log" | cut -c10-150)"
  fi
  record "$1:crashes" 1 0 "$note"
}

step "environment"
"$PY" - << 'EOF' 2>&1 | tee "$OUT/environment.txt"
import os, platform, shutil, sys
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    sys.exit(f"triton cannot be imported: {exc}")
print("nvcc", shutil.which("nvcc") or os.environ.get("CUDA_HOME", "-"), "ninja", shutil.which("ninja"))
if not torch.cuda.is_available():
    if os.environ.get("GPU_CHECK_REHEARSAL") == "1":
        print("no CUDA device: rehearsal (Triton interpreter, tiny shapes)")
        sys.exit(0)
    sys.exit("no CUDA device: this check needs a GPU (GPU_CHECK_REHEARSAL=1 rehearses it)")
p = torch.cuda.get_device_properties(0)
print("device", p.name, "sm_%d%d" % (p.major, p.minor), "SMs", p.multi_processor_count,
      "memory %.0f GiB" % (p.total_memory / 2**30))
EOF
[ "${PIPESTATUS[0]}" = 0 ] || { echo "environment check failed"; exit 2; }
ARCH=$("$PY" -c "import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0); print(c[0] * 10 + c[1])")
NCPU=$(nproc 2> /dev/null || echo 4)

# -- background: compile the smoke part's kernels in parallel into Triton's cache; the CUDA build
WARM_PID=
if [ "$REHEARSAL" != 1 ] && [ "$ARCH" -ge 80 ]; then
  WARM_ARCH=$ARCH
  [ "$ARCH" -gt 90 ] && WARM_ARCH=90
  ( "$PY" bench/compile_check.py --warm --set smoke --arch "$WARM_ARCH" --jobs $((NCPU > 12 ? 12 : NCPU)) \
      > "$OUT/warm_compile.log" 2>&1 ) &
  WARM_PID=$!
fi
BUILD_PID=
CUDA_NOTE=
if [ "$REHEARSAL" = 1 ]; then
  CUDA_NOTE="rehearsal: no CUDA extension"
elif [ "${GPU_CHECK_BUILD_EXT:-1}" != 1 ]; then
  CUDA_NOTE="GPU_CHECK_BUILD_EXT=0"
elif ! { command -v nvcc > /dev/null 2>&1 || [ -x "${CUDA_HOME:-/nonexistent}/bin/nvcc" ]; }; then
  CUDA_NOTE="no nvcc: CUDA extension not built"
elif ! { command -v ninja > /dev/null 2>&1 || "$PY" -c "import ninja" > /dev/null 2>&1; }; then
  CUDA_NOTE="no ninja: CUDA extension not built"
else
  TORCH_ARCH="$((ARCH / 10)).$((ARCH % 10))"
  [ "$ARCH" = 90 ] && TORCH_ARCH="9.0a"
  echo "building the CUDA extension in the background for $TORCH_ARCH (build_ext.log)"
  ( TORCH_CUDA_ARCH_LIST="$TORCH_ARCH" MAX_JOBS=$((NCPU > 8 ? NCPU / 2 : 4)) timeout 420 \
      "$PY" setup.py build_ext --inplace > "$OUT/build_ext.log" 2>&1; echo $? > "$OUT/build_ext.rc" ) &
  BUILD_PID=$!
fi
if [ -n "$WARM_PID" ]; then
  # the smoke part starts after its kernels are compiled (or after 60 s, whichever is first)
  for _ in $(seq 60); do kill -0 "$WARM_PID" 2> /dev/null || break; sleep 1; done
  tail -1 "$OUT/warm_compile.log"
fi

step "a) smoke and parity: bench/gpu_smoke.py"
SMOKE_ARGS=()
[ "$REHEARSAL" = 1 ] && SMOKE_ARGS=(--rehearsal)
run_part smoke "$(slice 150)" "$OUT/smoke.log" "$PY" bench/gpu_smoke.py --out "$OUT" "${SMOKE_ARGS[@]}"

step "b) GPU tests: pytest -m 'gpu and not slow' tests/test_triton_gpu.py (untuned configs)"
if [ "$REHEARSAL" = 1 ]; then
  # no GPU: the GPU tests skip; a quick interpreter test stands in, to exercise the reporting
  run_part "tests:triton" "$(slice 120)" "$OUT/pytest_triton.log" "$PY" bench/pytest_isolated.py \
    --junitxml="$OUT/pytest_triton.xml" -- tests/test_triton_gpu.py \
    tests/test_triton_memory_safety.py -k "gpu or checker" -rfE -p no:cacheprovider
  crash_note "tests:triton" "$OUT/pytest_triton.log"
else
  ROLLINGQ_TRITON_AUTOTUNE=0 run_part "tests:triton" "$(slice 130)" "$OUT/pytest_triton.log" \
    "$PY" bench/pytest_isolated.py --junitxml="$OUT/pytest_triton.xml" -- -m "gpu and not slow" \
    tests/test_triton_gpu.py -rfE -p no:cacheprovider
  crash_note "tests:triton" "$OUT/pytest_triton.log"
fi

step "c) benchmark: bench/gpu_bench.py (autotuned, outputs checked)"
CUDA_RESERVE=0
[ -n "$BUILD_PID" ] && CUDA_RESERVE=$(slice 80)
BENCH_LIMIT=$(( $(left) - CUDA_RESERVE - 10 ))
[ "$BENCH_LIMIT" -gt "$(slice 200)" ] && BENCH_LIMIT=$(slice 200)
[ "$BENCH_LIMIT" -lt 60 ] && BENCH_LIMIT=60
BENCH_ARGS=()
[ "$REHEARSAL" = 1 ] && BENCH_ARGS=(--dry-run --only d16)
run_part bench "$BENCH_LIMIT" "$OUT/gpu_bench.log" "$PY" bench/gpu_bench.py --out "$OUT" \
  --budget $((BENCH_LIMIT - 45)) "${BENCH_ARGS[@]}"

step "d) CUDA extension"
if [ -z "$BUILD_PID" ]; then
  echo "$CUDA_NOTE"
  record "cuda" skip 0 "$CUDA_NOTE"
else
  WAIT=$(( $(left) - 60 ))
  [ "$WAIT" -lt 0 ] && WAIT=0
  for _ in $(seq "$WAIT"); do kill -0 "$BUILD_PID" 2> /dev/null || break; sleep 1; done
  if kill -0 "$BUILD_PID" 2> /dev/null; then
    echo "the CUDA build did not finish in time (build_ext.log)"
    kill "$BUILD_PID" 2> /dev/null
    record "cuda" 124 0 "build did not finish in time"
  elif [ "$(cat "$OUT/build_ext.rc" 2> /dev/null)" != 0 ]; then
    echo "the CUDA build failed (build_ext.log)"; tail -5 "$OUT/build_ext.log"
    record "cuda" 1 0 "build failed: see build_ext.log"
  else
    run_part "tests:cuda" "$(slice 50)" "$OUT/pytest_cuda.log" "$PY" bench/pytest_isolated.py \
      --junitxml="$OUT/pytest_cuda.xml" -- -m gpu tests/test_cuda_gpu.py --maxfail=10 -rfE \
      -p no:cacheprovider
    crash_note "tests:cuda" "$OUT/pytest_cuda.log"
    run_part "cuda bench" "$(slice 25)" "$OUT/cuda_bench.log" "$PY" -m bench.cuda_bench
  fi
fi
[ -n "$WARM_PID" ] && kill "$WARM_PID" 2> /dev/null

step "summary ($OUT/summary.md)"
"$PY" bench/gpu_summary.py "$OUT"
RC=$?
echo "total $(elapsed) s; outputs in $OUT"
exit $RC
