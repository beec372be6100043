"""The round rule (:func:`mmrprune.reference.select_rounds`) against the one-at-a-time reference.

Several picks per sequential round must give exactly the picks of
:func:`mmrprune.reference.select_one`: on every fuzz problem of ``test_fuzz``
(duplicates, ties, zero vectors, antipodes, padding), on the bundled DINOv2
tokens, and for every round limit.
"""
from __future__ import annotations

import numpy as np
import pytest

from mmrprune import reference as R
from mmrprune.data import load_dinov2
from test_fuzz import CASES, _problem

LIMITS = (None, 1, 2, 3, 8)


@pytest.fixture(scope="module")
def dinov2_f64():
    d = load_dinov2()
    return d["tokens"].astype(np.float64), d["cls_attention"].astype(np.float64)


@pytest.mark.parametrize("seed", range(CASES))
def test_fuzz_problem_rounds_equal_sequential(seed):
    x, w, lengths, method, lam, k = _problem(seed)
    methods = sorted(set(R.ROUND_METHODS) | {method}) if method != "d2pruner" else R.ROUND_METHODS
    for b in range(x.shape[0]):
        n = int(lengths[b])
        kb = R.budget(n, k)
        xb, wb = x[b, :n], None if w is None else w[b, :n]
        for m in methods:
            want = R.select_one(xb, wb, kb, m, lam)
            for limit in LIMITS:
                got, rounds = R.select_rounds(xb, wb, kb, m, lam, limit)
                assert got.tolist() == want.tolist(), (m, lam, limit, got, want)
                assert min(kb, 1) <= rounds <= kb
                if limit == 1 or m == "dpp":
                    assert rounds == kb
                elif limit is not None and kb:
                    assert rounds >= 1 + -(-(kb - 1) // limit)   # step 1 alone, then at most `limit` a round


def test_exact_duplicates_commit_lowest_index_first():
    """Three copies of each of four one-hot vectors, tied importance: ties inside a round go
    to the lowest index, and a copy of a pick (sim 1 > m) never joins that pick's round."""
    x = np.zeros((12, 4))
    x[np.arange(12), np.arange(12) % 4] = 1.0
    w = np.ones(12)
    for method in ("mmr", "fps", "divprune"):
        want = R.select_one(x, w, 8, method, 0.5)
        got, rounds = R.select_rounds(x, w, 8, method, 0.5)
        assert got.tolist() == want.tolist()
        # the 3 other directions (sim 0 <= m = 0) join round 2; each later copy needs its own round
        assert got[:4].tolist() == [0, 1, 2, 3] and rounds < 8


@pytest.mark.parametrize("method", R.ROUND_METHODS)
@pytest.mark.parametrize("limit", (None, 16, 8, 4))
def test_real_tokens_rounds_equal_sequential(dinov2_f64, method, limit):
    x, w = dinov2_f64
    for b in range(x.shape[0]):
        k = R.budget(x.shape[1], keep_ratio=0.25)
        got, _ = R.select_rounds(x[b], w[b], k, method, 0.5, limit)
        assert got.tolist() == R.select_one(x[b], w[b], k, method, 0.5).tolist(), (method, limit, b)


def test_real_tokens_rounds_per_pick(dinov2_f64):
    """The issue's target: mmr, lam 0.5, [CLS] importance, keep 25%: rounds / k <= 0.25."""
    x, w = dinov2_f64
    k = R.budget(x.shape[1], keep_ratio=0.25)
    rounds = [R.select_rounds(x[b], w[b], k, "mmr", 0.5)[1] for b in range(x.shape[0])]
    assert sum(rounds) / (k * len(rounds)) <= 0.25, rounds


def test_commit_check_is_what_keeps_picks_exact(dinov2_f64):
    """Without the check (commit the top 8 of every round blindly) the picks differ:
    the equality tests above can fail."""
    x, w = dinov2_f64
    xh, imp = R.normalize_rows(x[0]), R.normalized_importance(w[0], x.shape[1])
    k = 64
    order = [int(np.argmax(imp))]
    m = xh @ xh[order[0]]
    while len(order) < k:
        score = 0.5 * imp - 0.5 * m
        score[order] = -np.inf
        top = np.lexsort((np.arange(len(score)), -score))[:min(8, k - len(order))]
        order += [int(c) for c in top]
        for c in top:
            m = np.maximum(m, xh @ xh[c])
    assert order != R.select_one(x[0], w[0], k, "mmr", 0.5).tolist()


def test_round_limit_must_be_positive():
    with pytest.raises(ValueError, match="max_round"):
        R.select_rounds(np.eye(3), None, 2, "mmr", 0.5, 0)


def test_select_return_stats(dinov2_f64):
    """``return_stats=True``: rounds per image from a backend that counts, no key from one that does not."""
    import mmrprune
    from mmrprune.backends.numpy_backend import MAX_ROUND
    x, w = dinov2_f64[0][:2, :96], dinov2_f64[1][:2, :96]
    idx, stats = mmrprune.select(x, w, k=24, backend="numpy", order="selection", return_stats=True)
    want = [R.select_rounds(x[b], w[b], 24, "mmr", 0.5, MAX_ROUND) for b in range(2)]
    assert idx.tolist() == [o.tolist() for o, _ in want]
    assert stats["rounds"].tolist() == [r for _, r in want]
    one, one_stats = mmrprune.select(x[0], w[0], k=24, backend="numpy", return_stats=True)
    assert one_stats["rounds"] == want[0][1] and one.shape == (24,)
    assert mmrprune.select(x, w, k=24, backend="torch", return_stats=True)[1] == {}
    assert not isinstance(mmrprune.select(x, w, k=24, backend="numpy"), tuple)
