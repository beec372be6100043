#!/usr/bin/env bash
# Everything that needs a GPU, in one command, for a lent H100/H200 (device tool):
#   build with CUDA, GPU test suite (both CUDA similarity modes), compute-sanitizer
#   on a representative run, and the issue-4/5 performance shapes as JSON records.
#
#   bash bench/gpu_session.sh [OUT_DIR] [PARTS]   # OUT_DIR: $OUT or bench/results/gpu
#
# PARTS (default "tests sanitizer bench"; the build always runs) lets a device
# call that must end within 10 minutes take one part at a time, e.g.
#   bash bench/gpu_session.sh "$OUT" tests;  bash bench/gpu_session.sh "$OUT" bench
#
# No network is needed: torch, triton, pybind11, ninja and pytest are preinstalled there.
# Each stage logs to OUT_DIR and the script goes on after a failing stage, so one
# lease yields every result; the exit status is non-zero if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/results/gpu}}
parts=${2:-tests sanitizer bench}
want() { case " $parts " in *" $1 "*) return 0;; *) return 1;; esac; }
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=()
stage() {  # stage NAME COMMAND...: run, log to $out/NAME.log, remember failures
  local name=$1; shift
  echo "=== $name: $*"
  if ! "$@" > "$out/$name.log" 2>&1; then failed+=("$name"); echo "    FAILED (see $out/$name.log)"; fi
  tail -n 3 "$out/$name.log"
}

stage build env MMRPRUNE_CUDA=1 python3 -m pip install --no-build-isolation --use-pep517 --no-deps -e .
python3 -m mmrprune info --json > "$out/info.json"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/nvidia-smi.csv" 2>&1

# correctness: the whole matrix picks up the cuda/triton/torch backends on CUDA tensors
want tests && stage tests_gram env MMRPRUNE_CUDA_GRAM=1 MMRPRUNE_TRITON_GRAM=1 python3 -m pytest tests -q -p no:cacheprovider
want tests && stage tests_rows env MMRPRUNE_CUDA_GRAM=0 MMRPRUNE_TRITON_GRAM=0 python3 -m pytest tests -q -p no:cacheprovider \
  -k "cuda or triton"

# compute-sanitizer on a representative slice (padded, varlen, every method, both modes)
if ! want sanitizer; then :
elif command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck synccheck; do
    for gram in 0 1; do
      stage "sanitizer_${tool}_gram${gram}" env MMRPRUNE_CUDA_GRAM=$gram compute-sanitizer --tool "$tool" \
        --error-exitcode 3 python3 -m pytest tests/test_cuda_backend.py -q -p no:cacheprovider -x \
        -k "(test_kernel_certificate_padded and float16 or test_kernel_varlen_matches_padded) and not cuda_emu"
    done
  done
else
  echo "compute-sanitizer not found: skipped" | tee "$out/sanitizer.log"
fi

# performance shapes of issue 4 (a)-(e) and issue 5, bf16, lam 0.5
bench() { want bench || return 0; local name=$1; shift; stage "bench_$name" mmrprune-bench speed --dtype bfloat16 --lam 0.5 \
  --json "$out/bench_$name.json" --csv "$out/bench_$name.csv" "$@"; }
bench a_llava     --preset llava --batch 1 --k 64 --method mmr,divprune,dpp --backend cuda,triton,torch,anchor
bench b_qwen      --preset qwen1080p --batch 1 --keep-ratio 0.25 --method mmr,divprune,dpp --backend cuda,triton,torch,anchor
bench c_qwen_b64  --preset qwen1080p --batch 64 --keep-ratio 0.25 --method mmr,divprune --backend cuda,triton,torch
bench d_video     --preset video --batch 1 --keep-ratio 0.25 --method mmr,divprune --backend cuda,triton,torch
for gram in 0 1; do
  export MMRPRUNE_CUDA_GRAM=$gram MMRPRUNE_TRITON_GRAM=$gram
  bench "modes_gram$gram" --preset llava,qwen1080p --batch 1 --keep-ratio 0.25 --method mmr --backend cuda,triton
done
unset MMRPRUNE_CUDA_GRAM MMRPRUNE_TRITON_GRAM

if [ ${#failed[@]} -gt 0 ]; then echo "failed stages: ${failed[*]}"; exit 1; fi
echo "all stages passed; results in $out"
