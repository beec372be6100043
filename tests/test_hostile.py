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


@pytest.mark.parametrize("lam", [1e-19, 1e-300, 5e-324, 1e-3])
def test_hybrid_tiny_lam_pools_the_whole_image(backend_device, lam):
    """k / lam beyond int64 (or inf) must clamp the pool to N, as the reference does: FPS over
    the whole image, not top-k (the pool size once overflowed on cpu, torch and in C++)."""
    bd = backend_device
    bd.require("hybrid")
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 8, generator=g, dtype=torch.float64), torch.rand(64, generator=g, dtype=torch.float64)
    assert R.hybrid_pool_size(64, 10, lam) == 64
    want = R.select_hybrid(x.numpy(), w.numpy(), 10, lam)
    got = bd.select(bd.tensor(x), bd.tensor(w), k=10, method="hybrid", lam=lam, order="selection")
    np.testing.assert_array_equal(got.cpu().numpy(), want)
    # and it is FPS over the whole image, which top-k is not here
    np.testing.assert_array_equal(want, R.select_hybrid(x.numpy(), w.numpy(), 10, 0.0))
    assert set(want.tolist()) != set(R.select_topk(x.numpy(), w.numpy(), 10).tolist())


def test_hybrid_pool_size_reference():
    assert R.hybrid_pool_size(100, 10, 0.5) == 20
    assert R.hybrid_pool_size(100, 10, 1.0) == 10
    assert R.hybrid_pool_size(100, 10, 0.0) == 100
    assert R.hybrid_pool_size(100, 10, 5e-324) == 100   # k / lam = inf


@pytest.mark.parametrize("lam", [1e-19, 5e-324, 0.25])
def test_hybrid_pool_of_gpu_backends_clamps_before_converting(lam):
    """The cuda and triton backends build the pool with torch ops on the host side of the
    call: check those on CPU tensors against the reference's pool (same ranking rule)."""
    from mmrprune.backends import cuda_backend, triton_backend
    from mmrprune.validation import validate
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 50, 4, generator=g), torch.rand(2, 50, generator=g)
    lengths = torch.tensor([50, 31])
    batch = validate(x, w, k=4, keep_ratio=None, lam=lam, method="hybrid", lengths=lengths).batch
    want = []
    for b, n in enumerate(lengths.tolist()):
        c = R.hybrid_pool_size(n, 4, lam)
        ranked = np.argsort(-R.normalized_importance(w[b, :n].double().numpy(), n), kind="stable")
        mask = np.zeros(50, dtype=bool)
        mask[ranked[:c]] = True
        want.append(mask)
    want = np.concatenate(want)
    np.testing.assert_array_equal(cuda_backend.hybrid_pool_rows(batch).numpy(), want)
    seg, local, valid = triton_backend._row_layout(batch)
    np.testing.assert_array_equal(triton_backend._hybrid_pool(batch, batch.importance().reshape(-1), seg, local,
                                                              valid).numpy(), want)


def test_select_varlen_requires_cu_seqlens():
    x, w = torch.randn(10, 4), torch.rand(10)
    with pytest.raises(TypeError, match=r"cu_seqlens: select_varlen needs .* got None"):
        mmrprune.select_varlen(x, w, None, k=3)
    with pytest.raises(TypeError, match="cu_seqlens"):
        mmrprune.select_varlen(x.numpy(), w.numpy(), None, k=3)
