#!/usr/bin/env bash
# Compile-check the fused CUDA kernels without a GPU (CI-callable).
#
#   bench/cuda_compile_check.sh [BUILD_DIR]
#
# Compiles every csrc/cuda/*.cu and csrc/cuda/*.cpp with nvcc for
# MMRPRUNE_CUDA_ARCHS (default "80;90", plus PTX of the last one), prints the
# ptxas resource report (registers, shared memory, stack, spills), fails if any
# kernel spills or uses a stack frame, and links the pybind11 module
# _cuda<ext-suffix> into BUILD_DIR (default: a fresh temporary directory),
# with exactly the flags and link line of setup.py (csrc/build_recipe.py).
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
mkdir -p "$BUILD"

# The build itself is setup.py's recipe (csrc/build_recipe.py: same nvcc and host flags, same
# static-cudart link), run serially with ptxas's resource report.
echo "nvcc: $("$NVCC" --version | tail -1)"
echo "archs: ${MMRPRUNE_CUDA_ARCHS:-80;90} (+ PTX of the highest); build dir: $BUILD"
report="$BUILD/resource-usage.txt"
: > "$report"
NVCC="$(command -v "$NVCC")" "$PYTHON" "$ROOT/csrc/build_recipe.py" cuda-module "$BUILD" --report "$report"
so="$(ls "$BUILD"/_cuda*.so)"

# Summary: one line per kernel and arch with registers, shared memory and the occupancy they
# allow; fails on any spill or stack frame; records in $BUILD/ptxas_resources.json.
echo "--- resource usage (ptxas) ---"
"$PYTHON" "$ROOT/bench/ptxas_report.py" "$report" --json "$BUILD/ptxas_resources.json"
echo "OK: built $so"
