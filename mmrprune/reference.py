"""Float64 NumPy reference of every selection method in the contract (docs/contract.md).

This module is the ground truth of the test suite.  It is written for clarity,
one image at a time and one plain loop over the greedy steps, so that each
backend (torch, C++, CUDA, Triton) can be read side by side with it.

Notation, per image with N valid tokens:

* ``w``          raw importance, ``[N]`` (``None`` means all zeros)
* ``Imp_i``      ``(w_i - min w) / (max w - min w + 1e-6)``                  (:func:`normalized_importance`)
* ``x̂_i``        ``x_i / max(||x_i||_2, 1e-12)``                            (:func:`normalize_rows`)
* ``sim(i, j)``  ``x̂_i · x̂_j``
* ties           always go to the lowest token index (``np.argmax`` returns the first maximum)

Every ``select_*`` function returns the picked token indices in *selection*
order as an ``int64`` array of length ``k``.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "IMP_EPS", "NORM_EPS", "DPP_EPS", "D2PRUNER_DEFAULTS", "METHODS",
    "normalized_importance", "normalize_rows", "dpp_quality", "round_half_even",
    "budget", "hybrid_pool_size", "d2pruner_pivot_count",
    "select_mmr", "select_topk", "select_fps", "select_hybrid", "select_divprune",
    "select_dpp", "select_d2pruner", "select_one", "grid_near",
    "ROUND_METHODS", "select_rounds",
]

IMP_EPS = 1e-6    # denominator guard of the min-max importance normalisation
NORM_EPS = 1e-12  # norm guard: a zero vector stays zero
# DPP: when the largest remaining marginal gain d^2 falls below DPP_EPS the
# remaining tokens are numerically in the span of the picked ones; their gains
# are set to exactly 0 so the rest of the budget is filled in index order
# (the contract's tie rule) instead of by float noise.  See docs/api.md, "Choices".
DPP_EPS = 1e-6

# D²Pruner parameters.  See docs/api.md, "Methods" for where each default comes from.
D2PRUNER_DEFAULTS = {"pivot_ratio": 0.5, "alpha": 0.5, "tau": 0.5, "radius": 1, "grid": None}

METHODS = ("mmr", "divprune", "topk", "fps", "hybrid", "dpp", "d2pruner")
LAM_METHODS = ("mmr", "hybrid")  # the rules that read lam (topk and fps are mmr at lam 1 and 0)
DEFAULT_LAM = 0.5


# --------------------------------------------------------------------------- shared definitions
def round_half_even(x: float) -> int:
    """Round to the nearest integer, halves to even (banker's rounding), as ``np.rint``."""
    return int(np.rint(np.float64(x)))


def budget(n_valid: int, k: int | None = None, keep_ratio: float | None = None) -> int:
    """Tokens kept for an image of ``n_valid`` tokens.

    ``k_b = min(k, N_b)`` or ``k_b = max(1, round_half_even(r * N_b))``; an image
    with no valid tokens keeps nothing.
    """
    if n_valid <= 0:
        return 0
    if k is not None:
        return min(int(k), n_valid)
    return min(n_valid, max(1, round_half_even(np.float64(keep_ratio) * np.float64(n_valid))))


def normalized_importance(w: np.ndarray | None, n: int) -> np.ndarray:
    """``Imp = (w - min w) / (max w - min w + 1e-6)``; ``None`` or constant ``w`` gives zeros."""
    if w is None:
        return np.zeros(n, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    lo, hi = w.min(), w.max()
    return (w - lo) / (hi - lo + IMP_EPS)


def dpp_quality(w: np.ndarray | None, n: int) -> np.ndarray:
    """DPP quality ``q``: ``Imp``, or all ones when the importance is ``None`` or constant."""
    if w is None:
        return np.ones(n, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    if w.max() == w.min():
        return np.ones(n, dtype=np.float64)
    return normalized_importance(w, n)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """``x̂_i = x_i / max(||x_i||_2, 1e-12)`` in float64."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.sqrt((x * x).sum(axis=1, keepdims=True))
    return x / np.maximum(norms, NORM_EPS)


def hybrid_pool_size(n: int, k: int, lam: float) -> int:
    """Candidate pool of the naive hybrid: ``N`` if lam = 0 else ``min(N, max(k, round_half_even(k / lam)))``."""
    if lam == 0:
        return n
    # clamp to N in floating point first: k / lam overflows int64 (or is inf) for tiny lam
    with np.errstate(over="ignore"):
        wanted = min(np.float64(n), np.rint(np.float64(k) / np.float64(lam)))
    return max(k, int(wanted))


def d2pruner_pivot_count(k: int, pivot_ratio: float) -> int:
    """Pivots of D²Pruner: ``round_half_even(pivot_ratio * k)``."""
    return round_half_even(np.float64(pivot_ratio) * np.float64(k))


def _importance_order(imp: np.ndarray) -> np.ndarray:
    """Token indices by decreasing importance, ties to the lowest index."""
    return np.argsort(-imp, kind="stable")


def grid_near(n: int, grid, radius: int) -> np.ndarray:
    """``near[i, j] = 1`` when tokens i and j (row-major on the ``grid=(h, w)`` patch grid)
    are within Chebyshev distance ``radius``."""
    _, gw = grid
    idx = np.arange(n)
    r, c = idx // gw, idx % gw
    dr = np.abs(r[:, None] - r[None, :])
    dc = np.abs(c[:, None] - c[None, :])
    return (np.maximum(dr, dc) <= radius).astype(np.float64)


# --------------------------------------------------------------------------- methods
def select_mmr(x, w, k: int, lam: float = 0.5) -> np.ndarray:
    """Maximal Marginal Relevance (IDPruner, Algorithm 1).

    Step 1 picks ``argmax Imp``.  Step t picks
    ``argmax_{i not in S} lam * Imp_i - (1 - lam) * m_i`` with
    ``m_i = max_{j in S} sim(i, j)``.
    """
    xh = normalize_rows(x)
    n = xh.shape[0]
    imp = normalized_importance(w, n)
    return _greedy_max_similarity(xh, imp, k, np.ones(n, dtype=bool), lambda m: lam * imp - (1.0 - lam) * m)


def _greedy_max_similarity(xh, imp, k: int, eligible, later_score) -> np.ndarray:
    """The greedy loop of mmr and hybrid: step 1 picks ``argmax Imp``, step t picks
    ``argmax later_score(m)``, both over eligible tokens not picked yet, with
    ``m_i = max_{j in S} sim(i, j)``."""
    available = eligible.copy()
    m = np.full(xh.shape[0], -np.inf)
    order = []
    for step in range(k):
        score = imp.copy() if step == 0 else later_score(m)
        score[~available] = -np.inf
        j = int(np.argmax(score))
        order.append(j)
        available[j] = False
        m = np.maximum(m, xh @ xh[j])
    return np.asarray(order, dtype=np.int64)


def select_topk(x, w, k: int) -> np.ndarray:
    """Greedy importance: the ``k`` largest ``Imp`` (MMR with lam = 1)."""
    n = np.asarray(x).shape[0]
    return _importance_order(normalized_importance(w, n))[:k].astype(np.int64)


def select_fps(x, w, k: int) -> np.ndarray:
    """Greedy diversity (farthest point sampling in cosine): MMR with lam = 0."""
    return select_mmr(x, w, k, lam=0.0)


def select_hybrid(x, w, k: int, lam: float = 0.5) -> np.ndarray:
    """Naive hybrid (IDPruner Sec. 3.2).

    Pool = the ``c`` most important tokens (:func:`hybrid_pool_size`); then FPS
    inside the pool starting from the pool's most important token: step t picks
    ``argmin_{i in pool, not in S} m_i``.
    """
    xh = normalize_rows(x)
    n = xh.shape[0]
    imp = normalized_importance(w, n)
    c = hybrid_pool_size(n, k, lam)
    pool = np.zeros(n, dtype=bool)
    pool[_importance_order(imp)[:c]] = True
    return _greedy_max_similarity(xh, imp, k, pool, lambda m: -m)


def select_divprune(x, w, k: int) -> np.ndarray:
    """DivPrune's greedy Max-Min Diversity (importance is ignored).

    ``d = 1 - sim``.  Step 1 picks ``argmax_i min_{j != i} d(i, j)`` (token 0
    when N = 1); step t picks ``argmax_{i not in S} min_{j in S} d(i, j)``.
    """
    xh = normalize_rows(x)
    n = xh.shape[0]
    picked = np.zeros(n, dtype=bool)
    if n == 1:
        first = 0
    else:
        d = 1.0 - xh @ xh.T
        np.fill_diagonal(d, np.inf)
        first = int(np.argmax(d.min(axis=1)))
    order = [first]
    picked[first] = True
    min_d = 1.0 - xh @ xh[first]
    for _ in range(1, k):
        score = min_d.copy()
        score[picked] = -np.inf
        j = int(np.argmax(score))
        order.append(j)
        picked[j] = True
        min_d = np.minimum(min_d, 1.0 - xh @ xh[j])
    return np.asarray(order, dtype=np.int64)


def select_dpp(x, w, k: int) -> np.ndarray:
    """Conditional DPP, greedy MAP by incremental Cholesky (Chen et al., 2018).

    Kernel ``L_ij = q_i sim(i, j) q_j`` with ``q`` from :func:`dpp_quality`.
    ``d_i^2`` starts at ``L_ii``; each step picks ``j = argmax_{i not in S} d_i^2``,
    then for every token ``e_i = (L_ji - <c_j, c_i>) / d_j``, ``c_i <- [c_i, e_i]``,
    ``d_i^2 <- d_i^2 - e_i^2``.  Exactly ``k`` tokens come back: once the best
    remaining gain is below :data:`DPP_EPS` (checked before the step's argmax)
    all gains are set to 0 and the rest of the budget is filled in index order.
    ``d_i^2`` starts at exactly ``q_i^2`` for a non-zero token, so equal
    qualities tie exactly.
    """
    xh = normalize_rows(x)
    n = xh.shape[0]
    q = dpp_quality(w, n)
    picked = np.zeros(n, dtype=bool)
    # L_ii = q_i^2 * sim(i, i): exactly q_i^2 for a non-zero token (not 1 +- rounding,
    # so equal q tie exactly and go to the lowest index), 0 for a zero vector
    d2 = q * q * (np.abs(xh).sum(axis=1) > 0)
    cis = np.zeros((k, n))
    order = []
    for step in range(k):
        score = np.where(picked, -np.inf, d2)
        exhausted = score.max() < DPP_EPS
        if exhausted:  # no gain left: the rest of the budget goes in index order
            d2[:] = 0.0
            score = np.where(picked, -np.inf, 0.0)
        j = int(np.argmax(score))
        order.append(j)
        picked[j] = True
        if exhausted:
            continue
        dj = np.sqrt(d2[j])
        l_j = q[j] * (xh @ xh[j]) * q
        e = (l_j - cis[:step].T @ cis[:step, j]) / dj
        cis[step] = e
        d2 = d2 - e * e
    return np.asarray(order, dtype=np.int64)


def select_d2pruner(x, w, k: int, pivot_ratio: float = 0.5, alpha: float = 0.5,
                    tau: float = 0.5, radius: int = 1, grid=None) -> np.ndarray:
    """D²Pruner: importance pivots plus a greedy maximal independent set.

    Pivots = the ``round_half_even(pivot_ratio * k)`` most important tokens.
    Edge (i, j) iff ``alpha * sim(i, j) + (1 - alpha) * near(i, j) > tau``.
    Pivots and their neighbours leave the pool; then repeatedly keep the most
    important token of the pool and drop its neighbours.  If the pool empties
    before ``k``, fill with the most important unselected tokens.
    """
    xh = normalize_rows(x)
    n = xh.shape[0]
    imp = normalized_importance(w, n)
    ranked = _importance_order(imp)
    near = grid_near(n, grid, radius) if alpha < 1 else np.zeros((n, n))
    edge = alpha * (xh @ xh.T) + (1.0 - alpha) * near > tau
    n_pivots = d2pruner_pivot_count(k, pivot_ratio)
    selected = np.zeros(n, dtype=bool)
    pool = np.ones(n, dtype=bool)
    order = []
    for j in ranked[:n_pivots]:
        order.append(int(j))
        selected[j] = True
    for j in order:
        pool &= ~edge[j]
    pool &= ~selected
    while len(order) < k:
        from_pool = bool(pool.any())
        score = np.where(pool if from_pool else ~selected, imp, -np.inf)
        j = int(np.argmax(score))
        order.append(j)
        selected[j] = True
        if from_pool:
            pool &= ~edge[j]
        pool[j] = False
    return np.asarray(order, dtype=np.int64)


_SELECTORS = {
    "mmr": lambda x, w, k, lam, p: select_mmr(x, w, k, lam),
    "divprune": lambda x, w, k, lam, p: select_divprune(x, w, k),
    "topk": lambda x, w, k, lam, p: select_topk(x, w, k),
    "fps": lambda x, w, k, lam, p: select_fps(x, w, k),
    "hybrid": lambda x, w, k, lam, p: select_hybrid(x, w, k, lam),
    "dpp": lambda x, w, k, lam, p: select_dpp(x, w, k),
    "d2pruner": lambda x, w, k, lam, p: select_d2pruner(x, w, k, **p),
}


# --------------------------------------------------------------------------- rounds
ROUND_METHODS = ("mmr", "topk", "fps", "hybrid", "divprune")


def select_rounds(x, w, k: int, method: str = "mmr", lam: float = 0.5,
                  max_round: int | None = None, **params) -> tuple[np.ndarray, int]:
    """The one-at-a-time order of :func:`select_one`, committed several picks per round.

    Returns ``(order, rounds)``: the same ``int64`` picks as :func:`select_one`
    and the number of sequential rounds that produced them.

    Max-similarity family (:data:`ROUND_METHODS`; state ``m_i = max_{j in S} sim(i, j)``,
    DivPrune's ``min_{j in S} d(i, j)``).  A new pick can only lower a score.  At
    the start of a round, order the untaken eligible tokens by ``(score desc,
    index asc)``: ``c_1, c_2, ...``.  ``c_1`` is the exact next pick.  ``c_j``
    joins the round while its state is unchanged by every earlier pick of the
    round (``sim(c_j, c_l) <= m_{c_j}``; DivPrune ``1 - sim >= min_d``): its
    score stays put while every other score can only fall, so it is the exact
    pick after ``c_{j-1}``.  The round stops at the first candidate that fails,
    at the budget, or at ``max_round`` candidates (``None``: no limit).  When
    the score ignores the state (lam = 1, top-k) every candidate passes.  The
    first step is a round of one; the check reads the very similarity rows the
    state update uses, so the picks are bit-identical to the sequential loop.
    DPP (every pick changes every gain) and D²Pruner run one pick per round.
    """
    if max_round is not None and max_round < 1:
        raise ValueError(f"max_round must be None or >= 1, got {max_round}")
    if method not in ROUND_METHODS or k <= 1:
        order = select_one(x, w, k, method, lam, **params)
        return order, len(order)
    xh = normalize_rows(x)
    n = xh.shape[0]
    imp = normalized_importance(w, n)
    eligible = np.ones(n, dtype=bool)
    if method == "hybrid":
        eligible[:] = False
        eligible[_importance_order(imp)[:hybrid_pool_size(n, k, lam)]] = True
    lam_eff = {"mmr": lam, "topk": 1.0, "fps": 0.0, "hybrid": 0.0, "divprune": 0.0}[method]
    divprune = method == "divprune"
    uses_state = lam_eff < 1.0
    # step 1: a round of one
    if divprune:
        first = int(select_divprune(x, w, 1)[0])
    else:
        first = int(np.argmax(np.where(eligible, imp, -np.inf)))
    order = [first]
    eligible[first] = False
    row = xh @ xh[first]
    state = 1.0 - row if divprune else row                 # min_d (DivPrune) or m
    rounds = 1
    limit = k if max_round is None else max_round

    def score_of(st):
        return st.copy() if divprune else lam_eff * imp - (1.0 - lam_eff) * st

    while len(order) < k:
        score = np.where(eligible, score_of(state), -np.inf)
        idx = np.flatnonzero(eligible)
        cand = idx[np.lexsort((idx, -score[idx]))][:min(limit, k - len(order))]
        rows = []
        for c in cand:
            c = int(c)
            if uses_state and rows:
                if divprune:
                    unchanged = all(1.0 - r[c] >= state[c] for r in rows)
                else:
                    unchanged = all(r[c] <= state[c] for r in rows)
                if not unchanged:
                    break
            order.append(c)
            eligible[c] = False
            rows.append(xh @ xh[c])                       # the same row the sequential loop folds in
        for r in rows:
            state = np.minimum(state, 1.0 - r) if divprune else np.maximum(state, r)
        rounds += 1
    return np.asarray(order, dtype=np.int64), rounds


def select_one(x, w, k: int, method: str = "mmr", lam: float = 0.5, **params) -> np.ndarray:
    """Selection order of one image: ``x [N, D]``, ``w [N]`` or ``None``, ``k <= N``."""
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    return _SELECTORS[method](x, w, k, lam, params)
