"""Per-batch preparation every backend shares: layouts, the hybrid pool, DivPrune's first step.

A :class:`~mmrprune.batch.SelectionBatch` reaches a backend in one of two
layouts (padded ``[B, N, D]`` or packed ``[T, D]``); both have the *segment
form* ``batch.rows()`` where token ``i`` of image ``b`` is row
``starts[b] + i``.  The functions here turn a batch into what a kernel reads,
with torch ops only and without a host sync unless the docstring says so:

* :func:`to_padded` / :func:`from_padded`: per-row tensors to the padded layout and back
  (the layout facts themselves are methods of the batch: ``row_layout``,
  ``max_length``, ``padded_index``, ``padded``);
* :func:`hybrid_pool_size` / :func:`hybrid_pool_rows`: the naive hybrid's pool;
* :func:`normalize_rows`, :func:`divprune_first_score`, :func:`divprune_first_rows`:
  DivPrune's first-step score ``1 - max_{j != i} sim(i, j)``;
* :func:`maxsim_plan`: how each max-similarity method (mmr, fps, topk, hybrid,
  divprune) maps onto the one greedy loop ``lam * Imp - (1 - lam) * m``.

Backends import this module; it imports only :mod:`mmrprune.batch` and
:mod:`mmrprune.reference`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .batch import SelectionBatch
from .reference import NORM_EPS

NEG_INF = float("-inf")
GRAM_CHUNK_BYTES = 256 << 20  # DivPrune's first step streams the Gram in row blocks of this size


# ----------------------------------------------------------------------------- method -> greedy loop
@dataclass(frozen=True)
class MaxSimPlan:
    """One max-similarity method as parameters of the shared greedy loop.

    Step 1 maximises ``Imp`` (or DivPrune's first score); step t maximises
    ``lam * Imp_i - (1 - lam) * max_{j in S} sim(i, j)`` over eligible tokens."""
    lam: float           # trade-off of steps 2..k
    pooled: bool         # eligible tokens: the hybrid pool (else every valid token)
    divprune: bool       # step 1 maximises DivPrune's first score; importance is ignored


MAXSIM_METHODS = ("mmr", "fps", "topk", "hybrid", "divprune")


def maxsim_plan(method: str, lam: float) -> MaxSimPlan:
    """The :class:`MaxSimPlan` of ``method`` (one of :data:`MAXSIM_METHODS`) at trade-off ``lam``."""
    if method == "mmr":
        return MaxSimPlan(lam=float(lam), pooled=False, divprune=False)
    if method == "topk":
        return MaxSimPlan(lam=1.0, pooled=False, divprune=False)
    if method == "fps":
        return MaxSimPlan(lam=0.0, pooled=False, divprune=False)
    if method == "hybrid":
        return MaxSimPlan(lam=0.0, pooled=True, divprune=False)
    if method == "divprune":
        return MaxSimPlan(lam=0.0, pooled=False, divprune=True)
    raise ValueError(f"method {method!r} is not a max-similarity method ({list(MAXSIM_METHODS)})")


# ----------------------------------------------------------------------------- layouts
def to_padded(batch: SelectionBatch, per_row: torch.Tensor, fill) -> torch.Tensor:
    """``per_row [rows, ...]`` in the padded layout ``[B, N, ...]``, ``fill`` on padding
    (a view for padded input, a gather with one host sync for packed input)."""
    if not batch.packed:
        n = batch.features.shape[1]
        return per_row.reshape(batch.batch_size, n, *per_row.shape[1:])
    idx, valid = batch.padded_index(batch.max_length())
    valid = valid.reshape(*valid.shape, *([1] * (per_row.dim() - 1)))
    return torch.where(valid, per_row[idx], fill)


def from_padded(batch: SelectionBatch, per_token: torch.Tensor, fill) -> torch.Tensor:
    """Inverse of :func:`to_padded` for a ``[B, N]`` tensor: ``[rows]``, ``fill`` on rows
    that are no token (only packed input has such a difference to handle)."""
    if not batch.packed:
        return per_token.reshape(-1).contiguous()
    idx, valid = batch.padded_index(per_token.shape[1])
    out = torch.full((batch.features.shape[0],), fill, dtype=per_token.dtype, device=per_token.device)
    out[idx[valid]] = per_token[valid]
    return out


# ----------------------------------------------------------------------------- hybrid
def hybrid_pool_size(lengths: torch.Tensor, ks: torch.Tensor, lam: float) -> torch.Tensor:
    """``[B]`` int64 pool size ``c_b = N_b`` if lam = 0 else
    ``min(N_b, max(k_b, round_half_even(k_b / lam)))``.

    ``k_b / lam`` is clamped to ``N_b`` in float64 *before* the int64 conversion, so a tiny
    ``lam`` (``k / lam`` past 2**63, or inf) gives ``N_b`` instead of an overflowed integer."""
    if lam == 0.0:
        return lengths
    wanted = torch.round(ks.to(torch.float64) / lam)                          # half to even
    wanted = torch.minimum(wanted, lengths.to(torch.float64)).to(torch.int64)
    return torch.minimum(lengths, torch.maximum(ks, wanted))


def hybrid_pool_rows(batch: SelectionBatch) -> torch.Tensor:
    """``[rows]`` bool pool of the naive hybrid: the ``c_b`` (:func:`hybrid_pool_size`) most
    important tokens of each image, ties to the lowest index.  No host sync."""
    imp = batch.importance().reshape(-1)
    seg, _, valid = batch.row_layout()
    rows = imp.shape[0]
    key = torch.where(valid, imp, NEG_INF)
    by_imp = torch.sort(key, descending=True, stable=True).indices            # ties: lower row first
    order = by_imp[torch.sort(seg[by_imp], stable=True).indices]               # grouped by image
    rank = torch.empty(rows, dtype=torch.int64, device=imp.device)
    rank[order] = torch.arange(rows, device=imp.device) - batch.starts[seg[order]]
    size = hybrid_pool_size(batch.lengths, batch.ks, batch.lam)
    return valid & (rank < size[seg])


# ----------------------------------------------------------------------------- DivPrune's first step
def normalize_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x̂ = x / max(||x||, 1e-12)`` in ``dtype`` (float32 or float64): one new tensor the
    size of ``x`` in ``dtype`` (a converted copy is divided in place; ``x`` is never written)."""
    xd = x.to(dtype)
    norm = torch.linalg.vector_norm(xd, dim=-1, keepdim=True).clamp_min(NORM_EPS)
    return xd / norm if x.dtype == dtype else xd.div_(norm)   # x.to(its own dtype) is x itself


def divprune_first_score(xn: torch.Tensor, valid: torch.Tensor, gram: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, N]`` ``min_{j != i} d(i, j) = 1 - max_{j != i} sim(i, j)`` of normalised padded
    rows ``xn [B, N, D]``, streamed over row blocks of the Gram (+inf for a lone token).
    A caller that already has the Gram ``x̂ x̂ᵀ`` passes it (``xn`` may then be None) and it
    is marked in place, not copied: its diagonal and padding columns become ``-inf``, which
    a step loop that reads picked rows at unpicked, valid columns never sees."""
    like = xn if gram is None else gram
    bsz, n = like.shape[:2]
    best = torch.empty((bsz, n), dtype=like.dtype, device=like.device)
    rows_per_block = max(1, GRAM_CHUNK_BYTES // max(1, bsz * n * like.element_size()))
    padding = ~valid[:, None, :]
    for r0 in range(0, n, rows_per_block):
        r1 = min(n, r0 + rows_per_block)
        # [B, r, N]: a fresh product, or the caller's Gram marked in place
        g = torch.bmm(xn[:, r0:r1], xn.transpose(1, 2)) if gram is None else gram[:, r0:r1]
        g.diagonal(offset=r0, dim1=1, dim2=2).fill_(NEG_INF)              # j == i
        g.masked_fill_(padding, NEG_INF)
        best[:, r0:r1] = g.amax(dim=2)
    return 1.0 - best


def divprune_first_rows(batch: SelectionBatch, rows: torch.Tensor | None = None) -> torch.Tensor:
    """``[rows]`` fp32 DivPrune first score per row (+inf for a lone token and on rows that
    are no token), computed in fp32 over the padded layout (packed input: one host sync).
    ``rows``: the caller's ``batch.rows()``, so that non-contiguous features are not copied twice."""
    feats = to_padded(batch, batch.rows() if rows is None else rows, 0.0)
    _, valid = batch.padded_index(feats.shape[1])
    first = divprune_first_score(normalize_rows(feats, torch.float32), valid)
    return from_padded(batch, first, float("inf"))
