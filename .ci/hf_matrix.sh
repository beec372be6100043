#!/usr/bin/env bash
# CI step: the HF integration on the transformers releases of its tested window that the main
# environment does not run: the floor of the window (mmrprune/integrations/hf/versions.py), the
# first 5.x, 5.17 and 5.19. Each gets a venv of its own under build/hf-matrix/ that reuses the
# main environment's torch, numpy and mmrprune (--system-site-packages) and runs the
# integration tests and the offline example. The newest release of the window is what scripts/setup.sh installs in the
# main environment, where the README's test command runs the same tests.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS=0
PY=${PYTHON:-python3}
FLOOR=$("$PY" -c 'import runpy; print(runpy.run_path("mmrprune/integrations/hf/versions.py")["floor"]())')
for v in "$FLOOR" 5.0.0 5.17.0 5.19.0; do
  venv=build/hf-matrix/$v
  [ -x "$venv/bin/python" ] || "$PY" -m venv --system-site-packages "$venv"
  have=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("transformers"))' 2>/dev/null || true)
  # The extras pin the `kernels` release that one expects (the main environment's newer one
  # breaks older releases at import); a release knows one of the two extra names.
  [ "$have" = "$v" ] || "$venv/bin/python" -m pip install -q --disable-pip-version-check \
    "transformers[kernels,hub-kernels]==$v" 2>&1 | grep -v "does not provide the extra" || true
  "$venv/bin/python" -c "import transformers; assert transformers.__version__ == '$v', transformers.__version__"
  echo "[ci/hf_matrix] transformers $v (${SECONDS}s)"
  "$venv/bin/python" -m pytest tests/test_integrations_hf*.py tests/test_examples.py -q -p no:cacheprovider
done
echo "[ci/hf_matrix] total ${SECONDS}s"
