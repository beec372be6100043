#!/usr/bin/env bash
# The GPU machines have Triton 3.6 (CI's environment the newest Triton): in a small venv of its
# own, compile every Triton kernel to sm_80 and sm_90 cubins with Triton 3.6, and check that its
# interpreter runs the kernels or is refused with a reason naming the versions.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=build/triton36-venv            # git-ignored; reused by the next run
[ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install --disable-pip-version-check -q "triton==3.6.0"
"$VENV/bin/python" -c 'import triton, sys; sys.exit(triton.__version__ != "3.6.0")'
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_triton_compile.py \
  tests/test_gpu_session.py::test_triton_interpreter_works_or_says_why
