#!/usr/bin/env bash
# Packaging proof: build an sdist, build the wheel from that sdist (so the sdist is
# complete), install the wheel (no editable install) into a fresh venv and smoke-test
# it from outside the source tree: import, info, a select on the C++ backend, the
# bundled tokens, the mmrprune-bench entry point.
#
# The venv sees the system site-packages for torch/numpy (no torch download); the
# smoke test checks that mmrprune itself is imported from the venv's wheel install.
# MMRPRUNE_CUDA=0 keeps the build CPU-only (the CUDA objects are checked elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
t0=$SECONDS

"$PY" setup.py -q sdist -d "$work/dist" >/dev/null 2>&1
sdist=$(ls "$work"/dist/mmrprune-*.tar.gz)
tar -xzf "$sdist" -C "$work"
MMRPRUNE_CUDA=0 "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$work/dist" "$work"/mmrprune-*/
wheel=$(ls "$work"/dist/mmrprune-*.whl)
echo "[package] built $(basename "$sdist") and $(basename "$wheel") in $((SECONDS - t0)) s"

"$PY" -m venv --system-site-packages "$work/venv"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps "$wheel"

cd "$work"   # away from the checkout, so only the installed copy can be imported
"$work/venv/bin/python" - "$work/venv" <<'PY'
import os, sys
venv = os.path.realpath(sys.argv[1])
import mmrprune
where = os.path.realpath(mmrprune.__file__)
assert where.startswith(venv), f"mmrprune imported from {where}, not from the venv's wheel install"
report = mmrprune.info()
assert report["backends"]["cpu"]["available"], report["backends"]["cpu"]
from mmrprune.data import load_dinov2
d = load_dinov2()
x, w = d["tokens"][:2], d["cls_attention"][:2]
idx = mmrprune.select(x, w, k=16, method="mmr", backend="cpu")
ref = [mmrprune.reference.select_one(x[b], w[b], 16, "mmr", 0.5) for b in range(2)]
assert idx.shape == (2, 16) and all(sorted(idx[b].tolist()) == sorted(r.tolist()) for b, r in enumerate(ref)), idx
import mmrprune.triton_kernels  # the Triton kernels' subpackage
print(f"[package] smoke test passed: mmrprune {mmrprune.__version__} from {os.path.dirname(where)}")
PY
"$work/venv/bin/python" -m mmrprune info >/dev/null
out=$("$work/venv/bin/mmrprune-bench" --tokens 64 --dim 16 --batch 2 --k 8 --repeats 1 --backend cpu --method mmr --quiet)
grep -q "^cpu " <<<"$out" || { echo "$out"; echo "[package] mmrprune-bench printed no cpu row" >&2; exit 1; }
echo "[package] mmrprune-bench entry point runs; total $((SECONDS - t0)) s"
