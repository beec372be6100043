"""Fused greedy selection loops in Triton: MMR / FPS / hybrid / top-k / DivPrune / DPP.

Read side by side with :mod:`mmrprune.reference`.  Three thin layers:

1. kernels (``_*_kernel``), each docstring states its math;
2. launchers (``launch_*``) that allocate outputs and pick the grid;
3. :func:`triton_greedy`, the public entry registered as the custom op
   ``mmrprune::triton_greedy`` with :func:`torch.library.triton_op`, so
   ``torch.compile(fullgraph=True)`` sees the kernels instead of a graph break.

Layout ("segment form").  ``x [R, D]`` (fp16 / bf16 / fp32) holds image ``b``'s
token ``i`` at row ``starts[b] + i`` for ``i < lengths[b]``; padded ``[B, N, D]``
input is the special case ``starts[b] = b * N``.  Per-row vectors (``imp``,
``state``, ``first``) share that row numbering.  Returned indices are *local*
(``0 .. lengths[b]-1``), ``[B, k_max]`` int64 in selection order, -1 padded.

Similarity.  ``sim(i, j) = (x_i . x_j) * inv_i * inv_j`` with
``inv_i = 1 / max(||x_i||, 1e-12)`` (float32, :func:`_row_inv_norm_kernel`) and
the dot product accumulated in float32.  The greedy loop reads the similarity
row of the last pick either

* from a precomputed Gram ``G [B, n_pad, n_pad]`` float32 built by
  :func:`_gram_kernel` (``tl.dot`` tiles on tensor cores; used while
  ``B * n_pad^2 * 4`` bytes fit in :data:`GRAM_MAX_BYTES`), or
* on demand, as a dot product of the pick's row with every row of the image
  in ``BLOCK_N x BLOCK_D`` tiles (any ``N``; memory ``O(R)``).

State.  One program per image runs all ``k_b`` steps in one launch.  The running
max-similarity ``m_i`` (MMR family) or marginal gain ``d_i^2`` (DPP) lives in a
float32 global scratch ``state [R]``; a token that is picked or not eligible is
encoded in it (``m_i = +inf`` / ``d_i^2 = -inf``), so no separate mask exists.
Argmax with ties to the lowest index: each lane keeps its best (value, index)
with a strict ``>`` over tiles visited in increasing index order, then the
block reduces with ``max`` followed by ``min(index where value == max)``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mmrprune import ops as _ops
from mmrprune.reference import DPP_EPS, NORM_EPS

__all__ = [
    "GRAM_MAX_BYTES", "MAX_ROUND", "greedy_config", "offdiag_blocks", "uses_gram", "MODE_MMR", "MODE_DIVPRUNE", "MODE_DPP",
    "launch_row_inv_norm", "launch_gram", "launch_max_offdiag_sim", "launch_greedy", "launch_dpp",
    "triton_greedy",
]

GRAM_MAX_BYTES = 2 << 30     # precompute the similarity matrix while it fits in this many bytes: (c) 1.85 GB, (d) 1.07 GB
MAX_ROUND = 8                # candidates per round of the MMR-family kernel (a power of two <= 64; 1 = one pick per step)
MODE_MMR, MODE_DIVPRUNE, MODE_DPP = 0, 1, 2

NORM_EPS_C = tl.constexpr(NORM_EPS)   # module constants the kernels read
DPP_EPS_C = tl.constexpr(DPP_EPS)


# =========================================================================== kernels
@triton.jit
def _row_inv_norm_kernel(x_ptr, inv_ptr, R, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """``inv[r] = 1 / max(||x_r||_2, 1e-12)`` in float32 (reference: ``normalize_rows``)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    base = rows.to(tl.int64) * D
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        v = tl.load(x_ptr + base[:, None] + dd[None, :], mask=rmask[:, None] & (dd < D)[None, :], other=0.0)
        v = v.to(tl.float32)
        acc += tl.sum(v * v, axis=1)
    inv = 1.0 / tl.maximum(tl.sqrt(acc), NORM_EPS_C)
    tl.store(inv_ptr + rows, inv, mask=rmask)


@triton.jit
def _dot_tile(x_ptr, rows_a, mask_a, rows_b, mask_b, D, d_end,
              BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc[a, b] = sum_{d < d_end} x[rows_a[a], d] * x[rows_b[b], d]`` (row stride ``D``), float32 accumulation.

    ``UPCAST`` converts the tiles to float32 before ``tl.dot``; the launchers set it
    only under the interpreter for bf16 input (Triton's interpreter computes a bf16
    ``tl.dot`` wrongly); compiled kernels keep bf16 operands on the tensor cores.
    """
    acc = tl.zeros([rows_a.shape[0], rows_b.shape[0]], dtype=tl.float32)
    base_a = rows_a.to(tl.int64) * D
    base_b = rows_b.to(tl.int64) * D
    for d0 in range(0, d_end, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dm = dd < D
        a = tl.load(x_ptr + base_a[:, None] + dd[None, :], mask=mask_a[:, None] & dm[None, :], other=0.0)
        bt = tl.load(x_ptr + base_b[:, None] + dd[None, :], mask=mask_b[:, None] & dm[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(a, tl.trans(bt), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _gram_kernel(x_ptr, inv_ptr, starts_ptr, lengths_ptr, g_ptr, D, n_pad,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``G[b, i, j] = sim(i, j) = (x_i . x_j) inv_i inv_j`` for ``i, j < lengths[b]`` (reference: ``xh @ xh.T``).

    Grid ``(B, cdiv(n_pad, BLOCK_M), cdiv(n_pad, BLOCK_K))``.  Entries with
    ``i`` or ``j >= lengths[b]`` are left unwritten (never read).
    """
    b = tl.program_id(0)
    start = tl.load(starts_ptr + b)
    n = tl.load(lengths_ptr + b)
    i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    j = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    mi = i < n
    mj = j < n
    # a tile entirely outside the image streams nothing: its D loop is empty
    d_end = tl.where((tl.program_id(1) * BLOCK_M < n) & (tl.program_id(2) * BLOCK_K < n), D, 0)
    acc = _dot_tile(x_ptr, start + i, mi, start + j, mj, D, d_end, BLOCK_D, INPUT_PRECISION, UPCAST)
    inv_i = tl.load(inv_ptr + start + i, mask=mi, other=0.0)
    inv_j = tl.load(inv_ptr + start + j, mask=mj, other=0.0)
    sim = acc * inv_i[:, None] * inv_j[None, :]
    g_row = b.to(tl.int64) * n_pad * n_pad + i.to(tl.int64) * n_pad
    tl.store(g_ptr + g_row[:, None] + j[None, :], sim, mask=mi[:, None] & mj[None, :])


@triton.jit
def _max_offdiag_sim_kernel(x_ptr, inv_ptr, g_ptr, starts_ptr, lengths_ptr, first_ptr, D, n_pad,
                            USE_GRAM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """DivPrune's first-step score ``first[i] = min_{j != i} d(i, j) = 1 - max_{j != i} sim(i, j)``.

    ``+inf`` for a single-token image (reference: ``d.min(axis=1)`` with an
    infinite diagonal).  ``USE_GRAM``: reads the rows of the Gram that
    :func:`_gram_kernel` already built (no second ``N^2 D`` pass); else streams
    the similarities in ``BLOCK_M x BLOCK_K`` tiles computed exactly as
    :func:`_gram_kernel` computes them (same tiles, same scaling, so the same
    bits either way) and stores nothing of size ``N^2``.  Grid ``(B, cdiv(n_pad, BLOCK_M))``.
    """
    b = tl.program_id(0)
    start = tl.load(starts_ptr + b)
    n = tl.load(lengths_ptr + b)
    i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mi = i < n
    inv_i = tl.load(inv_ptr + start + i, mask=mi, other=0.0)
    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    n_cols = tl.where(tl.program_id(1) * BLOCK_M < n, n, 0)
    g_row = b.to(tl.int64) * n_pad * n_pad + i.to(tl.int64) * n_pad
    for j0 in range(0, n_cols, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        mj = j < n
        keep = mj[None, :] & (i[:, None] != j[None, :])
        if USE_GRAM:
            sim = tl.load(g_ptr + g_row[:, None] + j[None, :], mask=mi[:, None] & keep, other=float("-inf"))
        else:
            acc = _dot_tile(x_ptr, start + i, mi, start + j, mj, D, D, BLOCK_D, INPUT_PRECISION, UPCAST)
            inv_j = tl.load(inv_ptr + start + j, mask=mj, other=0.0)
            sim = acc * inv_i[:, None] * inv_j[None, :]
        best = tl.maximum(best, tl.max(tl.where(keep, sim, float("-inf")), axis=1))
    tl.store(first_ptr + start + i, 1.0 - best, mask=mi)


@triton.jit
def _sim_row(x_ptr, inv_ptr, g_ptr, b, start, pick, i, mi, D, n_pad,
             USE_GRAM: tl.constexpr, BLOCK_D: tl.constexpr):
    """``sim(i, pick)`` for the token tile ``i`` of image ``b``: a Gram row, or a dot product on demand."""
    if USE_GRAM:
        g_row = (b.to(tl.int64) * n_pad + pick) * n_pad
        sim = tl.load(g_ptr + g_row + i, mask=mi, other=0.0)
    else:
        base_i = (start + i).to(tl.int64) * D
        base_p = (start + pick).to(tl.int64) * D
        acc = tl.zeros([i.shape[0]], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dm = dd < D
            xi = tl.load(x_ptr + base_i[:, None] + dd[None, :], mask=mi[:, None] & dm[None, :], other=0.0)
            xp = tl.load(x_ptr + base_p + dd, mask=dm, other=0.0)
            acc += tl.sum(xi.to(tl.float32) * xp.to(tl.float32)[None, :], axis=1)
        inv_i = tl.load(inv_ptr + start + i, mask=mi, other=0.0)
        inv_p = tl.load(inv_ptr + start + pick)
        sim = acc * inv_i * inv_p
    return sim


@triton.jit
def _lane_best(best_v, best_i, score, i):
    """Per-lane running argmax; tiles come in increasing index order, so strict ``>`` keeps the lowest index."""
    upd = score > best_v
    return tl.where(upd, score, best_v), tl.where(upd, i, best_i)


@triton.jit
def _block_argmax(best_v, best_i, n):
    """``argmax`` over the lanes, ties to the lowest index: ``max`` then ``min(index where == max)``."""
    v = tl.max(best_v, axis=0)
    return tl.min(tl.where(best_v == v, best_i, n), axis=0)


@triton.jit
def _order_key(score, i):
    """int64 key of ``(score desc, index asc)``: a larger key is an earlier pick.

    High 32 bits: the float32 score's bits made order-preserving as a signed
    integer (``-0.0`` first folded into ``+0.0``, as the float compare ties them);
    low 32 bits: ``2^31 - 1 - i``, so of two equal scores the lower index wins.
    """
    s = tl.where(score == 0.0, 0.0, score)
    bits = s.to(tl.int32, bitcast=True)
    mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return mono.to(tl.int64) * 4294967296 + (0x7FFFFFFF - i).to(tl.int64)


@triton.jit
def _key_index(key):
    """The token index a key of :func:`_order_key` carries."""
    return (0x7FFFFFFF - (key - (key >> 32) * 4294967296)).to(tl.int32)


KEY_NONE = tl.constexpr(-9223372036854775807)   # below every key of _order_key (an empty top-R slot)


@triton.jit
def _merge_top(top, key, ROUND: tl.constexpr):
    """The ``ROUND`` largest keys of ``top`` (unordered) and the tile ``key``, unordered.

    A threshold filter instead of a sort: only tile keys above the smallest kept
    key (``thr``) can enter.  Each entry replaces that smallest key, so the tile
    is visited by one ``max`` per key that enters plus one that does not: ``thr``
    only rises, so after the first tiles of a pass most tiles cost one ``max``.
    Keys are distinct (the index is in the low bits), so no two tile keys tie
    and at most ``ROUND`` keys of one tile enter (each later one is smaller than
    every key this tile already put in).
    """
    slots = tl.arange(0, ROUND)
    thr = tl.min(top, axis=0)
    v = tl.max(key, axis=0)
    while v > thr:
        slot = tl.min(tl.where(top == thr, slots, ROUND), axis=0)    # one slot, also when empty slots tie
        top = tl.where(slots == slot, v, top)
        thr = tl.min(top, axis=0)
        v = tl.max(tl.where(key < v, key, KEY_NONE), axis=0)
    return top


@triton.jit
def _fold_picks(x_ptr, inv_ptr, g_ptr, b, start, m, i, mi, prev, n_prev, D, n_pad,
                USE_GRAM: tl.constexpr, DIVERSITY: tl.constexpr, ROUND: tl.constexpr, BLOCK_D: tl.constexpr):
    """``m_i <- max(m_i, sim(i, p))`` and ``m_p <- +inf`` for the previous round's picks
    ``p = prev[0 .. n_prev)`` (in registers: no index is reloaded per tile).

    Gram mode unrolls over the ``ROUND`` slots with predicated loads, so every
    row load of the round is in flight at once; on demand each pick is a
    ``D``-long dot product per token, kept as a loop.
    """
    slots = tl.arange(0, ROUND)
    if USE_GRAM:
        n_prev_v = i * 0 + n_prev    # as a vector: a scalar mask term breaks the interpreter's masked load
        for u in tl.static_range(ROUND):
            pick = tl.sum(tl.where(slots == u, prev, 0), axis=0)
            if DIVERSITY:
                g_row = (b.to(tl.int64) * n_pad + pick) * n_pad
                m = tl.maximum(m, tl.load(g_ptr + g_row + i, mask=mi & (n_prev_v > u), other=float("-inf")))
            m = tl.where((i == pick) & (n_prev_v > u), float("inf"), m)
    else:
        for u in range(0, n_prev):
            pick = tl.sum(tl.where(slots == u, prev, 0), axis=0)
            if DIVERSITY:
                m = tl.maximum(m, _sim_row(x_ptr, inv_ptr, g_ptr, b, start, pick, i, mi, D, n_pad,
                                           USE_GRAM, BLOCK_D))
            m = tl.where(i == pick, float("inf"), m)
    return m


@triton.jit
def _greedy_kernel(x_ptr, inv_ptr, g_ptr, first_ptr, imp_ptr, state_ptr,
                   starts_ptr, lengths_ptr, ks_ptr, out_ptr, rounds_ptr, D, n_pad, k_max, lam,
                   USE_GRAM: tl.constexpr, DIVERSITY: tl.constexpr, ROUND: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """MMR family in exact rounds of up to ``ROUND`` picks, one program per image ``b``
    (reference: ``select_rounds``; picks equal ``select_mmr``, ``select_fps``,
    ``select_hybrid``, ``select_divprune``, ``select_topk``).

    ``state[r]`` enters as ``-inf`` (eligible) or ``+inf`` (not eligible, e.g.
    outside the hybrid pool) and holds ``m_i = max_{j in S} sim(i, j)``, ``+inf``
    once ``i`` is picked.  Score: round 1 ``first_i`` (``Imp``, or DivPrune's
    ``min_{j != i} d(i, j)``), then ``lam * Imp_i - (1 - lam) * m_i``
    (DivPrune ``lam = 0``); ``DIVERSITY = False`` (``lam = 1``: top-k) never
    reads a similarity.

    A round is one pass over the tokens that folds every pick of the previous
    round into ``m`` (:func:`_fold_picks`), scores, and keeps the ``ROUND`` best
    keys ``(score desc, index asc)`` (:func:`_merge_top`), sorted once per round.
    Candidate ``c_j`` is committed while ``sim(c_j, c_l) <= m_{c_j}`` for every
    earlier ``c_l`` of the round: its score is then unchanged by them while
    every other score can only fall, so it is the exact next pick.  The check's
    ``sim(c_j, c_l)`` comes from :func:`_sim_row` with ``pick = c_l`` on a
    ``BLOCK_N``-lane tile, the call and shape the on-demand update uses (Gram
    mode: the same Gram entry), so it has the update's bits.  Round 1 commits
    one pick.  ``ROUND = 1`` is the one-pick-per-step loop (lane argmax, no top-R
    list).  ``rounds[b]`` gets the number of rounds.
    """
    b = tl.program_id(0)
    start = tl.load(starts_ptr + b)
    n = tl.load(lengths_ptr + b).to(tl.int32)
    kb = tl.load(ks_ptr + b).to(tl.int32)
    lanes = tl.arange(0, BLOCK_N)
    slots = tl.arange(0, ROUND)
    out_row = out_ptr + b.to(tl.int64) * k_max
    zero = kb * 0    # int32 loop counters (a Python int would change type inside the loop)
    t = zero         # picks made
    n_prev = zero    # picks of the previous round, not yet folded into m: prev[0 .. n_prev)
    prev = tl.zeros([ROUND], dtype=tl.int32)
    rounds = zero
    while t < kb:
        top = tl.full([ROUND], KEY_NONE, dtype=tl.int64)
        best_v = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        best_i = tl.zeros([BLOCK_N], dtype=tl.int32)
        for n0 in range(0, n, BLOCK_N):
            i = n0 + lanes
            mi = i < n
            m = tl.load(state_ptr + start + i, mask=mi, other=float("inf"))
            m = _fold_picks(x_ptr, inv_ptr, g_ptr, b, start, m, i, mi, prev, n_prev, D, n_pad,
                            USE_GRAM, DIVERSITY, ROUND, BLOCK_D)
            tl.store(state_ptr + start + i, m, mask=mi)
            if t == 0:
                score = tl.load(first_ptr + start + i, mask=mi, other=float("-inf"))
            else:
                imp = tl.load(imp_ptr + start + i, mask=mi, other=0.0)
                if DIVERSITY:
                    score = lam * imp - (1.0 - lam) * m
                else:
                    score = imp
            score = tl.where(m == float("inf"), float("-inf"), score)
            if ROUND == 1:
                best_v, best_i = _lane_best(best_v, best_i, score, i)
            else:
                top = _merge_top(top, _order_key(score, i), ROUND)
        tl.debug_barrier()
        if ROUND == 1:
            n_commit = zero + 1
            cand = tl.zeros([ROUND], dtype=tl.int32) + _block_argmax(best_v, best_i, n)
        else:
            cand = _key_index(tl.sort(top, descending=True))        # [ROUND], best first
            limit = tl.where(t == 0, 1, tl.minimum(kb - t, ROUND))
            # the candidates on BLOCK_N lanes (lane j = c_{j+1}), the tile shape of the update pass
            cand_i = tl.sum(tl.where(lanes[:, None] == slots[None, :], cand[None, :], 0), axis=1)
            live = (lanes < limit) & (cand_i < n)                    # (padding lanes never rank in the top `limit`)
            m_c = tl.load(state_ptr + start + cand_i, mask=live, other=float("inf"))
            fail = (lanes < limit) & (m_c == float("inf"))           # not eligible: never committed
            if DIVERSITY:
                for l in range(0, limit - 1):
                    c_l = tl.sum(tl.where(slots == l, cand, 0), axis=0)
                    later = live & (lanes > l)
                    s = _sim_row(x_ptr, inv_ptr, g_ptr, b, start, c_l, cand_i, later, D, n_pad, USE_GRAM, BLOCK_D)
                    fail = fail | (later & (s > m_c))
            n_commit = tl.minimum(tl.min(tl.where(fail, lanes, BLOCK_N), axis=0), limit)
        tl.store(out_row + t + slots, cand.to(tl.int64), mask=slots < n_commit)
        tl.debug_barrier()
        t += n_commit
        n_prev = n_commit
        prev = cand
        rounds += 1
    tl.store(rounds_ptr + b, rounds.to(tl.int64))


@triton.jit
def _dpp_pick(best_v, best_i, low_i, n):
    """DPP step pick: ``argmax d^2`` (ties lowest) unless the best gain is below
    ``DPP_EPS`` (rank exhausted), then the lowest untaken index ``min(low_i)``."""
    v = tl.max(best_v, axis=0)
    j = tl.min(tl.where(best_v == v, best_i, n), axis=0)
    return tl.where(v < DPP_EPS_C, tl.min(low_i, axis=0), j)


@triton.jit
def _dpp_kernel(x_ptr, inv_ptr, g_ptr, q_ptr, state_ptr, c_ptr,
                starts_ptr, lengths_ptr, ks_ptr, out_ptr, D, n_pad, k_max, R,
                USE_GRAM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Greedy DPP MAP by incremental Cholesky, one program per image (reference: ``select_dpp``).

    ``state[r] = d_r^2`` enters as ``q_r^2 ||x̂_r||^2`` (``-inf`` on tokens that are
    not eligible) and becomes ``-inf`` once picked.  ``c [k_max, R]`` holds the
    Cholesky rows.  Step t: ``j = argmax d^2`` (ties lowest); if that best gain is
    below ``DPP_EPS`` the rank is exhausted: ``j`` is the lowest untaken index and
    every remaining gain becomes 0 (so the rest follows in index order), else for every token
    ``e_i = (q_j sim(j, i) q_i - sum_{s<t} c_s[j] c_s[i]) / d_j``, ``c_t <- e``,
    ``d_i^2 <- d_i^2 - e_i^2``.  The update of step t and the argmax of step t+1
    share one pass over the tokens.
    """
    b = tl.program_id(0)
    start = tl.load(starts_ptr + b)
    n = tl.load(lengths_ptr + b).to(tl.int32)
    kb = tl.load(ks_ptr + b).to(tl.int32)
    lanes = tl.arange(0, BLOCK_N)
    out_row = out_ptr + b.to(tl.int64) * k_max

    best_v = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    best_i = tl.zeros([BLOCK_N], dtype=tl.int32)
    low_i = tl.full([BLOCK_N], n, dtype=tl.int32)     # lowest untaken index per lane
    for n0 in range(0, n, BLOCK_N):
        i = n0 + lanes
        mi = i < n
        d2 = tl.load(state_ptr + start + i, mask=mi, other=float("-inf"))
        best_v, best_i = _lane_best(best_v, best_i, d2, i)
        low_i = tl.minimum(low_i, tl.where(d2 != float("-inf"), i, n))
    pick = _dpp_pick(best_v, best_i, low_i, n)
    tl.store(out_row, pick.to(tl.int64), mask=kb > 0)

    for t in range(1, kb):
        s_row = t - 1                                  # Cholesky row written by this update
        c_out = c_ptr + tl.cast(s_row, tl.int64) * R + start
        d2_pick = tl.load(state_ptr + start + pick)
        # the pick had the best gain, so d2_pick < DPP_EPS exactly when the rank was exhausted
        dead = d2_pick < DPP_EPS_C
        inv_dj = 1.0 / tl.sqrt(tl.maximum(d2_pick, DPP_EPS_C))
        q_pick = tl.load(q_ptr + start + pick)
        best_v = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        best_i = tl.zeros([BLOCK_N], dtype=tl.int32)
        low_i = tl.full([BLOCK_N], n, dtype=tl.int32)
        for n0 in range(0, n, BLOCK_N):
            i = n0 + lanes
            mi = i < n
            d2 = tl.load(state_ptr + start + i, mask=mi, other=float("-inf"))
            q = tl.load(q_ptr + start + i, mask=mi, other=0.0)
            sim = _sim_row(x_ptr, inv_ptr, g_ptr, b, start, pick, i, mi, D, n_pad, USE_GRAM, BLOCK_D)
            proj = tl.zeros([BLOCK_N], dtype=tl.float32)
            for s in range(0, s_row):
                c_row = c_ptr + tl.cast(s, tl.int64) * R + start
                proj += tl.load(c_row + pick) * tl.load(c_row + i, mask=mi, other=0.0)
            e = (q_pick * sim * q - proj) * inv_dj
            e = tl.where(dead, 0.0, e)
            tl.store(c_out + i, e, mask=mi)
            gone = (d2 == float("-inf")) | (i == pick)
            d2 = tl.where(gone, float("-inf"), tl.where(dead, 0.0, d2 - e * e))
            tl.store(state_ptr + start + i, d2, mask=mi)
            best_v, best_i = _lane_best(best_v, best_i, d2, i)
            low_i = tl.minimum(low_i, tl.where(d2 != float("-inf"), i, n))
        tl.debug_barrier()
        pick = _dpp_pick(best_v, best_i, low_i, n)
        tl.store(out_row + t, pick.to(tl.int64))


# =========================================================================== launchers
# tl.dot precision of every launch: fp32 in runs exact fp32 FMA (no TF32); fp16/bf16 products
# are exact in fp32 anyway
INPUT_PRECISION = "ieee"


def _upcast(x: torch.Tensor) -> bool:
    """bf16 ``tl.dot`` is wrong under the interpreter: upcast the tiles there (only there)."""
    return os.environ.get("TRITON_INTERPRET") == "1" and x.dtype == torch.bfloat16


def launch_row_inv_norm(x: torch.Tensor) -> torch.Tensor:
    """``[R]`` float32 inverse row norms of ``x [R, D]``."""
    r, d = x.shape
    inv = torch.empty(r, dtype=torch.float32, device=x.device)
    block_r, block_d = 16, 128
    triton_wrap(_row_inv_norm_kernel)[(triton.cdiv(max(r, 1), block_r),)](
        x, inv, r, d, BLOCK_R=block_r, BLOCK_D=block_d)
    return inv


def launch_gram(x, inv, starts, lengths, n_pad: int) -> torch.Tensor:
    """``[B, n_pad, n_pad]`` float32 per-image similarity matrices (entries past ``lengths`` undefined)."""
    bsz = starts.shape[0]
    g = torch.empty((bsz, n_pad, n_pad), dtype=torch.float32, device=x.device)
    bm = bk = 64
    grid = (bsz, triton.cdiv(n_pad, bm), triton.cdiv(n_pad, bk))
    triton_wrap(_gram_kernel)[grid](x, inv, starts, lengths, g, x.shape[1], n_pad,
                                    BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=32, INPUT_PRECISION=INPUT_PRECISION, UPCAST=_upcast(x))
    return g


def offdiag_blocks(use_gram: bool) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_K)`` of :func:`_max_offdiag_sim_kernel`: reading Gram rows, 16 rows x 128
    contiguous columns (coalesced; 64 x 64 there needs 255 registers and spills); computing
    them, the Gram kernel's own 64 x 64 tiles, so the similarities have the Gram's bits."""
    return (16, 128) if use_gram else (64, 64)


def launch_max_offdiag_sim(x, inv, g, starts, lengths, n_pad: int, use_gram: bool) -> torch.Tensor:
    """``[R]`` float32 DivPrune first-step scores ``1 - max_{j != i} sim(i, j)``, from the rows of
    the Gram ``g`` when ``use_gram`` (else recomputed tile by tile, nothing ``N^2`` stored)."""
    first = torch.full((x.shape[0],), float("-inf"), dtype=torch.float32, device=x.device)
    bsz = starts.shape[0]
    bm, bk = offdiag_blocks(use_gram)
    grid = (bsz, triton.cdiv(max(n_pad, 1), bm))
    triton_wrap(_max_offdiag_sim_kernel)[grid](x, inv, g, starts, lengths, first, x.shape[1], n_pad if use_gram else 0,
                                               USE_GRAM=use_gram, BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=32,
                                               INPUT_PRECISION=INPUT_PRECISION, UPCAST=_upcast(x))
    return first


def _loop_blocks(use_gram: bool):
    """``(BLOCK_N, BLOCK_D)`` of the DPP loop (4 warps).  Gram rows are plain vector loads: wide
    tiles; on demand, a ``[BLOCK_N, BLOCK_D]`` tile of ``x`` per ``D`` chunk.  The interpreter runs
    every tile op in NumPy: narrow tiles there (the picks do not depend on the tile width)."""
    if use_gram and os.environ.get("TRITON_INTERPRET") != "1":
        return 512, 32
    return (64, 32) if use_gram else (64, 128)


def greedy_config(use_gram: bool, n_pad: int, max_round: int = MAX_ROUND) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_D, num_warps)`` of :func:`_greedy_kernel` for images of up to ``n_pad`` tokens.

    Gram mode: one tile of up to 1024 tokens (fewer tiles = fewer dependent reductions per
    round; the whole of (a)'s 576 tokens is one tile) on 16 warps (8 for 512), so each thread
    holds 2 tokens and the round's Gram-row loads of every token are in flight at once.
    2048-wide tiles spill at (d) (Triton 3.6 on 8 warps, 3.9 on 16), so 1024 is the widest.  On demand: ``64 x 128`` tiles of ``x`` streamed by 8 warps.  Under the interpreter
    the tiles are 16 wide (at least ``max_round``), so the tiny test images span several tiles
    and the cross-tile top-R merge runs there too.  ``tests/test_triton_compile.py`` builds these
    configurations at the target shapes and asserts no spills."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return max(16, max_round), (32 if use_gram else 128), 4
    if use_gram:
        block_n = min(1024, max(512, triton.next_power_of_2(max(n_pad, 1))))
        return block_n, 32, block_n // 64
    return max(64, max_round), 128, 8


def launch_greedy(x, inv, g, first, imp, state, starts, lengths, ks, k_max: int, lam: float,
                  use_gram: bool, diversity: bool, max_round: int = MAX_ROUND):
    """``(out [B, k_max], rounds [B])`` int64: picks in selection order and rounds run per image."""
    bsz = starts.shape[0]
    out = torch.full((bsz, k_max), -1, dtype=torch.int64, device=x.device)
    rounds = torch.zeros(bsz, dtype=torch.int64, device=x.device)
    n_pad = g.shape[1] if use_gram else 0
    block_n, block_d, warps = greedy_config(use_gram, n_pad, max_round)
    triton_wrap(_greedy_kernel)[(bsz,)](x, inv, g, first, imp, state, starts, lengths, ks, out, rounds,
                                        x.shape[1], n_pad, k_max, float(lam),
                                        USE_GRAM=use_gram, DIVERSITY=diversity, ROUND=max_round,
                                        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps)
    return out, rounds


def launch_dpp(x, inv, g, q, state, starts, lengths, ks, k_max: int, use_gram: bool) -> torch.Tensor:
    bsz = starts.shape[0]
    r = x.shape[0]
    out = torch.full((bsz, k_max), -1, dtype=torch.int64, device=x.device)
    chol = torch.empty((max(k_max - 1, 1), r), dtype=torch.float32, device=x.device)
    block_n, block_d = _loop_blocks(use_gram)
    n_pad = g.shape[1] if use_gram else 0
    triton_wrap(_dpp_kernel)[(bsz,)](x, inv, g, q, state, chol, starts, lengths, ks, out,
                                     x.shape[1], n_pad, k_max, r,
                                     USE_GRAM=use_gram, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4)
    return out


def triton_wrap(kernel):
    """``torch.library.wrap_triton``: ``torch.compile`` traces the launch (torch >= 2.6, setup.py's floor)."""
    return torch.library.wrap_triton(kernel)


# =========================================================================== public function
def uses_gram(bsz: int, n_pad: int, use_gram: int = -1) -> bool:
    """Whether a call builds the ``[B, n_pad, n_pad]`` float32 Gram: ``use_gram`` 1 / 0 forces it,
    -1 builds it while it fits :data:`GRAM_MAX_BYTES` (``mmrprune.workspace`` counts it)."""
    return bool(use_gram) if use_gram >= 0 else bsz * n_pad * n_pad * 4 <= GRAM_MAX_BYTES


def _triton_greedy_impl(x: torch.Tensor, imp: torch.Tensor, state_init: torch.Tensor, starts: torch.Tensor,
                        lengths: torch.Tensor, ks: torch.Tensor, k_max: int, n_pad: int, lam: float,
                        mode: int, use_gram: int, max_round: int = MAX_ROUND) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, rounds)``: selection order ``[B, k_max]`` int64 (local indices, -1 padded) of
    every image, and ``[B]`` int64 sequential rounds each image took (DPP: one per pick).

    Args (segment form, all on one device, none written to):
        x: ``[R, D]`` fp16 / bf16 / fp32 rows, contiguous.
        imp: ``[R]`` float32 ``Imp`` (``mode`` 0, 1) or DPP quality ``q`` (``mode`` 2).
        state_init: ``[R]`` float32 initial state: MMR family ``-inf`` eligible / ``+inf`` not;
            DPP ``q^2 ||x̂||^2`` eligible / ``-inf`` not.  Copied, never modified.
        starts, lengths, ks: ``[B]`` int64.
        k_max: output width.  n_pad: an upper bound of ``lengths`` (grid and Gram size).
        lam: MMR trade-off (ignored by DivPrune / DPP).
        mode: :data:`MODE_MMR` (first step ``argmax Imp``), :data:`MODE_DIVPRUNE`, :data:`MODE_DPP`.
        use_gram: 1 precompute the similarity matrix, 0 similarity rows on demand,
            -1 precompute while ``B * n_pad^2 * 4 <= GRAM_MAX_BYTES``.
        max_round: most picks committed per round (MMR family), a power of two in 1 .. 64.
    """
    if max_round < 1 or max_round > 64 or max_round & (max_round - 1):
        raise ValueError(f"triton_greedy: max_round must be a power of two in 1 .. 64, got {max_round}")
    bsz = starts.shape[0]
    use_gram = int(uses_gram(bsz, n_pad, use_gram))
    diversity = mode != MODE_MMR or lam < 1.0
    inv = launch_row_inv_norm(x)
    g = launch_gram(x, inv, starts, lengths, n_pad) if (use_gram and diversity) else inv.new_empty((1, 1, 1))
    state = state_init.clone()
    if mode == MODE_DPP:
        return launch_dpp(x, inv, g, imp, state, starts, lengths, ks, k_max, bool(use_gram)), ks.clone()
    if mode == MODE_DIVPRUNE:
        first = launch_max_offdiag_sim(x, inv, g, starts, lengths, n_pad, bool(use_gram))
        lam = 0.0
    else:
        first = imp
    return launch_greedy(x, inv, g, first, imp, state, starts, lengths, ks, k_max, lam,
                         bool(use_gram and diversity), diversity, max_round)


# registered (with every other op) through mmrprune.ops: one version floor, one eager fast path
triton_greedy = _ops.register_triton_op("triton_greedy", _triton_greedy_impl)


# =========================================================================== interpreter check
@triton.jit
def _interpreter_probe(out_ptr, n):
    """Counts to ``n`` in a loop bounded by a scalar argument, as every kernel above does."""
    acc = tl.zeros([1], dtype=tl.int32)
    for _ in range(0, n):
        acc += 1
    tl.store(out_ptr + tl.arange(0, 1), acc)


def _check_interpreter() -> None:
    """Under ``TRITON_INTERPRET=1``, refuse at import (so ``backend="triton"`` is reported
    unavailable, saying why) when this Triton's interpreter cannot run a loop bounded by a
    scalar argument.  Triton 3.6's interpreter turns such an argument into a one-element
    array and converts it with ``int()``, which NumPy 2.4 refuses ("only 0-dimensional
    arrays can be converted to Python scalars"); Triton 3.7.1 and later squeeze it first.
    Compiled kernels (a GPU) are unaffected."""
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _interpreter_probe[(1,)](out, 3)
        ok = int(out[0]) == 3
        why = f"it counted to {int(out[0])} instead of 3"
    except Exception as exc:
        ok, why = False, f"{type(exc).__name__}: {exc}"
    if not ok:
        import numpy
        raise RuntimeError(f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) cannot run these "
                           f"kernels with NumPy {numpy.__version__}: a loop bounded by a kernel argument fails "
                           f"({why}); use Triton >= 3.7 for the interpreter (compiled kernels are unaffected)")


if os.environ.get("TRITON_INTERPRET") == "1":
    _check_interpreter()
