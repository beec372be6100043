"""Quality metrics (IDPruner Sec. 3.1) on small cases computed from the definitions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmrprune import metrics


def cos_dist(a, b):
    return 1.0 - float(np.dot(a, b)) / (math.sqrt(float(np.dot(a, a))) * math.sqrt(float(np.dot(b, b))))


def hopkins_by_definition(x, s, seed):
    """H = sum_R d(r, S) / (sum_R d(r, S) + sum_S d(v, S \\ {v})), R = |S| uniform points of the
    bounding box drawn with np.random.default_rng(seed).uniform(lo, hi, size=(|S|, D))."""
    x = np.asarray(x, dtype=np.float64)
    rng = np.random.default_rng(seed)
    ref = rng.uniform(x.min(axis=0), x.max(axis=0), size=(len(s), x.shape[1]))
    u = sum(min(cos_dist(r, x[j]) for j in s) for r in ref)
    w = sum(min(cos_dist(x[i], x[j]) for j in s if j != i) for i in s)
    return u / (u + w)


# ----------------------------------------------------------------------------- importance retention
def test_importance_retention_by_hand():
    w = np.array([1.0, 2.0, 3.0, 4.0])
    assert metrics.importance_retention(w, [0, 3]) == pytest.approx(0.5)
    assert metrics.importance_retention(w, np.array([3, 2])) == pytest.approx(0.7)
    assert metrics.importance_retention(w, [0, 1, 2, 3]) == pytest.approx(1.0)
    assert metrics.importance_retention(torch.tensor(w, dtype=torch.bfloat16), torch.tensor([1])) == pytest.approx(0.2)


def test_importance_retention_ignores_padding():
    w = np.array([5.0, 1.0, 1.0, 3.0])
    assert metrics.importance_retention(w, [3, -1, 0, -1]) == pytest.approx(0.8)
    assert metrics.importance_retention(w, [-1, -1]) == 0.0


@pytest.mark.parametrize("idx,match", [([0, 0], "duplicates"), ([0, 4], "N=4")])
def test_importance_retention_errors(idx, match):
    with pytest.raises(ValueError, match=match):
        metrics.importance_retention(np.ones(4), idx)


def test_importance_retention_zero_total():
    with pytest.raises(ValueError, match="importance"):
        metrics.importance_retention(np.zeros(3), [0])


# ----------------------------------------------------------------------------- hopkins
def test_hopkins_by_hand_two_points():
    # S = two orthogonal unit tokens: each one's nearest other kept token is at cosine distance 1,
    # so sum_S d(v, S \ {v}) = 2 and H = u / (u + 2) with u from the seeded reference points
    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    rng = np.random.default_rng(3)
    ref = rng.uniform([0.0, 0.0], [1.0, 1.0], size=(2, 2))
    u = sum(min(1 - r[0] / np.linalg.norm(r), 1 - r[1] / np.linalg.norm(r)) for r in ref)
    assert metrics.hopkins(x, [0, 1], seed=3) == pytest.approx(u / (u + 2.0), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_hopkins_matches_definition(seed):
    x = np.random.default_rng(100 + seed).standard_normal((12, 5))
    s = [0, 4, 7, 11]
    got = metrics.hopkins(x, s, seed=seed)
    assert got == pytest.approx(hopkins_by_definition(x, s, seed), rel=1e-10)
    assert 0.0 <= got <= 1.0


def test_hopkins_ignores_padding_and_takes_tensors():
    x = np.random.default_rng(5).standard_normal((9, 4)).astype(np.float32)
    a = metrics.hopkins(x, [1, 3, 8], seed=2)
    b = metrics.hopkins(torch.from_numpy(x), torch.tensor([1, 3, 8, -1, -1]), seed=2)
    assert a == pytest.approx(b, rel=1e-12)
    assert a == pytest.approx(hopkins_by_definition(x.astype(np.float64), [1, 3, 8], 2), rel=1e-10)


def test_hopkins_depends_on_seed():
    x = np.random.default_rng(6).standard_normal((20, 3))
    s = list(range(0, 20, 3))
    assert metrics.hopkins(x, s, seed=0) != metrics.hopkins(x, s, seed=1)
    assert metrics.hopkins(x, s, seed=0) == metrics.hopkins(x, s, seed=0)


def test_hopkins_spread_vs_clustered():
    """A kept set spread over the space scores lower than one bunched in a corner."""
    rng = np.random.default_rng(0)
    centres = np.eye(4)
    x = np.concatenate([c + 0.01 * rng.standard_normal((5, 4)) for c in centres]) + 0.05
    spread = [0, 5, 10, 15]      # one token of each cluster
    bunched = [0, 1, 2, 3]       # all from the first cluster
    assert metrics.hopkins(x, spread) < metrics.hopkins(x, bunched)


@pytest.mark.parametrize("idx,match", [([2], "at least 2"), ([2, -1, -1], "at least 2"), ([1, 1, 2], "duplicates"),
                                       ([0, 9], "N=")])
def test_hopkins_errors(idx, match):
    x = np.random.default_rng(7).standard_normal((5, 3))
    with pytest.raises(ValueError, match=match):
        metrics.hopkins(x, idx)


def test_hopkins_needs_one_image():
    with pytest.raises(ValueError, match="features"):
        metrics.hopkins(np.ones((2, 5, 3)), [0, 1])


def test_batched_input_says_the_metrics_take_one_image():
    import numpy as np
    from mmrprune import metrics
    w = np.random.default_rng(0).random((2, 16))
    idx = np.array([[0, 1, 2], [0, 1, 2]])  # the same picks in both images: not duplicates
    with pytest.raises(ValueError, match=r"importance: expected \[N\] for one image, got shape \(2, 16\)") as info:
        metrics.importance_retention(w, idx)
    assert "duplicates" not in str(info.value)
    with pytest.raises(ValueError, match=r"indices: expected \[k\] for one image, got shape \(2, 3\)"):
        metrics.importance_retention(w[0], idx)
    with pytest.raises(ValueError, match=r"indices: expected \[k\] for one image"):
        metrics.hopkins(np.random.default_rng(0).random((16, 4)), idx)
    assert metrics.importance_retention(w[0], idx[0]) == pytest.approx(w[0, :3].sum() / w[0].sum())
