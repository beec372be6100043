"""The ``anchor`` baselines (published-style per-image loops) follow the same contract as the
reference: same picks, in selection order, on well-separated inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mmrprune import baselines
from mmrprune import reference as R

import certify as C


def separated(method, n, d, k, lam, count, start=0):
    xs, ws, seed = [], [], start
    while len(xs) < count:
        assert seed < start + 300
        x = torch.from_numpy(C.gaussian_tokens(n, d, seed=seed)).float().double().numpy()
        w = torch.from_numpy(C.distinct_importance(n, seed=seed)).float().double().numpy()
        if C.reference_margin(x, w, k, method, lam) >= 1e-3:
            xs.append(x)
            ws.append(w)
        seed += 1
    return np.stack(xs), np.stack(ws)


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 1.0])
def test_anchor_mmr_matches_reference(lam):
    n, d, k = 40, 32, 10
    x, w = separated("mmr", n, d, k, lam, count=3)
    picks = baselines.anchor_mmr(torch.from_numpy(x).float(), torch.from_numpy(w).float(), k, lam=lam)
    assert len(picks) == 3
    for b, p in enumerate(picks):
        assert p.dtype == torch.int64
        np.testing.assert_array_equal(p.numpy(), R.select_mmr(x[b], w[b], k, lam))


def test_anchor_mmr_without_importance_and_k_above_n():
    x = C.gaussian_tokens(9, 6, batch=2, seed=3)
    picks = baselines.anchor_mmr(torch.from_numpy(x).float(), None, 20, lam=0.5)
    for b, p in enumerate(picks):
        assert sorted(p.tolist()) == list(range(9))
        C.check_certificate(x[b].astype(np.float32), None, p.numpy(), "mmr", 0.5, tol=1e-4, k=9)


def test_anchor_divprune_matches_reference():
    n, d, k = 40, 32, 12
    x, _ = separated("divprune", n, d, k, 0.5, count=3)
    picks = baselines.anchor_divprune(torch.from_numpy(x).float(), k)
    for b, p in enumerate(picks):
        np.testing.assert_array_equal(p.numpy(), R.select_divprune(x[b], None, k))


def test_anchor_divprune_single_token():
    picks = baselines.anchor_divprune(torch.randn(2, 1, 4), 3)
    assert [p.tolist() for p in picks] == [[0], [0]]


def test_anchors_on_real_tokens_certify(dinov2):
    feats = torch.from_numpy(dinov2["tokens"][[2]]).float()
    imp = torch.from_numpy(dinov2["cls_attention"][[2]])
    mmr = baselines.anchor_mmr(feats, imp, 64, lam=0.5)[0]
    C.check_certificate(feats[0], imp[0], mmr.numpy(), "mmr", 0.5, tol=1e-4, k=64)
    div = baselines.anchor_divprune(feats, 64)[0]
    C.check_certificate(feats[0], None, div.numpy(), "divprune", tol=1e-4, k=64)


def test_anchor_registry():
    assert set(baselines.ANCHORS) == {"mmr", "divprune"}
