"""``backend="triton"``: the fused greedy loops of :mod:`mmrprune.triton_kernels.greedy`.

One launch per call runs every greedy step of every image (one program per
image); torch only prepares per-row inputs (``Imp``, the hybrid pool, the DPP
quality) in the segment form ``x [R, D]`` of :meth:`SelectionBatch.rows`.

Methods: mmr, fps, topk, hybrid, divprune, dpp (d2pruner: use ``torch``/``cuda``).
Devices: CUDA tensors; also CPU tensors when ``TRITON_INTERPRET=1`` was set before
Triton was imported (the interpreter, for tests on machines without a GPU).
Float64 input is computed in float32 like the half-precision inputs.
"""
from __future__ import annotations

import os

import torch

from ..batch import SelectionBatch
from . import Backend

METHODS = ("mmr", "divprune", "topk", "fps", "hybrid", "dpp")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

try:
    from mmrprune.triton_kernels import greedy as _kernels
    _IMPORT_ERROR = ""
except Exception as exc:  # no triton, or a triton too old for these kernels
    _kernels = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def status() -> tuple[bool, str]:
    if _kernels is None:
        return False, f"triton import failed ({_IMPORT_ERROR})"
    import triton
    if INTERPRET:
        return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1, CPU tensors)"
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
    return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"


def _row_layout(batch: SelectionBatch):
    """``(seg, valid)`` of every row of ``batch.rows()``: image id and whether the row is a token."""
    r = batch.features.numel() // batch.dim
    row = torch.arange(r, device=batch.device)
    seg = (torch.searchsorted(batch.starts, row, right=True) - 1).clamp_min(0)
    local = row - batch.starts[seg]
    valid = (local >= 0) & (local < batch.lengths[seg])
    return seg, local, valid


def _hybrid_pool(batch: SelectionBatch, imp: torch.Tensor, seg, local, valid) -> torch.Tensor:
    """Rows in their image's pool: the ``c_b`` most important tokens, ties to the lowest index."""
    lam, ks, n = batch.lam, batch.ks, batch.lengths
    if lam == 0.0:
        size = n
    else:
        size = torch.minimum(n, torch.maximum(ks, torch.round(ks.to(torch.float64) / lam).to(torch.int64)))
    key = torch.where(valid, imp, float("-inf"))
    by_imp = torch.sort(key, descending=True, stable=True).indices          # global importance order
    grouped = by_imp[torch.sort(seg[by_imp], stable=True).indices]          # per image, importance order kept
    rank = torch.empty_like(local)
    # position within the image's group = overall position - rows of earlier images
    first_of_image = torch.cumsum(torch.bincount(seg, minlength=batch.batch_size), 0) - torch.bincount(seg, minlength=batch.batch_size)
    rank[grouped] = torch.arange(grouped.shape[0], device=imp.device) - first_of_image[seg[grouped]]
    return valid & (rank < size[seg])


def select(batch: SelectionBatch) -> tuple[torch.Tensor, dict]:
    """``[B, k_max]`` local indices in selection order, -1 past each image's budget, and
    ``{"rounds": [B]}`` sequential rounds per image (DPP: one per pick)."""
    method = batch.method
    if method not in METHODS:
        raise RuntimeError(f"backend 'triton' does not implement method {method!r}")
    x = batch.rows()
    if x.dtype == torch.float64:
        x = x.to(torch.float32)
    seg, local, valid = _row_layout(batch)
    if batch.packed:
        n_pad = int(batch.lengths.max().item()) if batch.batch_size else 0   # one host sync
    else:
        n_pad = int(batch.features.shape[1])
    inf = float("inf")
    lam = batch.lam
    use_gram = int(os.environ.get("MMRPRUNE_TRITON_GRAM", "-1"))
    max_round = int(os.environ.get("MMRPRUNE_TRITON_ROUND", _kernels.MAX_ROUND))
    if method == "dpp":
        q = batch.dpp_quality().reshape(-1).to(torch.float32)
        # L_ii = q_i^2 exactly for a non-zero token, 0 for a zero vector (reference.select_dpp):
        # equal qualities then tie exactly and go to the lowest index
        nonzero = torch.linalg.vector_norm(x, dim=1, dtype=torch.float32) > 0
        state = torch.where(valid, q * q * nonzero, -inf)
        out, rounds = _kernels.triton_greedy(x, q, state, batch.starts, batch.lengths, batch.ks, batch.k_max,
                                             n_pad, 0.0, _kernels.MODE_DPP, use_gram)
        return out, {"rounds": rounds}
    imp = batch.importance().reshape(-1).to(torch.float32)
    if method == "hybrid":
        eligible = _hybrid_pool(batch, imp, seg, local, valid)
        lam = 0.0
    else:
        eligible = valid
    if method == "topk":
        lam = 1.0
    elif method == "fps":
        lam = 0.0
    mode = _kernels.MODE_DIVPRUNE if method == "divprune" else _kernels.MODE_MMR
    state = torch.where(eligible, -inf, inf).to(torch.float32)
    out, rounds = _kernels.triton_greedy(x, imp, state, batch.starts, batch.lengths, batch.ks, batch.k_max,
                                         n_pad, float(lam), mode, use_gram, max_round)
    return out, {"rounds": rounds}


BACKEND = Backend(
    name="triton",
    methods=METHODS,
    device_types=("cuda", "cpu") if INTERPRET else ("cuda",),
    select=select,
    status=status,
)
