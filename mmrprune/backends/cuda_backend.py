"""``backend="cuda"``: the fused CUDA kernel (``mmrprune._cuda``, csrc/cuda/).

The whole greedy selection of a batch runs in one launch: one thread block per
image loops over its K steps with no host sync between them (see
csrc/cuda/NOTES.md).  This module does the cheap per-image preparation with
torch ops, in the *segment form* the kernel reads (row ``starts[b] + i`` of
``batch.rows()`` is token ``i`` of image ``b``, padded and packed alike):

* ``mmr``/``fps``: ``Imp`` per row, ``lam`` (0 for ``fps``);
* ``hybrid``: the candidate pool as a per-row mask (sync-free segmented ranking),
  then FPS inside it (``lam = 0`` after the first pick, which maximises ``Imp``);
* ``divprune``: the first step's score ``1 - max_{j != i} sim(i, j)`` from torch's
  matmul (row blocks of the Gram, as the torch backend), then FPS;
* ``dpp``: the quality ``q`` per row.

``topk`` (a sort) and float64 input go to the torch backend (exact and already
sync-free); ``d2pruner`` is not implemented here, so ``backend="auto"`` uses
the Triton or torch backend for it.

The launch is registered as the custom op ``mmrprune::cuda_greedy`` with a fake
(meta) implementation, so ``torch.compile`` can trace through it.  With
``check_finite=False`` nothing here synchronises with the host (padded input;
packed ``divprune``/``hybrid`` gather a padded copy, one sync).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..batch import SelectionBatch
from . import Backend
from . import torch_backend as _tb

try:  # the extension is optional: built only with MMRPRUNE_CUDA=1 and nvcc
    from .. import _cuda as _ext
    _IMPORT_ERROR = ""
except ImportError as exc:  # pragma: no cover - depends on the build
    _ext = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

KERNEL_METHODS = ("mmr", "fps", "hybrid", "divprune", "dpp")
METHODS = KERNEL_METHODS + ("topk",)          # topk: torch sort (no kernel needed)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}   # csrc/cuda/greedy.h DType
WORKSPACE_LIMIT_BYTES = 2 << 30               # issue 4: workspace <= 2 GiB at N = 32,768
BUILD_HINT = ("rebuild with MMRPRUNE_CUDA=1 and nvcc on PATH: "
              "`MMRPRUNE_CUDA=1 python setup.py build_ext --inplace` (or `MMRPRUNE_CUDA=1 pip install -e .`)")


def status() -> tuple[bool, str]:
    if _ext is None:
        return False, f"extension mmrprune._cuda not built ({_IMPORT_ERROR}) — {BUILD_HINT}"
    if not torch.cuda.is_available():
        return False, (f"torch.cuda is not available (torch {torch.__version__}, "
                       f"built with CUDA {torch.version.cuda}); the extension is built but needs a CUDA GPU")
    return True, "fused CUDA kernel: one block per image, all greedy steps in one launch"


# ----------------------------------------------------------------------------- pure helpers
def dtype_code(dtype: torch.dtype) -> int:
    """Kernel dtype code of a feature dtype (float64 never reaches the kernel)."""
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"cuda kernel: features must be float16, bfloat16 or float32, got {dtype}") from None


def workspace_bytes(method: str, batch: int, rows: int, dim: int, k_max: int, n_max: int) -> int:
    """Device memory this backend allocates for one call, beyond the input (bytes).

    Per row: inv_norm (4), running state m or d^2 (4), taken flag (1), fp32 Imp/q (4);
    hybrid adds the pool mask and its ranking (1 + 3 * 8); divprune adds its first
    score (4) plus torch's fp32 normalised copy [B, n_max, D] and one Gram row block
    (torch_backend.GRAM_CHUNK_BYTES); dpp adds ||x̂||^2 (4) and the Cholesky rows
    c [rows, k_max] fp32.  The output is [B, k_max] int64.
    """
    per_row = 4 + 4 + 1 + 4
    extra = 0
    if method == "hybrid":
        per_row += 1 + 3 * 8
    elif method == "divprune":
        per_row += 4
        extra += batch * n_max * dim * 4 + min(_tb.GRAM_CHUNK_BYTES, batch * n_max * n_max * 4)
    elif method == "dpp":
        per_row += 4 + 4 * k_max
    return rows * per_row + extra + batch * k_max * 8


def _segment_ids(batch: SelectionBatch) -> torch.Tensor:
    """``[rows]`` image id of every row of ``batch.rows()``."""
    if batch.packed:
        return batch.segment_ids()
    n = batch.features.shape[1]
    return torch.arange(batch.batch_size * n, device=batch.device) // n


def _valid_rows(batch: SelectionBatch) -> torch.Tensor:
    """``[rows]`` bool: True on the rows that are tokens of an image (False on padding)."""
    if batch.packed:
        return torch.ones(batch.features.shape[0], dtype=torch.bool, device=batch.device)
    return batch.valid_mask().reshape(-1)


def hybrid_pool_rows(batch: SelectionBatch) -> torch.Tensor:
    """``[rows]`` bool pool of the naive hybrid: the ``c_b`` most important tokens of each
    image (ties to the lowest index), ``c_b = N_b`` if lam = 0 else
    ``min(N_b, max(k_b, round_half_even(k_b / lam)))``.  No host sync."""
    imp = batch.importance().reshape(-1)
    valid = _valid_rows(batch)
    seg = _segment_ids(batch)
    rows = imp.shape[0]
    key = torch.where(valid, imp, float("-inf"))
    by_imp = torch.sort(key, descending=True, stable=True).indices            # ties: lower row first
    order = by_imp[torch.sort(seg[by_imp], stable=True).indices]               # grouped by image
    rank = torch.empty(rows, dtype=torch.int64, device=imp.device)
    rank[order] = torch.arange(rows, device=imp.device) - batch.starts[seg[order]]
    lengths, ks = batch.lengths, batch.ks
    if batch.lam == 0.0:
        pool_size = lengths
    else:
        wanted = torch.round(ks.to(torch.float64) / batch.lam).to(torch.int64)   # half to even
        pool_size = torch.minimum(lengths, torch.maximum(ks, wanted))
    return valid & (rank < pool_size[seg])


def divprune_first_rows(batch: SelectionBatch) -> torch.Tensor:
    """``[rows]`` fp32: ``1 - max_{j != i} sim(i, j)`` per token (+inf for a lone token).
    Computed with torch's matmul in fp32 over row blocks (torch_backend)."""
    if not batch.packed:
        xn = _tb.normalize_rows(batch.features, torch.float32)
        first = _tb._divprune_first_score(xn, batch.valid_mask())
        return first.reshape(-1).contiguous()
    feats, _, _, valid = batch.padded()                                        # one host sync
    xn = _tb.normalize_rows(feats, torch.float32)
    first = _tb._divprune_first_score(xn, valid)
    pos = torch.arange(valid.shape[1], device=valid.device)
    rows_of = batch.starts[:, None] + pos[None, :]
    out = torch.full((batch.features.shape[0],), float("inf"), dtype=torch.float32, device=batch.device)
    out[rows_of[valid]] = first[valid]
    return out


def prepare(batch: SelectionBatch) -> dict:
    """Arguments of :func:`cuda_greedy` for a kernel method, in segment form (torch ops only)."""
    method = batch.method
    if method not in KERNEL_METHODS:
        raise ValueError(f"cuda kernel: method {method!r} has no kernel (kernel methods: {list(KERNEL_METHODS)})")
    dtype_code(batch.features.dtype)
    rows = batch.rows()
    first = eligible = None
    lam = 0.0
    if method == "dpp":
        score = batch.dpp_quality()
    elif method == "divprune":
        score = torch.zeros(rows.shape[0], dtype=torch.float32, device=rows.device)  # importance ignored
        first = divprune_first_rows(batch)
    else:
        score = batch.importance()
        if method == "mmr":
            lam = batch.lam
        elif method == "hybrid":
            eligible = hybrid_pool_rows(batch).to(torch.uint8).contiguous()
    return dict(rows=rows, score=score.reshape(-1).to(torch.float32).contiguous(), first_score=first,
                eligible=eligible, starts=batch.starts.contiguous(), lengths=batch.lengths.contiguous(),
                ks=batch.ks.contiguous(), k_max=int(batch.k_max), lam=float(lam), dpp=method == "dpp")


# ----------------------------------------------------------------------------- the launch
def _launch(rows: torch.Tensor, score: torch.Tensor, first_score: Optional[torch.Tensor],
            eligible: Optional[torch.Tensor], starts: torch.Tensor, lengths: torch.Tensor, ks: torch.Tensor,
            k_max: int, lam: float, dpp: bool) -> torch.Tensor:
    if _ext is None:
        raise RuntimeError(f"backend 'cuda' is not available: {status()[1]}")
    dev = rows.device
    if dev.type != "cuda":
        raise RuntimeError(f"cuda kernel: expected CUDA tensors, got {dev}")
    n_rows, dim = rows.shape
    bsz = starts.shape[0]
    code = dtype_code(rows.dtype)
    for name, t, dt in (("score", score, torch.float32), ("starts", starts, torch.int64),
                        ("lengths", lengths, torch.int64), ("ks", ks, torch.int64)):
        if t.dtype != dt or not t.is_contiguous() or t.device != dev:
            raise ValueError(f"cuda kernel: {name} must be a contiguous {dt} tensor on {dev}")
    if not rows.is_contiguous():
        raise ValueError("cuda kernel: rows must be contiguous")
    out = torch.empty((bsz, k_max), dtype=torch.int64, device=dev)
    if bsz == 0 or k_max == 0 or n_rows == 0:
        return out.fill_(-1)
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        inv = torch.empty(n_rows, dtype=torch.float32, device=dev)
        sqn = torch.empty(n_rows, dtype=torch.float32, device=dev) if dpp else None
        _ext.inv_norms(rows.data_ptr(), code, n_rows, dim, inv.data_ptr(),
                       sqn.data_ptr() if sqn is not None else 0, stream)
        state = torch.empty(n_rows, dtype=torch.float32, device=dev)
        taken = torch.empty(n_rows, dtype=torch.uint8, device=dev)
        if dpp:
            chol = torch.empty((n_rows, k_max), dtype=torch.float32, device=dev)
            _ext.greedy_dpp(rows.data_ptr(), code, n_rows, dim, inv.data_ptr(), sqn.data_ptr(), score.data_ptr(),
                            starts.data_ptr(), lengths.data_ptr(), ks.data_ptr(), bsz, k_max, state.data_ptr(),
                            taken.data_ptr(), chol.data_ptr(), out.data_ptr(), stream)
        else:
            _ext.greedy_maxsim(rows.data_ptr(), code, n_rows, dim, inv.data_ptr(), score.data_ptr(),
                               first_score.data_ptr() if first_score is not None else 0,
                               eligible.data_ptr() if eligible is not None else 0,
                               starts.data_ptr(), lengths.data_ptr(), ks.data_ptr(), bsz, k_max, float(lam),
                               state.data_ptr(), taken.data_ptr(), out.data_ptr(), stream)
    return out


def _fake(rows, score, first_score, eligible, starts, lengths, ks, k_max, lam, dpp):
    return rows.new_empty((starts.shape[0], k_max), dtype=torch.int64)


if hasattr(torch.library, "custom_op"):
    cuda_greedy = torch.library.custom_op("mmrprune::cuda_greedy", mutates_args=(), device_types="cuda")(_launch)
    cuda_greedy.register_fake(_fake)
else:  # pragma: no cover - torch < 2.4: plain call, not traceable
    cuda_greedy = _launch


def select(batch: SelectionBatch) -> torch.Tensor:
    """``[B, k_max]`` local indices in selection order, -1 past each image's budget."""
    if batch.method not in KERNEL_METHODS or batch.features.dtype not in DTYPE_CODES:
        return _tb.select(batch)   # topk (a sort), float64 input
    a = prepare(batch)
    return cuda_greedy(a["rows"], a["score"], a["first_score"], a["eligible"], a["starts"], a["lengths"],
                       a["ks"], a["k_max"], a["lam"], a["dpp"])


BACKEND = Backend(
    name="cuda",
    methods=METHODS,
    device_types=("cuda",),
    select=select,
    status=status,
)
