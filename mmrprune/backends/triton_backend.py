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
from ..prepare import hybrid_pool_rows, maxsim_plan
from . import TUNING, Backend

METHODS = ("mmr", "divprune", "topk", "fps", "hybrid", "dpp")
GRAM_SETTING = {"auto": -1, "rows": 0, "gram": 1}   # sim= as the kernels' use_gram argument
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


def select(batch: SelectionBatch, sim: str = "auto", max_round=None) -> tuple[torch.Tensor, dict]:
    """``[B, k_max]`` local indices in selection order, -1 past each image's budget, and
    ``{"rounds": [B]}`` sequential rounds per image (DPP: one per pick).  ``sim`` and
    ``max_round``: ``mmrprune.select``'s tuning keywords, already checked."""
    method = batch.method
    if method not in METHODS:
        raise RuntimeError(f"backend 'triton' does not implement method {method!r}")
    x = batch.rows()
    if x.dtype == torch.float64:
        # float64 input is accepted up to float64's norm limit, far past float32's range: scale
        # each row by a power of two first (exact, and cosine-neutral: the float32 rows and so
        # the picks are those of the unscaled input wherever it fits float32), then convert
        exponent = torch.frexp(x.abs().amax(dim=1, keepdim=True)).exponent.to(x.dtype)  # float: 2.0 ** -e
        x = torch.ldexp(x, -exponent).to(torch.float32)
    _, _, valid = batch.row_layout()
    n_pad = batch.max_length()                                             # packed input: one host sync
    inf = float("inf")
    use_gram = GRAM_SETTING[sim]
    max_round = _kernels.MAX_ROUND if max_round is None else max_round
    if method == "dpp":
        q = batch.dpp_quality().reshape(-1).to(torch.float32)
        # L_ii = q_i^2 exactly for a non-zero token, 0 for a zero vector (reference.select_dpp):
        # equal qualities then tie exactly and go to the lowest index
        nonzero = torch.linalg.vector_norm(x, dim=1, dtype=torch.float32) > 0
        state = torch.where(valid, q * q * nonzero, -inf)
        out, rounds = _kernels.triton_greedy(x, q, state, batch.starts, batch.lengths, batch.ks, batch.k_max,
                                             n_pad, 0.0, _kernels.MODE_DPP, use_gram)
        return out, {"rounds": rounds}
    plan = maxsim_plan(method, batch.lam)
    imp = batch.importance().reshape(-1).to(torch.float32)
    eligible = hybrid_pool_rows(batch) if plan.pooled else valid
    mode = _kernels.MODE_DIVPRUNE if plan.divprune else _kernels.MODE_MMR
    state = torch.where(eligible, -inf, inf).to(torch.float32)
    out, rounds = _kernels.triton_greedy(x, imp, state, batch.starts, batch.lengths, batch.ks, batch.k_max,
                                         n_pad, plan.lam, mode, use_gram, max_round)
    return out, {"rounds": rounds}


def workspace(batch: SelectionBatch, sim: str = "auto", max_round=None) -> int:
    """Per-row fp32 state, dpp's Cholesky rows, float64 input's scaled and converted copies
    (float64, then fp32), and the fp32 Gram when the kernels build one for ``sim``
    (``max_round`` changes nothing here)."""
    dim, k, method = batch.dim, int(batch.k_max), batch.method
    rows = batch.features.numel() // dim
    total = batch.rows_copy_bytes() + rows * 6 * 4
    if batch.features.dtype == torch.float64:
        total += rows * dim * (8 + 4)
    if method == "dpp":
        total += max(k - 1, 1) * rows * 4
    if method != "topk" and _kernels is not None:
        n = batch.max_length()
        if _kernels.uses_gram(batch.batch_size, n, GRAM_SETTING[sim]):
            total += batch.batch_size * n * n * 4
    return total


BACKEND = Backend(
    name="triton",
    methods=METHODS,
    device_types=("cuda", "cpu") if INTERPRET else ("cuda",),
    select=select,
    status=status,
    options=TUNING,
    workspace=workspace,
)
