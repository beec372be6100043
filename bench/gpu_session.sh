#!/usr/bin/env bash
# Everything that needs a GPU, in one command that fits a lent H100/H200 (15 minutes of device
# time per task, machine start and transfers included; one command may run 10 minutes).
# bench/README.md ("The GPU session") is the runbook; in short:
#
#   remote command (device tool `run`, timeout_s 560, carry nothing: the build happens there):
#     bash bench/gpu_session.sh --commit <the short hash of the committed tree you send>
#   files back, in $OUT (6): summary.json session.log smoke.json targets.json prefill.json logs.tar.gz
#   commit them under bench/results/gpu/ (see bench/README.md)
#   rerun one stage in the minutes left:  bash bench/gpu_session.sh --only targets --commit <hash>
#   on CPU, the same stages and files (CI: .ci/gpu_dryrun.sh):  bash bench/gpu_session.sh --dry-run
#   the stages and their time plan:  bash bench/gpu_session.sh --plan
#
# Stages, in order of value, each under its own time limit within 480 s for the whole command:
# build (MMRPRUNE_CUDA=1, only the GPU's arch, no build isolation, offline), smoke (cuda + triton
# against the float64 reference, both similarity modes, fp32/fp16/bf16, padded + varlen, CUDA
# graphs), targets (a)-(e) (do_bench records), prefill ((f): share of a 7B prefill), tests_gram
# and tests_row (the GPU tests, -x), sanitizer (memcheck + racecheck).  The summary is rewritten
# after every stage.  Works with $OUT unset (results in bench-out/gpu-session/).  Exit status:
# 0 passed, 1 a stage failed or timed out, 2 a stage did not fit the budget, 3 bad usage.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -u bench/gpu/session.py "$@"
