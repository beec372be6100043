#!/usr/bin/env bash
# Compile-check the fused CUDA kernels without a GPU (CI-callable).
#
#   bench/cuda_compile_check.sh [BUILD_DIR]
#
# Builds the CUDA module alone with setup.py's own build (`python setup.py check_cuda`: every
# csrc/cuda/*.cu by nvcc for MMRPRUNE_CUDA_ARCHS, default "80;90" plus PTX of the highest, and
# csrc/cuda/*.cpp, linked as _cuda<ext-suffix> into BUILD_DIR, default a fresh temporary
# directory), prints ptxas's resource report (registers, shared memory, stack, spills) and
# fails if any kernel spills or uses a stack frame.
# Exit status 0 only when everything compiled, linked and was spill-free.
# Exits 0 with a "SKIP" line when nvcc is absent.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-nvcc}"
PYTHON="${PYTHON:-python3}"
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "SKIP: nvcc not found (set NVCC=/path/to/nvcc)"
  exit 0
fi
BUILD="${1:-$(mktemp -d /tmp/mmrprune_cuda_check.XXXXXX)}"
mkdir -p "$BUILD" && BUILD="$(cd "$BUILD" && pwd)"
rm -rf "$BUILD/temp"   # every kernel compiled again, so that ptxas reports each one

echo "nvcc: $("$NVCC" --version | tail -1)"
echo "archs: ${MMRPRUNE_CUDA_ARCHS:-80;90} (+ PTX of the highest); build dir: $BUILD"
report="$BUILD/resource-usage.txt"
(cd "$ROOT" && NVCC="$(command -v "$NVCC")" "$PYTHON" setup.py -q check_cuda --build-dir "$BUILD" --resource-usage) \
  >"$report" 2>&1 || { cat "$report"; echo "FAIL: the CUDA build failed"; exit 1; }
so="$(ls "$BUILD"/_cuda*.so)"

# Summary: one line per kernel and arch with registers, shared memory and the occupancy they
# allow; fails on any spill or stack frame; records in $BUILD/ptxas_resources.json.
echo "--- resource usage (ptxas) ---"
"$PYTHON" "$ROOT/bench/ptxas_report.py" "$report" --json "$BUILD/ptxas_resources.json"
echo "OK: built $so"
