"""Regression tests for the hostile-input defects of issue 17, on every
(backend, device) pair this machine runs, plus a short run of the seeded
hostile fuzz (the sanitizer job, .ci/sanitize.sh, runs a longer one)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mmrprune
from mmrprune import reference as R

METHODS = R.METHODS


@pytest.mark.parametrize("method", METHODS)
def test_every_image_empty_gives_empty_width(backend_device, method):
    """keep_ratio with every length 0: output [B, 0] (the cpu extension once got a null pointer)."""
    bd = backend_device
    bd.require(method)
    x, w = bd.tensor(torch.randn(2, 16, 8)), bd.tensor(torch.rand(2, 16))
    params = {"alpha": 1.0} if method == "d2pruner" else {}
    out = bd.select(x, w, keep_ratio=0.5, lengths=bd.tensor(torch.tensor([0, 0])), method=method, **params)
    assert out.shape == (2, 0) and out.dtype == torch.int64
    kept, idx = mmrprune.prune(x, w, keep_ratio=0.5, lengths=bd.tensor(torch.tensor([0, 0])), method=method,
                               backend=bd.name, **params)
    assert kept.shape == (2, 0, 8) and idx.shape == (2, 0)
