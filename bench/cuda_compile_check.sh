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

# Summary: one line per kernel and arch (demangled names shortened).
echo "--- resource usage (ptxas) ---"
"$PYTHON" - "$report" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
bad = 0
for m in re.finditer(r"Compiling entry function '([^']+)' for '(sm_\d+)'.*?"
                     r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads.*?"
                     r"Used (\d+) registers", text, re.S):
    name, arch, stack, st, ld, regs = m.groups()
    short = re.search(r"(inv_norm_kernel|greedy_maxsim_kernel|greedy_dpp_kernel)I(\w+?)Lb([01])", name)
    label = f"{short.group(1)}<{short.group(2)}, vec={short.group(3)}>" if short else name
    print(f"{arch} {label:55s} regs={regs:>3} stack={stack} spill_st={st} spill_ld={ld}")
    if int(stack) or int(st) or int(ld):
        bad += 1
if bad:
    print(f"FAIL: {bad} kernel(s) with a stack frame or spills")
    sys.exit(1)
PY
echo "OK: built $so"
