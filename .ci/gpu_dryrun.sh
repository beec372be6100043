#!/usr/bin/env bash
# The GPU session's dry run (bench/gpu_session.sh --dry-run): every stage of the GPU run on CPU,
# with cuda_emu and Triton's interpreter at tiny shapes, writing the same files.  The session
# fails when a stage fails or a file it should have written is missing.  Needs the extensions
# built (scripts/setup.sh, which .ci/run runs first) and, for the build stage, nvcc.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=$(mktemp -d "${TMPDIR:-/tmp}/mmrprune-gpu-dryrun.XXXXXX")
trap 'rm -rf "$OUT_DIR"' EXIT
bash bench/gpu_session.sh --dry-run --out "$OUT_DIR"
