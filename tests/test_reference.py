"""The float64 reference on tiny cases whose answers are worked out by hand.

Four unit vectors in 2-D with simple cosines::

    x0 = ( 1,   0 )       sim  |  0     1     2     3
    x1 = ( .8,  .6)       -----+----------------------
    x2 = ( 0,   1 )         0  |  1    .8     0   -.6
    x3 = (-.6,  .8)         1  | .8     1    .6     0
                            2  |  0    .6     1    .8
    w  = [4, 3, 1, 2]       3  | -.6    0    .8     1
    Imp = (w - 1) / (3 + 1e-6) ~ [1, 2/3, 0, 1/3]
"""
from __future__ import annotations

import numpy as np
import pytest

from mmrprune import reference as R

import certify as C

X4 = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
W4 = np.array([4.0, 3.0, 1.0, 2.0])


def sel(method, k, x=X4, w=W4, lam=0.5, **p):
    return R.select_one(x, w, k, method, lam, **p).tolist()


# ----------------------------------------------------------------------------- shared definitions
def test_normalized_importance():
    np.testing.assert_allclose(R.normalized_importance(W4, 4), (W4 - 1) / (3 + 1e-6), rtol=0, atol=1e-15)
    np.testing.assert_array_equal(R.normalized_importance(None, 3), [0, 0, 0])
    np.testing.assert_array_equal(R.normalized_importance(np.full(3, 7.0), 3), [0, 0, 0])
    np.testing.assert_array_equal(R.dpp_quality(np.full(3, 7.0), 3), [1, 1, 1])
    np.testing.assert_array_equal(R.dpp_quality(None, 2), [1, 1])
    np.testing.assert_allclose(R.dpp_quality(W4, 4), R.normalized_importance(W4, 4))


def test_normalize_rows_keeps_zero_vectors():
    xh = R.normalize_rows(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(xh, [[0.6, 0.8], [0.0, 0.0]])


@pytest.mark.parametrize("n,k,ratio,want", [
    (10, 3, None, 3), (2, 5, None, 2), (0, 3, None, 0), (1, 1, None, 1),
    (10, None, 0.25, 2), (6, None, 0.25, 2), (14, None, 0.25, 4), (2, None, 0.25, 1),
    (0, None, 0.5, 0), (3, None, 1.0, 3), (576, None, 0.125, 72), (5, None, 0.5, 2), (7, None, 0.5, 4),
], ids=lambda v: repr(v))
def test_budget(n, k, ratio, want):
    assert R.budget(n, k=k, keep_ratio=ratio) == want


@pytest.mark.parametrize("n,k,lam,want", [
    (10, 3, 0.5, 6), (10, 3, 0.4, 8), (10, 5, 0.4, 10), (100, 5, 0.4, 12), (100, 1, 0.4, 2),
    (100, 5, 0.8, 6), (100, 3, 0.0, 100), (100, 3, 1.0, 3), (4, 2, 0.75, 3),
], ids=lambda v: repr(v))
def test_hybrid_pool_size(n, k, lam, want):
    # 7.5 -> 8, 12.5 -> 12, 2.5 -> 2: halves go to even
    assert R.hybrid_pool_size(n, k, lam) == want


@pytest.mark.parametrize("k,ratio,want", [(5, 0.5, 2), (3, 0.5, 2), (4, 0.5, 2), (1, 0.5, 0), (8, 0.25, 2)])
def test_d2pruner_pivot_count(k, ratio, want):
    assert R.d2pruner_pivot_count(k, ratio) == want


def test_grid_near():
    near = R.grid_near(6, (2, 3), 1)
    assert near[0].tolist() == [1, 1, 0, 1, 1, 0]
    assert near[5].tolist() == [0, 1, 1, 0, 1, 1]
    assert R.grid_near(6, (2, 3), 0).tolist() == np.eye(6).tolist()


# ----------------------------------------------------------------------------- methods by hand
def test_mmr_by_hand():
    # lam=0.5: step 1 argmax Imp = 0; step 2 scores .5 Imp - .5 sim(., 0):
    #   1: 1/3 - .4 < 0,  2: 0 - 0 = 0,  3: 1/6 + .3 = .467  -> 3
    # step 3, m = max sim to {0, 3}: 1: .8, 2: .8  -> 1: 1/3 - .4 = -.067 beats 2: -.4 -> 1
    assert sel("mmr", 4) == [0, 3, 1, 2]
    # lam=0.9: step 2: 1: .6 - .08 = .52, 3: .3 + .06 = .36 -> 1; step 3: m2 = .6, m3 = 0 ->
    #   2: -.06, 3: .3 -> 3
    assert sel("mmr", 3, lam=0.9) == [0, 1, 3]


def test_fps_by_hand_and_ties():
    # step 1 = argmax Imp = 0; step 2: -m = [., -.8, 0, .6] -> 3; step 3: m1 = m2 = .8, tie -> 1
    assert sel("fps", 4) == [0, 3, 1, 2]
    assert sel("fps", 3) == sel("mmr", 3, lam=0.0)


def test_topk_by_hand():
    assert sel("topk", 4) == [0, 1, 3, 2]
    assert sel("topk", 2, w=None) == [0, 1]           # constant importance: ties -> lowest index
    assert sel("topk", 3, w=np.array([1.0, 5.0, 5.0, 5.0])) == [1, 2, 3]


def test_divprune_by_hand():
    # every token's nearest neighbour has sim .8: first step is a 4-way tie -> 0;
    # then d to {0} = [., .2, 1, 1.6] -> 3; then min d to {0, 3}: 1: .2, 2: .2 -> tie -> 1
    assert sel("divprune", 4) == [0, 3, 1, 2]
    # three tokens: a=(1,0), b=(.8,.6), c=(-1,0); nearest-neighbour distances .2, .2, 1.8 -> c first,
    # then d(., c) = [2, 1.8] -> a, then b.  Importance is ignored.
    x3 = np.array([[1.0, 0.0], [0.8, 0.6], [-1.0, 0.0]])
    assert sel("divprune", 3, x=x3, w=np.array([0.0, 9.0, 1.0])) == [2, 0, 1]
    assert sel("divprune", 1, x=X4[:1], w=None) == [0]


def test_hybrid_by_hand():
    # lam=.75, k=2: pool c = round(2/.75 = 2.67) = 3 -> {0, 1, 3}; start at 0; FPS in pool: m1=.8, m3=-.6 -> 3
    assert sel("hybrid", 2, lam=0.75) == [0, 3]
    # lam=1: pool = the top-k -> the topk set
    assert sel("hybrid", 2, lam=1.0) == [0, 1]
    # lam=0: pool = everything -> fps
    assert sel("hybrid", 4, lam=0.0) == sel("fps", 4)


def test_dpp_orthogonal_picks_by_quality():
    x = np.eye(4)
    w = np.array([1.0, 4.0, 2.0, 3.0])    # q ~ [0, 1, 1/3, 2/3]; orthogonal: d^2 = q^2 never shrinks
    # the last token has q = 0 -> d^2 = 0 < DPP_EPS: filled in index order
    assert sel("dpp", 4, x=x, w=w) == [1, 3, 2, 0]


def test_dpp_by_hand_span_then_fill():
    # q = 1; d^2 = [1, 1, 1] -> tie -> 0; after 0: d^2 = 1 - sim(., 0)^2 = [0, .36, 1] -> 2;
    # x1 lies in span{x0, x2}: its gain is 0 -> filled
    x3 = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    assert sel("dpp", 3, x=x3, w=None) == [0, 2, 1]


def test_dpp_fill_is_index_order():
    # rank 1: after the first pick every gain is ~0 (float noise), the rest comes in index order
    x = np.ones((6, 3)) * np.arange(1, 7)[:, None]
    w = np.array([1.0, 2.0, 6.0, 3.0, 5.0, 4.0])
    assert sel("dpp", 6, x=x, w=w) == [2, 0, 1, 3, 4, 5]


def test_dpp_constant_quality_first_pick_is_token_0():
    x = C.gaussian_tokens(16, 8, seed=8)
    assert R.select_one(x, None, 1, "dpp").tolist() == [0]


def test_d2pruner_similarity_only():
    # alpha=1, tau=.5: edges where sim > .5: (0,1) .8, (1,2) .6, (2,3) .8.  One pivot (round(.34*3)=1): 0,
    # drops 1; pool {2, 3}: keep 3 (Imp 1/3), drop 2; pool empty -> fill with the most important: 1
    assert sel("d2pruner", 3, pivot_ratio=0.34, alpha=1.0, tau=0.5) == [0, 3, 1]


def test_d2pruner_grid_only():
    # grid (2, 3), radius 1; importance decreasing with the index; alpha=0: pure spatial graph.
    # pivot 0 drops 1, 3, 4; pool {2, 5}: keep 2, drop 1, 4, 5; empty -> fill 1, 3
    x = np.random.default_rng(0).standard_normal((6, 4))
    w = np.arange(6, 0, -1).astype(float)
    kw = dict(pivot_ratio=0.25, grid=(2, 3), radius=1)
    assert sel("d2pruner", 4, x=x, w=w, alpha=0.0, tau=0.5, **kw) == [0, 2, 1, 3]
    # radius 0: no neighbours at all -> importance order
    assert sel("d2pruner", 4, x=x, w=w, alpha=0.0, tau=0.5, pivot_ratio=0.25, grid=(2, 3), radius=0) == [0, 1, 2, 3]
    # alpha=.5, tau=.5: an edge needs both adjacency and sim > 0
    same = np.ones((6, 4))
    orth = np.eye(6)
    assert sel("d2pruner", 4, x=same, w=w, alpha=0.5, tau=0.5, **kw) == [0, 2, 1, 3]
    assert sel("d2pruner", 4, x=orth, w=w, alpha=0.5, tau=0.5, **kw) == [0, 1, 2, 3]


def test_d2pruner_defaults():
    assert R.D2PRUNER_DEFAULTS == {"pivot_ratio": 0.5, "alpha": 0.5, "tau": 0.5, "radius": 1, "grid": None}


# ----------------------------------------------------------------------------- equivalences on random inputs
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equivalences(seed):
    x = C.gaussian_tokens(40, 16, seed=seed)
    w = C.distinct_importance(40, seed=seed)
    k = 10
    assert R.select_topk(x, w, k).tolist() == R.select_mmr(x, w, k, lam=1.0).tolist()
    assert R.select_fps(x, w, k).tolist() == R.select_mmr(x, w, k, lam=0.0).tolist()
    assert sorted(R.select_hybrid(x, w, k, lam=1.0).tolist()) == sorted(R.select_topk(x, w, k).tolist())
    assert R.select_hybrid(x, w, k, lam=0.0).tolist() == R.select_fps(x, w, k).tolist()
    # selections are prefixes of longer selections (greedy)
    for m in R.METHODS:
        if m in ("hybrid", "d2pruner"):
            continue  # their pool / pivots depend on k
        assert sel(m, 5, x=x, w=w) == sel(m, 10, x=x, w=w)[:5]


@pytest.mark.parametrize("method", R.METHODS)
def test_reference_returns_distinct_int64(method):
    x = C.clustered_tokens(30, 8, seed=4)
    p = {"grid": (5, 6)} if method == "d2pruner" else {}
    out = R.select_one(x, C.distinct_importance(30, seed=4), 30, method, **p)
    assert out.dtype == np.int64 and sorted(out.tolist()) == list(range(30))
    assert R.select_one(x, None, 0, method, **p).shape == (0,)
