#!/usr/bin/env bash
# The CPU library under AddressSanitizer + UndefinedBehaviorSanitizer (`make sanitize`).
#
# Builds rollingq_kernels/_C with -fsanitize=address,undefined into build/sanitize (CMake, the
# same sources and flags as the normal build plus the sanitizers; the normal library in
# rollingq_kernels/ is not touched), then runs the kernel, raw-op, hardening and fuzz tests in a
# Python process that loads the sanitized library and only it: the package is imported from
# build/sanitize/pkg, a folder of links to the Python sources beside the sanitized _C.so.
#
# The interpreter and torch are not instrumented, so the ASan runtime is preloaded
# (LD_PRELOAD, from the compiler that built the library); leak detection is off (CPython keeps
# objects alive until exit). Any sanitizer report aborts the run with a non-zero status.
#
# Environment: PY (python with torch, default .venv/bin/python), CXX (default c++), MAX_JOBS,
# SANITIZE_TESTS (pytest arguments, default the four test files below), ROLLINGQ_FUZZ_EXAMPLES.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
CXX=${CXX:-c++}
OUT=$ROOT/build/sanitize
SAN_FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"

command -v cmake >/dev/null || { echo "sanitize: cmake is needed (apt-get install cmake)" >&2; exit 1; }
libasan=$("$CXX" -print-file-name=libasan.so)
libubsan=$("$CXX" -print-file-name=libubsan.so)
if [ ! -e "$libasan" ] || [ ! -e "$libubsan" ]; then
  echo "sanitize: $CXX has no AddressSanitizer / UBSan runtime (libasan.so, libubsan.so)" >&2
  exit 1
fi
libasan=$(readlink -f "$libasan")
libubsan=$(readlink -f "$libubsan")

torch_prefix=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S "$ROOT" -B "$OUT/cmake" -Wno-dev --log-level=WARNING \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_COMPILER="$CXX" \
  -DCMAKE_CXX_FLAGS="$SAN_FLAGS" \
  -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DCMAKE_PREFIX_PATH="$torch_prefix" \
  -DPython3_EXECUTABLE="$PY" \
  -DROLLINGQ_CUDA=OFF >/dev/null
cmake --build "$OUT/cmake" -j "${MAX_JOBS:-2}" -- --quiet 2>&1 | grep -v "^\[" || true
lib=$OUT/cmake/_C.so
[ -f "$lib" ] || { echo "sanitize: the build made no $lib" >&2; exit 1; }

# the package, as links, beside the sanitized library (fused_op loads _C from its own folder)
pkg=$OUT/pkg/rollingq_kernels
rm -rf "$OUT/pkg"
mkdir -p "$pkg"
for f in "$ROOT"/rollingq_kernels/*; do
  case "$(basename "$f")" in *.so | *.pyd | __pycache__) continue ;; esac
  ln -s "$f" "$pkg/"
done
cp "$lib" "$pkg/_C.so"

if [ -n "${SANITIZE_TESTS:-}" ]; then
  read -r -a tests <<<"$SANITIZE_TESTS"
else
  tests=(tests/test_cpu_kernel.py tests/test_hardening.py tests/test_fuzz.py tests/test_api_errors.py)
fi
args=()
for t in "${tests[@]}"; do
  case "$t" in -*) args+=("$t") ;; *) args+=("$ROOT/$t") ;; esac
done

cd "$OUT/pkg"
export ROLLINGQ_SANITIZED_LIBRARY="$pkg/_C.so"
export LD_PRELOAD="$libasan $libubsan"
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:abort_on_error=1:symbolize=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:abort_on_error=1"
exec "$PY" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" -c "$ROOT/pyproject.toml" "${args[@]}"
