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
# The summary puts each timed cuda call's time per round beside the emulator's counts of the
# kernels (bench/results/emu_counts.json): the join must find the (a) mmr counts.
python3 - "$OUT_DIR/summary.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["targets"]["per_round"]
hit = [r for r in rows if r["target"] == "a" and r["method"] == "mmr" and "shuffle_levels_per_round" in r]
if not hit:
    sys.exit(f"gpu dry run: no per-round row with emulator counts for (a) mmr in summary.json: {rows}")
print(f"gpu dry run: per-round rows {len(rows)}, (a) mmr counted {hit[0]['shuffle_levels_per_round']:.1f} "
      "shuffle levels per round")
PY
# The one-block A/B of the cuda calls (bench/gpu/targets.py one_block_record) ran and was timed.
python3 - "$OUT_DIR/targets.json" <<'PY'
import json, sys
ab = [r for r in json.load(open(sys.argv[1])) if r.get("backend") == "cuda/one-block"]
if not ab or any(not (r.get("median_ms", 0) > 0) for r in ab):
    sys.exit(f"gpu dry run: no timed one-block A/B record in targets.json: {ab}")
print(f"gpu dry run: {len(ab)} one-block A/B records ({', '.join(sorted({r['method'] for r in ab}))})")
PY
