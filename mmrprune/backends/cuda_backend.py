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

Two similarity sources (csrc/cuda/NOTES.md, "Gram mode"):

* *row mode*: each step recomputes ``sim(p, ·)`` from the features (``N·D`` reads
  per step), O(N) workspace — any N;
* *Gram mode*: torch computes the raw per-image Gram ``X Xᵀ`` once on tensor cores
  (fp16/bf16 operands, fp32 accumulation and output; fp32 input: full-fp32 matmul,
  only while TF32 is off) and each step reads one contiguous fp32 Gram row, scaled by
  ``inv_norm[p] · inv_norm[i]``.  :func:`use_gram` picks it when the whole call's
  workspace with the ``[B, Nmax, Nmax]`` Gram stays under ``GRAM_WORKSPACE_CAP_BYTES``;
  ``MMRPRUNE_CUDA_GRAM=0/1`` overrides.

``topk`` (a sort) and float64 input go to the torch backend (exact and already
sync-free); ``d2pruner`` is not implemented here, so ``backend="auto"`` uses
the Triton or torch backend for it.

The launch is registered as the custom op ``mmrprune::cuda_greedy`` with a fake
(meta) implementation, so ``torch.compile`` can trace through it.  With
``check_finite=False`` nothing here synchronises with the host (padded input;
packed ``divprune``/``hybrid`` gather a padded copy, one sync; packed input in Gram
mode, or with the Gram choice left to the heuristic, reads ``max(lengths)``: one sync —
``MMRPRUNE_CUDA_GRAM=0`` keeps packed mmr/fps/dpp sync-free).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..batch import SelectionBatch
from ..reference import NORM_EPS
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
GRAM_ENV = "MMRPRUNE_CUDA_GRAM"              # "0": row mode, "1": Gram mode, unset/"auto": use_gram()
# Gram mode when the call's whole workspace (Gram included) stays within the issue-4 bound:
# B=64, N=2691 (target c: 1.85 GB of Gram) and B=1, N=16384 (target d: 1 GiB) take Gram mode,
# B=1, N=32768 (4 GiB of Gram) stays in row mode with O(N) workspace.
GRAM_WORKSPACE_CAP_BYTES = WORKSPACE_LIMIT_BYTES
_GRAM_SMEM_STATE = -1                          # launcher's smem_state (-1 auto; tests set 0 to force global)
BUILD_HINT = ("rebuild with MMRPRUNE_CUDA=1 and nvcc on PATH: "
              "`MMRPRUNE_CUDA=1 python setup.py build_ext --inplace` (or `MMRPRUNE_CUDA=1 pip install -e .`)")


def status() -> tuple[bool, str]:
    if _ext is None:
        return False, f"extension mmrprune._cuda not built ({_IMPORT_ERROR}) — {BUILD_HINT}"
    if not torch.cuda.is_available():
        return False, (f"torch.cuda is not available (torch {torch.__version__}, "
                       f"built with CUDA {torch.version.cuda}); the extension is built: run on a machine with a CUDA GPU "
                       "and a CUDA build of torch")
    return True, ("fused CUDA kernel: one block per image, all greedy steps in one launch "
                  f"(similarity rows from a tensor-core Gram when it fits, {GRAM_ENV}=0/1 overrides)")


# ----------------------------------------------------------------------------- pure helpers
def dtype_code(dtype: torch.dtype) -> int:
    """Kernel dtype code of a feature dtype (float64 never reaches the kernel)."""
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"cuda kernel: features must be float16, bfloat16 or float32, got {dtype}") from None


def gram_bytes(batch: int, n_max: int) -> int:
    """Bytes of the fp32 Gram ``[B, n_max, n_max]`` of Gram mode."""
    return batch * n_max * n_max * 4


def workspace_bytes(method: str, batch: int, rows: int, dim: int, k_max: int, n_max: int,
                    gram: bool = False, packed_elem_bytes: int = 0) -> int:
    """Device memory this backend allocates for one call, beyond the input (bytes).

    Per row: inv_norm (4), running state m or d^2 (4), taken flag (1), fp32 Imp/q (4);
    hybrid adds the pool mask and its ranking (1 + 3 * 8); divprune adds its first
    score (4) plus, in row mode, torch's fp32 normalised copy [B, n_max, D] and one Gram
    row block (torch_backend.GRAM_CHUNK_BYTES), in Gram mode one scaled row block of the
    Gram; dpp adds ||x̂||^2 (4) and the Cholesky rows c [rows, k_max] fp32.  Gram mode
    adds the Gram [B, n_max, n_max] fp32 and the row norms (4 per row), and for packed
    input (``packed_elem_bytes`` = the feature element size) the padded copy
    [B, n_max, D].  The output is [B, k_max] int64.
    """
    per_row = 4 + 4 + 1 + 4
    extra = 0
    full_gram = gram_bytes(batch, n_max)
    if method == "hybrid":
        per_row += 1 + 3 * 8
    elif method == "divprune":
        per_row += 4
        if not gram:
            extra += batch * n_max * dim * 4
        extra += min(_tb.GRAM_CHUNK_BYTES, full_gram)
    elif method == "dpp":
        per_row += 4 + 4 * k_max
    if gram:
        per_row += 4
        extra += full_gram + batch * n_max * dim * packed_elem_bytes
    return rows * per_row + extra + batch * k_max * 8


def tf32_matmul_enabled() -> bool:
    """True when torch may run an fp32 CUDA matmul in TF32 (10-bit mantissa: too coarse for
    the fp32 certificate, so fp32 input then stays in row mode)."""
    return bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"


def gram_setting(env: Optional[str] = None) -> str:
    """``MMRPRUNE_CUDA_GRAM`` as ``"0"``, ``"1"`` or ``"auto"`` (unset/empty)."""
    v = (os.environ.get(GRAM_ENV, "") if env is None else env).strip().lower()
    if v in ("", "auto"):
        return "auto"
    if v in ("0", "1"):
        return v
    raise ValueError(f"{GRAM_ENV} must be 0, 1 or auto, got {v!r}")


def use_gram(method: str, batch: int, rows: int, dim: int, k_max: int, n_max: int, dtype: torch.dtype,
             packed: bool = False, setting: Optional[str] = None,
             cap: int = GRAM_WORKSPACE_CAP_BYTES) -> bool:
    """The similarity source of a kernel call: True = Gram mode, False = row mode.

    Heuristic (documented in csrc/cuda/NOTES.md): Gram mode whenever the call's whole
    workspace *with* the Gram (``workspace_bytes(..., gram=True)``) is at most ``cap``
    (2 GiB, the issue-4 bound).  Gram mode replaces ``k·N·D`` feature reads per image by
    ``N²·D`` tensor-core flops plus ``k`` contiguous rows of N fp32, which wins for every
    k > ~N/200 on an H100 (estimate) and for every k at B = 1, where row mode runs on one SM.
    ``MMRPRUNE_CUDA_GRAM=1`` forces Gram mode regardless of the cap (it may then need more
    memory), ``=0`` forces row mode.  Precision is not a heuristic: fp32 input uses Gram
    mode only while TF32 matmuls are off (torch's default), even when forced.
    """
    if method not in KERNEL_METHODS:
        return False
    if dtype == torch.float32 and tf32_matmul_enabled():
        return False
    mode = gram_setting(setting)
    if mode != "auto":
        return mode == "1"
    elem = torch.finfo(dtype).bits // 8 if packed else 0
    return workspace_bytes(method, batch, rows, dim, k_max, n_max, gram=True, packed_elem_bytes=elem) <= cap


def gram_matrix(x: torch.Tensor) -> torch.Tensor:
    """Raw (unnormalised) Gram ``x xᵀ`` of ``[B, n, D]`` as ``[B, n, n]`` fp32.

    fp16/bf16 on CUDA: one batched tensor-core matmul with fp32 accumulation and fp32 output
    (``torch.bmm(..., out_dtype=torch.float32)``); the products of two 16-bit numbers are exact
    in fp32, so nothing is rounded to 16 bits.  fp32: plain fp32 matmul (callers check TF32 is
    off).  CPU (tests only) or a torch without ``out_dtype``: the same product upcast to fp32."""
    xt = x.transpose(1, 2)
    if x.dtype == torch.float32:
        return torch.bmm(x, xt)
    if x.device.type in ("cuda", "meta") and _HAS_BMM_OUT_DTYPE:
        return torch.bmm(x, xt, out_dtype=torch.float32)
    return torch.bmm(x.to(torch.float32), xt.to(torch.float32))


def _probe_bmm_out_dtype() -> bool:
    try:
        a = torch.empty((1, 2, 2), dtype=torch.bfloat16, device="meta")
        return torch.bmm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except Exception:  # pragma: no cover - older torch
        return False


_HAS_BMM_OUT_DTYPE = _probe_bmm_out_dtype()


def row_inv_norms(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inv_norm, sqn)`` per row in fp32: ``1/max(||x||, 1e-12)`` and ``||x̂||²`` (as the
    extension's inv_norm kernel)."""
    nrm = torch.linalg.vector_norm(rows, dim=-1, dtype=torch.float32)
    inv = 1.0 / nrm.clamp_min(NORM_EPS)
    return inv, (nrm * inv) ** 2


def divprune_first_from_gram(gram: torch.Tensor, inv: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, n]`` ``1 - max_{j != i} sim(i, j)`` from the raw Gram ``[B, n, n]`` and the padded
    inverse norms ``[B, n]`` (+inf for a lone token), over row blocks of at most
    ``torch_backend.GRAM_CHUNK_BYTES`` (the Gram itself is not modified)."""
    bsz, n, _ = gram.shape
    best = torch.empty((bsz, n), dtype=torch.float32, device=gram.device)
    rows_per_block = max(1, _tb.GRAM_CHUNK_BYTES // max(1, bsz * n * 4))
    padding = ~valid[:, None, :]
    for r0 in range(0, n, rows_per_block):
        r1 = min(n, r0 + rows_per_block)
        g = gram[:, r0:r1] * inv[:, None, :]                                # G_ij / ||x_j||, own buffer
        g.diagonal(offset=r0, dim1=1, dim2=2).fill_(float("-inf"))
        g.masked_fill_(padding, float("-inf"))
        best[:, r0:r1] = g.amax(dim=2) * inv[:, r0:r1]
    return 1.0 - best


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


def _packed_gather_index(batch: SelectionBatch, n_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed input: ``(row index [B, n_max], valid [B, n_max])`` of the padded layout
    (padding points at row 0, so the gathered copy stays finite)."""
    pos = torch.arange(n_max, device=batch.device)
    valid = pos[None, :] < batch.lengths[:, None]
    return torch.where(valid, batch.starts[:, None] + pos[None, :], 0), valid


def gram_n_max(batch: SelectionBatch, setting: Optional[str] = None) -> Optional[int]:
    """The Gram's padded length for this batch, or None when Gram mode is off by setting.
    Padded input: ``features.shape[1]`` (no sync); packed: ``max(lengths)`` (one host sync)."""
    if gram_setting(setting) == "0":
        return None
    if not batch.packed:
        return int(batch.features.shape[1])
    return max(1, int(batch.lengths.max().item())) if batch.batch_size else 1


def prepare(batch: SelectionBatch, setting: Optional[str] = None) -> dict:
    """Arguments of :func:`cuda_greedy` for a kernel method, in segment form (torch ops only).

    Gram mode (``use_gram``) adds ``gram`` ``[B, n_max, n_max]`` fp32 (raw, unnormalised),
    ``inv_norm`` ``[rows]`` and, for dpp, ``sqn`` ``[rows]``; row mode leaves them None."""
    method = batch.method
    if method not in KERNEL_METHODS:
        raise ValueError(f"cuda kernel: method {method!r} has no kernel (kernel methods: {list(KERNEL_METHODS)})")
    dtype_code(batch.features.dtype)
    rows = batch.rows()
    gram = inv = sqn = None
    n_max = gram_n_max(batch, setting)
    if n_max is not None and use_gram(method, batch.batch_size, rows.shape[0], batch.dim, int(batch.k_max), n_max,
                                      batch.features.dtype, packed=batch.packed, setting=setting):
        if batch.packed:
            idx, valid = _packed_gather_index(batch, n_max)
            feats = rows[idx]                                                  # [B, n_max, D] copy
        else:
            feats, valid = rows.view(batch.batch_size, n_max, batch.dim), batch.valid_mask()
        gram = gram_matrix(feats)
        inv, sqn = row_inv_norms(rows)
        if method != "dpp":
            sqn = None
    first = eligible = None
    lam = 0.0
    if method == "dpp":
        score = batch.dpp_quality()
    elif method == "divprune":
        score = torch.zeros(rows.shape[0], dtype=torch.float32, device=rows.device)  # importance ignored
        if gram is None:
            first = divprune_first_rows(batch)
        else:
            inv_p = inv[idx] if batch.packed else inv.view(batch.batch_size, n_max)
            first_p = divprune_first_from_gram(gram, inv_p, valid)
            if batch.packed:
                first = torch.full((rows.shape[0],), float("inf"), dtype=torch.float32, device=rows.device)
                first[idx[valid]] = first_p[valid]
            else:
                first = first_p.reshape(-1).contiguous()
    else:
        score = batch.importance()
        if method == "mmr":
            lam = batch.lam
        elif method == "hybrid":
            eligible = hybrid_pool_rows(batch).to(torch.uint8).contiguous()
    return dict(rows=rows, score=score.reshape(-1).to(torch.float32).contiguous(), first_score=first,
                eligible=eligible, starts=batch.starts.contiguous(), lengths=batch.lengths.contiguous(),
                ks=batch.ks.contiguous(), k_max=int(batch.k_max), lam=float(lam), dpp=method == "dpp",
                gram=gram, inv_norm=inv, sqn=sqn)


# ----------------------------------------------------------------------------- the launch
def _launch(rows: torch.Tensor, score: torch.Tensor, first_score: Optional[torch.Tensor],
            eligible: Optional[torch.Tensor], starts: torch.Tensor, lengths: torch.Tensor, ks: torch.Tensor,
            k_max: int, lam: float, dpp: bool, gram: Optional[torch.Tensor] = None,
            inv_norm: Optional[torch.Tensor] = None, sqn: Optional[torch.Tensor] = None) -> torch.Tensor:
    if _ext is None:
        raise RuntimeError(f"backend 'cuda' is not available: {status()[1]}")
    dev = rows.device
    if dev.type != "cuda":
        raise RuntimeError(f"cuda kernel: expected CUDA tensors, got {dev}")
    n_rows, dim = rows.shape
    bsz = starts.shape[0]
    code = dtype_code(rows.dtype)
    checks = [("score", score, torch.float32), ("starts", starts, torch.int64),
              ("lengths", lengths, torch.int64), ("ks", ks, torch.int64)]
    if gram is not None:
        if gram.dim() != 3 or gram.shape[0] != bsz or gram.shape[1] != gram.shape[2]:
            raise ValueError(f"cuda kernel: gram must be [B={bsz}, n_max, n_max], got {tuple(gram.shape)}")
        if inv_norm is None or inv_norm.shape != (n_rows,):
            raise ValueError(f"cuda kernel: Gram mode needs inv_norm of shape [{n_rows}]")
        if dpp and (sqn is None or sqn.shape != (n_rows,)):
            raise ValueError(f"cuda kernel: Gram-mode dpp needs sqn of shape [{n_rows}]")
        checks += [("gram", gram, torch.float32), ("inv_norm", inv_norm, torch.float32)]
        if dpp:
            checks.append(("sqn", sqn, torch.float32))
    for name, t, dt in checks:
        if t.dtype != dt or not t.is_contiguous() or t.device != dev:
            raise ValueError(f"cuda kernel: {name} must be a contiguous {dt} tensor on {dev}")
    if not rows.is_contiguous():
        raise ValueError("cuda kernel: rows must be contiguous")
    out = torch.empty((bsz, k_max), dtype=torch.int64, device=dev)
    if bsz == 0 or k_max == 0 or n_rows == 0:
        return out.fill_(-1)
    fs = first_score.data_ptr() if first_score is not None else 0
    el = eligible.data_ptr() if eligible is not None else 0
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        state = torch.empty(n_rows, dtype=torch.float32, device=dev)
        taken = torch.empty(n_rows, dtype=torch.uint8, device=dev)
        chol = torch.empty((n_rows, k_max), dtype=torch.float32, device=dev) if dpp else None
        if gram is not None:                     # Gram mode: no feature reads in the greedy loop
            ld = gram.shape[1]
            if dpp:
                _ext.greedy_dpp_gram(gram.data_ptr(), ld, inv_norm.data_ptr(), sqn.data_ptr(), score.data_ptr(),
                                     starts.data_ptr(), lengths.data_ptr(), ks.data_ptr(), bsz, k_max,
                                     state.data_ptr(), taken.data_ptr(), chol.data_ptr(), out.data_ptr(), stream)
            else:
                _ext.greedy_maxsim_gram(gram.data_ptr(), ld, inv_norm.data_ptr(), score.data_ptr(), fs, el,
                                        starts.data_ptr(), lengths.data_ptr(), ks.data_ptr(), bsz, k_max,
                                        float(lam), state.data_ptr(), taken.data_ptr(), out.data_ptr(),
                                        int(_GRAM_SMEM_STATE), stream)
            return out
        inv = torch.empty(n_rows, dtype=torch.float32, device=dev)
        sq = torch.empty(n_rows, dtype=torch.float32, device=dev) if dpp else None
        _ext.inv_norms(rows.data_ptr(), code, n_rows, dim, inv.data_ptr(),
                       sq.data_ptr() if sq is not None else 0, stream)
        if dpp:
            _ext.greedy_dpp(rows.data_ptr(), code, n_rows, dim, inv.data_ptr(), sq.data_ptr(), score.data_ptr(),
                            starts.data_ptr(), lengths.data_ptr(), ks.data_ptr(), bsz, k_max, state.data_ptr(),
                            taken.data_ptr(), chol.data_ptr(), out.data_ptr(), stream)
        else:
            _ext.greedy_maxsim(rows.data_ptr(), code, n_rows, dim, inv.data_ptr(), score.data_ptr(), fs, el,
                               starts.data_ptr(), lengths.data_ptr(), ks.data_ptr(), bsz, k_max, float(lam),
                               state.data_ptr(), taken.data_ptr(), out.data_ptr(), stream)
    return out


def _fake(rows, score, first_score, eligible, starts, lengths, ks, k_max, lam, dpp, gram=None, inv_norm=None,
          sqn=None):
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
                       a["ks"], a["k_max"], a["lam"], a["dpp"], a["gram"], a["inv_norm"], a["sqn"])


BACKEND = Backend(
    name="cuda",
    methods=METHODS,
    device_types=("cuda",),
    select=select,
    status=status,
)
