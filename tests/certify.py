"""The spec's step certificate, plus token generators shared by the tests.

A backend's selection is correct when each of its steps is an argmax of that
step's score *given its own earlier picks*, within a tolerance (docs/contract.md,
"Precision").  :func:`check_certificate` replays a selection in float64 and
raises ``AssertionError`` naming the first step that is not such an argmax.

:func:`reference_margin` is the other side of the coin: the smallest gap, over
the float64 reference's own steps, between the best and the second-best score.
Inputs whose margin exceeds a backend's tolerance must give *exactly* the
reference's indices; the exact-index tests only use such inputs.
"""
from __future__ import annotations

import numpy as np

from mmrprune import reference as R

TOL = {"float64": 1e-4, "float32": 1e-4, "float16": 4e-3, "bfloat16": 4e-3}


def tol_for(dtype) -> float:
    """Certificate tolerance for a torch/NumPy dtype (or its name)."""
    name = str(dtype).replace("torch.", "")
    return TOL[name]


def to_f64(a):
    """float64 NumPy copy of the exact values a backend saw (after any low-precision cast)."""
    if a is None:
        return None
    if hasattr(a, "detach"):
        import torch
        return a.detach().cpu().to(torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


# ----------------------------------------------------------------------------- generators
def gaussian_tokens(n, d, batch=None, seed=0):
    """i.i.d. standard normal tokens, float64, ``[n, d]`` or ``[batch, n, d]``."""
    rng = np.random.default_rng(seed)
    shape = (n, d) if batch is None else (batch, n, d)
    return rng.standard_normal(shape)


def clustered_tokens(n, d, batch=None, seed=0, centres=4, spread=0.6, noise=0.05):
    """A few centres plus small noise, all sharing a common mean direction, so
    similarities are mostly positive and clustered, like real ViT tokens."""
    rng = np.random.default_rng(seed)
    nb = 1 if batch is None else batch
    out = np.empty((nb, n, d))
    for b in range(nb):
        base = rng.standard_normal(d)
        cs = base + spread * rng.standard_normal((centres, d))
        assign = rng.integers(0, centres, size=n)
        out[b] = cs[assign] + noise * rng.standard_normal((n, d)) * np.linalg.norm(base) / np.sqrt(d)
    return out[0] if batch is None else out


def distinct_importance(n, batch=None, seed=0):
    """Raw importance with well-separated values (a random permutation of 0..n-1, scaled)."""
    rng = np.random.default_rng(seed + 7919)
    if batch is None:
        return rng.permutation(n).astype(np.float64) * 0.37 + 1.0
    return np.stack([rng.permutation(n).astype(np.float64) * 0.37 + 1.0 for _ in range(batch)])


# ----------------------------------------------------------------------------- replay helpers
def _prepare(features, importance):
    x = to_f64(features)
    assert x.ndim == 2, f"certificate works on one image [N, D], got shape {x.shape}"
    n = x.shape[0]
    w = to_f64(importance)
    if w is not None:
        w = w.reshape(-1)
        assert w.shape[0] == n
    xh = R.normalize_rows(x)
    return xh, n, w


def _valid_picks(picks, n, k):
    p = np.asarray(to_f64(picks) if hasattr(picks, "detach") else picks).astype(np.int64).reshape(-1)
    kept = p[p >= 0]
    n_kept = kept.size
    assert np.all(p[:n_kept] >= 0) and np.all(p[n_kept:] == -1), \
        f"padding: -1 entries must come last and be exactly -1, got {p.tolist()}"
    if k is not None:
        assert n_kept == k, f"count: expected {k} picks, got {n_kept} ({p.tolist()})"
    for t, j in enumerate(kept):
        assert 0 <= j < n, f"step {t}: pick {j} out of range [0, {n})"
    seen = set()
    for t, j in enumerate(kept):
        assert j not in seen, f"step {t}: token {j} was already picked"
        seen.add(int(j))
    return kept


def _greedy_steps(method, xh, n, w, k, lam):
    """Generator over steps: yields ``score`` (float64 [N], -inf on ineligible tokens)
    and receives the pick actually made; implements mmr/topk/fps/hybrid/divprune/dpp.

    The caller sends the pick back with ``gen.send(j)``.  For dpp the generator
    yields ``None`` once the remaining gains are all below DPP_EPS (any pick valid).
    """
    imp = R.normalized_importance(w, n)
    picked = np.zeros(n, dtype=bool)
    gram = xh @ xh.T
    if method in ("mmr", "topk", "fps"):
        lam_eff = {"mmr": lam, "topk": 1.0, "fps": 0.0}[method]
        m = np.full(n, -np.inf)
        for t in range(k):
            score = imp.copy() if t == 0 else lam_eff * imp - (1.0 - lam_eff) * m
            score[picked] = -np.inf
            j = yield score
            picked[j] = True
            m = np.maximum(m, gram[j])
    elif method == "hybrid":
        c = R.hybrid_pool_size(n, k, lam)
        # the pool boundary is itself a score: tokens within tol of the c-th
        # importance may or may not be in a backend's pool (handled by the caller)
        m = np.full(n, -np.inf)
        for t in range(k):
            score = imp.copy() if t == 0 else -m
            score[picked] = -np.inf
            j = yield score
            picked[j] = True
            m = np.maximum(m, gram[j])
    elif method == "divprune":
        d = 1.0 - gram
        if n == 1:
            first = np.zeros(1)
        else:
            dd = d.copy()
            np.fill_diagonal(dd, np.inf)
            first = dd.min(axis=1)
        min_d = np.full(n, np.inf)
        for t in range(k):
            score = first.copy() if t == 0 else min_d.copy()
            score[picked] = -np.inf
            j = yield score
            picked[j] = True
            min_d = np.minimum(min_d, d[j])
    elif method == "dpp":
        q = R.dpp_quality(w, n)
        L = q[:, None] * gram * q[None, :]
        d2 = q * q * np.einsum("ij,ij->i", xh, xh)
        cis = np.zeros((k, n))
        dead = False
        for t in range(k):
            score = d2.copy()
            score[picked] = -np.inf
            if dead or score.max() < R.DPP_EPS:
                dead = True
                j = yield None
                picked[j] = True
                continue
            j = yield score
            picked[j] = True
            if d2[j] < R.DPP_EPS:
                dead = True
                continue
            e = (L[j] - cis[:t].T @ cis[:t, j]) / np.sqrt(d2[j])
            cis[t] = e
            d2 = d2 - e * e
    else:
        raise ValueError(method)


def _hybrid_pool_bounds(w, n, k, lam, tol):
    imp = R.normalized_importance(w, n)
    c = R.hybrid_pool_size(n, k, lam)
    thr = np.sort(imp)[::-1][c - 1]
    return imp >= thr - tol, imp > thr + tol  # possibly in the pool, definitely in the pool


# ----------------------------------------------------------------------------- certificate
def check_certificate(features, importance, picks, method="mmr", lam=0.5, tol=1e-4, k=None, **params):
    """Assert that ``picks`` (one image, SELECTION order, -1 padded at the end) is a valid
    greedy selection of ``method`` on ``features [N, D]`` / raw ``importance [N]``
    within ``tol`` (see module docstring).  ``k`` (if given) is the expected count.
    Raises ``AssertionError`` naming the step that fails."""
    xh, n, w = _prepare(features, importance)
    kept = _valid_picks(picks, n, k)
    k_eff = kept.size
    if k_eff == 0:
        return
    if method == "d2pruner":
        _check_d2pruner(xh, n, w, kept, tol, params)
        return
    assert not params, f"method {method!r} takes no parameters, got {params}"
    possible = definite = None
    if method == "hybrid":
        possible, definite = _hybrid_pool_bounds(w, n, k_eff, lam, tol)
    gen = _greedy_steps(method, xh, n, w, k_eff, lam)
    score = next(gen)
    for t, j in enumerate(kept):
        j = int(j)
        if score is not None:
            if method == "hybrid":
                assert possible[j], (f"step {t}: hybrid pick {j} is outside the importance pool "
                                     f"(c = {R.hybrid_pool_size(n, k_eff, lam)})")
                elig = definite.copy()
                elig[kept[:t]] = False
                best = score[elig].max() if elig.any() else -np.inf
            else:
                best = score.max()
            got = score[j]
            assert got >= best - tol, (
                f"step {t}: {method} picked token {j} with score {got:.8g}, but the best score "
                f"given the earlier picks is {best:.8g} (token {int(np.argmax(score))}); "
                f"gap {best - got:.3g} > tol {tol:g}; picks so far {kept[:t + 1].tolist()}")
        try:
            score = gen.send(j)
        except StopIteration:
            break


def _edge_scores(xh, n, alpha, radius, grid):
    e = alpha * (xh @ xh.T)
    if alpha < 1:
        e = e + (1.0 - alpha) * R.grid_near(n, grid, radius)
    return e


def _check_d2pruner(xh, n, w, kept, tol, params):
    p = {**R.D2PRUNER_DEFAULTS, **params}
    k = kept.size
    imp = R.normalized_importance(w, n)
    tau = p["tau"]
    e = _edge_scores(xh, n, p["alpha"], p["radius"], p["grid"])
    n_piv = min(R.d2pruner_pivot_count(k, p["pivot_ratio"]), k)
    if n_piv:
        thr = np.sort(imp)[::-1][n_piv - 1]
        for t in range(n_piv):
            j = int(kept[t])
            assert imp[j] >= thr - tol, (f"step {t}: d2pruner pivot {j} has Imp {imp[j]:.8g}, below the "
                                         f"{n_piv}-th largest importance {thr:.8g} by more than tol {tol:g}")
    picked = np.zeros(n, dtype=bool)
    picked[kept[:n_piv]] = True
    def_adj = np.zeros(n, dtype=bool)   # definitely adjacent to an earlier pick
    pos_adj = np.zeros(n, dtype=bool)   # possibly adjacent to an earlier pick
    for j in kept[:n_piv]:
        def_adj |= e[j] > tau + tol
        pos_adj |= e[j] >= tau - tol
    for t in range(n_piv, k):
        j = int(kept[t])
        def_pool = ~picked & ~pos_adj    # surely still in the pool
        pos_pool = ~picked & ~def_adj    # maybe still in the pool
        best_def = imp[def_pool].max() if def_pool.any() else -np.inf
        if def_pool.any():
            assert pos_pool[j], (f"step {t}: d2pruner picked {j}, which is adjacent to an earlier pick, "
                                 f"while token {int(np.flatnonzero(def_pool)[0])} is still in the pool")
        if pos_pool[j]:
            ok = imp[j] >= best_def - tol
            if not ok and not def_pool.any():
                ok = True
        else:
            ok = False
        if not ok and not def_pool.any():
            # the pool may be empty: then the pick fills with the most important unselected token
            best_fill = imp[~picked].max()
            ok = imp[j] >= best_fill - tol
            assert ok, (f"step {t}: d2pruner fill pick {j} has Imp {imp[j]:.8g}, but unselected token "
                        f"{int(np.argmax(np.where(picked, -np.inf, imp)))} has Imp {best_fill:.8g}")
        assert ok, (f"step {t}: d2pruner picked {j} with Imp {imp[j]:.8g}, but pool token "
                    f"{int(np.argmax(np.where(def_pool, imp, -np.inf)))} has Imp {best_def:.8g} (tol {tol:g})")
        picked[j] = True
        def_adj |= e[j] > tau + tol
        pos_adj |= e[j] >= tau - tol


# ----------------------------------------------------------------------------- margins
def reference_margin(features, importance, k, method="mmr", lam=0.5, **params) -> float:
    """Smallest best-vs-second-best gap over the float64 reference's steps (inf if every
    step is forced).  For hybrid the pool boundary counts too; for d2pruner the margin is
    the smallest distance of any edge score to tau and of any two importances."""
    xh, n, w = _prepare(features, importance)
    ref = R.select_one(to_f64(features), w, k, method, lam, **params)
    gaps = [np.inf]
    if method == "d2pruner":
        p = {**R.D2PRUNER_DEFAULTS, **params}
        e = _edge_scores(xh, n, p["alpha"], p["radius"], p["grid"])
        iu = np.triu_indices(n, 1)
        gaps.append(np.abs(e[iu] - p["tau"]).min())
        imp = np.sort(R.normalized_importance(w, n))
        if n > 1:
            gaps.append(np.diff(imp).min())
        return float(min(gaps))
    if method == "hybrid":
        imp = np.sort(R.normalized_importance(w, n))[::-1]
        c = R.hybrid_pool_size(n, k, lam)
        if c < n:
            gaps.append(imp[c - 1] - imp[c])
        pool = np.zeros(n, dtype=bool)
        pool[np.argsort(-R.normalized_importance(w, n), kind="stable")[:c]] = True
    gen = _greedy_steps(method, xh, n, w, k, lam)
    score = next(gen)
    for j in ref:
        if score is not None:
            s = score if method != "hybrid" else np.where(pool, score, -np.inf)
            finite = np.sort(s[np.isfinite(s)])
            if finite.size >= 2:
                gaps.append(finite[-1] - finite[-2])
        try:
            score = gen.send(int(j))
        except StopIteration:
            break
    return float(min(gaps))
