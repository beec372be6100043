"""``backend="torch"``: every method in plain PyTorch ops, batched over images.

One Python loop over the K greedy steps; each step is a handful of batched
ops over ``[B, N]`` (no loop over images, no host sync for padded input), so
the backend runs on CPU and CUDA tensors and traces under ``torch.compile``.
It is the fallback when no extension is built and the baseline every fused
kernel must beat.  Read it side by side with :mod:`mmrprune.reference`.
"""
from __future__ import annotations

import torch

from ..batch import SelectionBatch
from ..prepare import (GRAM_CHUNK_BYTES, MAXSIM_METHODS, NEG_INF, divprune_first_score, hybrid_pool_rows,
                       maxsim_plan, normalize_rows, to_padded)
from ..reference import DPP_EPS, METHODS
from . import Backend

# The step loops read similarity rows from the batch's whole Gram [B, N, N] when it takes at most
# this much memory (the anchor loop's choice, one image at a time: every step is then a gather),
# and otherwise compute each step's row as a [B, 1, D] x [B, D, N] product (memory-bound: it reads
# all of x̂ once per step, which loses to one Gram bmm whenever the Gram fits).
GRAM_MAX_BYTES = 1 << 30


def _row_gather(t: torch.Tensor):
    """``pick -> t[b, pick_b]`` for every image: ``[B, ...]``.  A flat ``index_select``: on CPU,
    advanced indexing ``t[arange(B), pick]`` of a large ``t`` costs milliseconds per call, this
    microseconds; the flat view and the row offsets are made once, for every step."""
    bsz, n = t.shape[:2]
    flat = t.reshape(bsz * n, *t.shape[2:])
    offsets = torch.arange(bsz, device=t.device) * n
    return lambda pick: flat.index_select(0, offsets + pick)


def _rows_of(t: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    """``t[b, pick_b]`` for every image: ``[B, ...]`` (see :func:`_row_gather`)."""
    return _row_gather(t)(pick)


def _sim_to(xn: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    """``sim(i, pick_b)`` for every token of every image: ``[B, N]``."""
    rows = _rows_of(xn, pick)                                                # [B, D]
    # [B, 1, D] x [B, D, N]: on CPU this layout is ~10x faster than [B, N, D] x [B, D, 1]
    return torch.bmm(rows.unsqueeze(1), xn.transpose(1, 2)).squeeze(1)


# Tile edge of the blocked Gram (:func:`_symmetric_gram`): every GEMM of an image is one
# GRAM_TILE x D x GRAM_TILE product (or smaller for a small image), large enough to run at
# the CPU GEMM's full rate.
GRAM_TILE = 256


def _symmetric_gram(xn: torch.Tensor, out: torch.Tensor):
    """``out [n, n] = x̂ x̂ᵀ`` of one image's unit rows ``xn [n, D]``, in tiles above the
    diagonal, each mirrored below it.

    Half the GEMM work of ``xn @ xn.T`` (``(t + 1) / 2t`` of it for ``t`` tile rows), which is
    what beats the anchor loop on CPU: both are bound by this product.  Every tile is a product of
    the same shape (the rows are zero-padded to whole tiles), so the GEMM runs one kernel
    for every pair, and ``sim(i, j)`` and ``sim(j, i)`` are the same number: duplicate tokens
    keep equal rows and columns, as the contract's lowest-index tie rule needs."""
    n, d = xn.shape
    # the fewest tile rows of at most GRAM_TILE, then the smallest tile (a multiple of 16)
    # covering n with them: padding stays under 16 rows per tile (576 rows: 3 x 192, not 3 x 256)
    rows = -(-n // GRAM_TILE)           # ceil(n / GRAM_TILE)
    tile = -(-(-(-n // rows)) // 16) * 16  # ceil(n / rows), rounded up to a multiple of 16
    n_pad = rows * tile
    if n_pad != n:
        xn = torch.cat([xn, xn.new_zeros(n_pad - n, d)])
    block = torch.empty((tile, tile), dtype=xn.dtype, device=xn.device)
    for i0 in range(0, n, tile):
        i1 = min(n, i0 + tile)
        for j0 in range(i0, n, tile):
            j1 = min(n, j0 + tile)
            torch.mm(xn[i0:i0 + tile], xn[j0:j0 + tile].T, out=block)
            if j0 == i0:  # the diagonal tile: its upper triangle (diagonal included), mirrored
                out[i0:i1, i0:i1] = (block.triu() + block.triu(1).T)[:i1 - i0, :i1 - i0]
            else:
                out[i0:i1, j0:j1] = block[:i1 - i0, :j1 - j0]
                out[j0:j1, i0:i1] = block[:i1 - i0, :j1 - j0].T


def _gram_if_fits(x: torch.Tensor, dtype: torch.dtype):
    """The Gram ``x̂ x̂^T`` ``[B, N, N]`` of the unit rows of ``x [B, N, D]`` when it fits in
    :data:`GRAM_MAX_BYTES`, else ``None``.

    Built one image at a time, as the anchor loop does: an image's unit rows stay in cache
    between the normalisation and its product, where a batched [B, N, D] float32 copy would
    be written and read back from memory (bench/results/op_overhead.md has the measurement);
    and on CPU by :func:`_symmetric_gram`, half the product's work.

    float32 only: in float64, the CPU GEMM rounded some Gram columns differently from others
    (tests/test_fuzz.py seeds 51, 72), so duplicate tokens stopped tying exactly and the
    lowest-twin-first rule broke; the per-step product keeps them equal."""
    bsz, n, _ = x.shape
    if dtype != torch.float32 or bsz * n * n * 4 > GRAM_MAX_BYTES:
        return None
    gram = torch.empty((bsz, n, n), dtype=dtype, device=x.device)
    for b in range(bsz):
        xn = normalize_rows(x[b], dtype)
        if x.device.type == "cpu":
            _symmetric_gram(xn, gram[b])
        else:
            # one launch: on a GPU the product is cheap next to a launch per tile and the
            # mirrored copies (an estimate: no GPU has run this yet)
            torch.mm(xn, xn.T, out=gram[b])
    return gram


def _similarity_rows(xn: torch.Tensor, gram):
    """``rows(pick) -> sim(i, pick_b)`` ``[B, N]`` for the step loops: a gather from ``gram``
    (see :func:`_gram_if_fits`), else :func:`_sim_to` per step."""
    if gram is None:
        return lambda pick: _sim_to(xn, pick)
    return _row_gather(gram)


def _importance_rank(imp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Token indices by decreasing Imp, ties to the lowest index, padding last."""
    key = torch.where(valid, imp, NEG_INF)
    return torch.sort(key, dim=1, descending=True, stable=True).indices


def _mark(mask: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    return mask.scatter(1, pick.unsqueeze(1), True)


def _greedy_max_similarity(xn, imp, eligible, ks, k_max, lam, first_score=None, gram=None):
    """MMR / FPS / hybrid / DivPrune core.

    Step 1 maximises ``first_score`` (default ``Imp``); step t maximises
    ``lam * Imp - (1 - lam) * m`` over eligible, unpicked tokens, with
    ``m_i = max_{j in S} sim(i, j)``: rows of ``gram`` when given (``xn`` may then be None),
    else products with the unit rows ``xn``.
    """
    bsz, n = imp.shape
    m = torch.full((bsz, n), NEG_INF, dtype=imp.dtype, device=imp.device)
    taken = ~eligible
    rows = _similarity_rows(xn, gram)
    lam_imp = lam * imp
    picks = []
    # as few ops per step as the rule allows: each is a dispatch, and at B x N = 8 x 1024 the
    # dispatches, not the arithmetic, are the step's cost
    for t in range(k_max):
        if t == 0:
            score = imp if first_score is None else first_score
        else:
            score = torch.add(lam_imp, m, alpha=-(1.0 - lam))              # lam Imp - (1 - lam) m
        pick = torch.argmax(score.masked_fill(taken, NEG_INF), dim=1)  # first max = lowest index
        picks.append(pick)
        taken = _mark(taken, pick)
        if t + 1 < k_max:
            torch.maximum(m, rows(pick), out=m)
    if not picks:
        return torch.full((bsz, 0), -1, dtype=torch.int64, device=imp.device)
    out = torch.stack(picks, dim=1)
    steps = torch.arange(k_max, device=imp.device)[None, :]
    return torch.where(steps < ks[:, None], out, -1)


def _topk(imp, valid, ks, k_max):
    order = _importance_rank(imp, valid)[:, :k_max]
    steps = torch.arange(k_max, device=imp.device)[None, :]
    return torch.where(steps < ks[:, None], order, -1)


def _dpp(xn, q, valid, ks, k_max):
    """Greedy MAP of the DPP with kernel ``L = diag(q) S diag(q)`` (Chen et al., 2018)."""
    bsz, n, _ = xn.shape
    out = torch.full((bsz, k_max), -1, dtype=torch.int64, device=xn.device)
    cis = torch.zeros((bsz, k_max, n), dtype=xn.dtype, device=xn.device)
    # L_ii: exactly q^2 for a non-zero token (so equal qualities tie exactly), 0 for a zero vector
    d2 = q * q * (xn.abs().amax(dim=2) > 0).to(xn.dtype)
    taken = ~valid
    ar = torch.arange(bsz, device=xn.device)
    for t in range(k_max):
        # no gain left (best < DPP_EPS): zero every gain, the rest goes in index order
        dead = (d2.masked_fill(taken, NEG_INF).amax(dim=1) < DPP_EPS)[:, None]
        d2 = torch.where(dead, 0.0, d2)
        pick = torch.argmax(d2.masked_fill(taken, NEG_INF), dim=1)
        out[:, t] = torch.where(t < ks, pick, -1)
        taken = _mark(taken, pick)
        d2_pick = d2[ar, pick]
        l_pick = q[ar, pick][:, None] * _sim_to(xn, pick) * q                # L_{j, i}
        proj = torch.bmm(cis[ar, :t, pick].unsqueeze(1), cis[:, :t]).squeeze(1) if t else 0.0  # <c_j, c_i>
        e = (l_pick - proj) / torch.sqrt(d2_pick.clamp_min(DPP_EPS))[:, None]
        e = torch.where(dead, 0.0, e)
        cis[:, t] = e
        d2 = torch.where(dead, 0.0, d2 - e * e)
    return out


def _d2pruner(xn, imp, valid, ks, k_max, pivot_ratio, alpha, tau, radius, grid):
    """Pivots by importance, then a greedy maximal independent set on the hybrid graph."""
    bsz, n, _ = xn.shape
    out = torch.full((bsz, k_max), -1, dtype=torch.int64, device=xn.device)
    rank = _importance_rank(imp, valid)
    n_pivots = torch.round(ks.to(torch.float64) * pivot_ratio).to(torch.int64)
    if alpha < 1.0:
        pos = torch.arange(n, device=xn.device)
        row, col = pos // grid[1], pos % grid[1]
    selected = ~valid  # padding counts as unavailable
    pool = valid.clone()
    for t in range(min(k_max, n)):
        is_pivot = t < n_pivots
        from_pool = pool.any(dim=1)
        candidates = torch.where(from_pool[:, None], pool, ~selected)
        mis_pick = torch.argmax(imp.masked_fill(~candidates, NEG_INF), dim=1)
        pick = torch.where(is_pivot, rank[:, min(t, n - 1)], mis_pick)
        out[:, t] = torch.where(t < ks, pick, -1)
        selected = _mark(selected, pick)
        link = alpha * _sim_to(xn, pick)
        if alpha < 1.0:
            cheb = torch.maximum((row[None, :] - row[pick][:, None]).abs(), (col[None, :] - col[pick][:, None]).abs())
            link = link + (1.0 - alpha) * (cheb <= radius).to(link.dtype)
        drop_neighbours = (is_pivot | from_pool)[:, None] & (link > tau)
        pool = pool & ~drop_neighbours & ~selected
    return out


def select(batch: SelectionBatch) -> torch.Tensor:
    """``[B, k_max]`` local indices in selection order, -1 past each image's budget."""
    x, imp, q, valid = batch.padded()
    method, lam, ks, k_max = batch.method, batch.lam, batch.ks, batch.k_max
    if method == "topk":
        return _topk(imp, valid, ks, k_max)
    if method in MAXSIM_METHODS:
        plan = maxsim_plan(method, lam)
        eligible = to_padded(batch, hybrid_pool_rows(batch), False) if plan.pooled else valid
        gram = _gram_if_fits(x, batch.compute_dtype)
        xn = normalize_rows(x, batch.compute_dtype) if gram is None else None
        if plan.divprune:
            return _greedy_max_similarity(xn, torch.zeros_like(imp), eligible, ks, k_max, plan.lam,
                                          first_score=divprune_first_score(xn, valid, gram), gram=gram)
        return _greedy_max_similarity(xn, imp, eligible, ks, k_max, plan.lam, gram=gram)
    xn = normalize_rows(x, batch.compute_dtype)
    if method == "dpp":
        return _dpp(xn, q.to(xn.dtype), valid, ks, k_max)
    if method == "d2pruner":
        return _d2pruner(xn, imp, valid, ks, k_max, **batch.params)
    raise AssertionError(method)


def workspace(batch: SelectionBatch) -> int:
    """Batched ``[B, N]`` state (and, packed, the padded copy of the features); every method but
    topk (which reads only the importance) adds the normalised copy ``[B, N, D]`` and its
    transpose, dpp its Cholesky rows, the max-similarity methods the Gram while it fits
    ``GRAM_MAX_BYTES`` (float32 only) and divprune its first step's row blocks."""
    method, bsz, dim, k = batch.method, batch.batch_size, batch.dim, int(batch.k_max)
    n = batch.max_length()
    c = batch.compute_dtype.itemsize
    padded = bsz * n
    total = 8 * padded * 8
    if batch.packed:
        total += padded * dim * batch.features.element_size()
    if method == "topk":
        return total
    total += 2 * padded * dim * c
    if method == "dpp":
        total += bsz * k * n * c
    elif method in MAXSIM_METHODS:
        gram = bsz * n * n * 4
        if c == 4 and gram <= GRAM_MAX_BYTES:   # the step loops' float32 Gram (_gram_if_fits)
            total += gram
        if method == "divprune":                # its first step's row blocks
            total += min(GRAM_CHUNK_BYTES, bsz * n * n * c)
    return total


# always available: its status never changes
BACKEND = Backend(name="torch", methods=METHODS, device_types=("cpu", "cuda"), select=select,
                  status=lambda: (True, "pure PyTorch ops; always available"), workspace=workspace)
