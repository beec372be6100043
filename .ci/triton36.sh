#!/usr/bin/env bash
# The GPU machines have Triton 3.6 (CI's environment the newest Triton): compile every Triton
# kernel to sm_80 and sm_90 cubins with Triton 3.6, installed into a folder of its own that
# shadows the installed Triton through PYTHONPATH, and check that its interpreter runs the
# kernels or is refused with a reason naming the versions.  A folder rather than a venv: a venv
# made from the python that has mmrprune installed would not see that python's packages when
# that python is itself a venv's.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
T36=build/triton36                  # git-ignored; reused by the next run
[ -d "$T36/triton" ] || "$PY" -m pip install --disable-pip-version-check -q --no-deps --target "$T36" "triton==3.6.0"
export PYTHONPATH="$PWD/$T36${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import triton, sys; sys.exit(0 if triton.__version__ == "3.6.0" else f"triton {triton.__version__}")'
"$PY" -m pytest -q -p no:cacheprovider tests/test_triton_compile.py \
  tests/test_gpu_session.py::test_triton_interpreter_works_or_says_why
