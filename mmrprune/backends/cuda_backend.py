"""``backend="cuda"``: the fused CUDA kernel (``mmrprune._cuda``, csrc/cuda/).

The whole greedy selection of a batch runs in one launch: one thread block per
image loops over its K steps with no host sync between them (see
csrc/cuda/NOTES.md).  :func:`prepare` turns a batch into a :class:`KernelCall` (the Gram
product; scores, norms, the hybrid pool and Gram-mode DivPrune's first score come from one
prepare kernel at launch; row-mode DivPrune's first score from torch ops in
:mod:`mmrprune.prepare`), in the *segment form*
the kernel reads (row ``starts[b] + i`` of ``batch.rows()`` is token ``i`` of image
``b``, padded and packed alike); :class:`FusedGreedy` passes it to the op
``mmrprune::fused_greedy``, which checks it, runs the prepare and greedy kernels and is
implemented for CUDA tensors by ``mmrprune._cuda`` (for CPU tensors by its emulated build):

* ``mmr``/``fps``: ``Imp`` per row, ``lam`` (0 for ``fps``);
* ``hybrid``: the candidate pool as a per-row mask, ranked per image by the prepare kernel,
  then FPS inside it (``lam = 0`` after the first pick, which maximises ``Imp``);
* ``divprune``: the first step's score ``1 - max_{j != i} sim(i, j)``, in Gram mode from the
  Gram by the prepare kernel, in row mode from torch's matmul (row blocks of the Gram, as the
  torch backend), then FPS;
* ``dpp``: the quality ``q`` per row;
* ``topk``: no greedy kernel and no Gram: the prepare kernel ranks ``Imp`` per image (the
  torch backend's descending stable sort) and writes the picks itself.

Two similarity sources (csrc/cuda/NOTES.md, "Gram mode"):

* *row mode*: each step recomputes ``sim(p, ·)`` from the features (``N·D`` reads
  per step), O(N) workspace — any N;
* *Gram mode*: torch computes the raw per-image Gram ``X Xᵀ`` once on tensor cores
  (fp16/bf16 operands, fp32 accumulation and output; fp32 input: full-fp32 matmul,
  only while TF32 is off) and each step reads one contiguous fp32 Gram row, scaled by
  ``inv_norm[p] · inv_norm[i]``.  :func:`use_gram` picks it when the whole call's
  workspace with the ``[B, Nmax, Nmax]`` Gram stays under ``WORKSPACE_LIMIT_BYTES``;
  ``sim="rows"``/``"gram"`` (``mmrprune.select``'s argument) overrides.

float64 input goes to the torch backend (exact and already sync-free); ``d2pruner`` is not
implemented here, so ``backend="auto"`` uses the Triton or torch backend for it.

The op has a fake (meta) implementation (:mod:`mmrprune.ops`), so ``torch.compile`` can trace
through it.  With
``check_finite=False`` nothing here synchronises with the host (padded input;
packed row-mode ``divprune`` gathers a padded copy, one sync; packed input in Gram
mode, or with the Gram choice left to the heuristic, reads ``max(lengths)``: one sync —
``sim="rows"`` keeps packed mmr/fps/dpp sync-free).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import ops  # noqa: F401  defines mmrprune::fused_greedy, which the module below implements
from ..batch import SelectionBatch
from ..prepare import GRAM_CHUNK_BYTES, divprune_first_rows, maxsim_plan
from . import BUILD_HINTS, SIMS, TUNING, Backend
from . import torch_backend as _tb

try:  # the extension is optional: built only with MMRPRUNE_CUDA=1 and nvcc
    from .. import _cuda as _ext
    _IMPORT_ERROR = ""
except ImportError as exc:  # pragma: no cover - depends on the build
    _ext = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

GREEDY_METHODS = ("mmr", "fps", "hybrid", "divprune", "dpp")   # the greedy kernels (they count rounds)
KERNEL_METHODS = GREEDY_METHODS + ("topk",)   # topk: the prepare kernel's ranking alone
METHODS = KERNEL_METHODS
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)   # float64 goes to the torch backend
# Gram mode is used while the call's whole workspace (Gram included) stays within this bound,
# so that the Gram never decides whether a call fits in memory: long images (N = 32,768: a
# 4 GiB Gram) fall back to row mode, whose workspace is O(N).
WORKSPACE_LIMIT_BYTES = 2 << 30
_GRAM_SMEM_STATE = -1                          # the op's smem_state (-1 auto; tests set 0 to force global)
# The op's cluster: CTAs per image of the Gram-mode kernels (0: the launcher's choice; 1: one block;
# n: n CTAs where the device has clusters).  Tests and the GPU session's one-block A/B set it.
_CLUSTER = 0


# ----------------------------------------------------------------------------- pure helpers
def gram_bytes(batch: int, n_max: int) -> int:
    """Bytes of the fp32 Gram ``[B, n_max, n_max]`` of Gram mode."""
    return batch * n_max * n_max * 4


def workspace_bytes(method: str, batch: int, rows: int, dim: int, k_max: int, n_max: int,
                    gram: bool = False, packed_elem_bytes: int = 0) -> int:
    """Device memory this backend allocates for one call, beyond the input (bytes).

    topk: its fp32 Imp per row (4) and the output, nothing else.
    Per row: inv_norm (4), running state m or d^2 (4), taken flag (1), fp32 Imp/q (4);
    hybrid adds the pool mask (1); divprune adds its first score (4) plus, in row mode,
    torch's fp32 normalised copy [B, n_max, D] and one Gram row block
    (prepare.GRAM_CHUNK_BYTES) (in Gram mode the prepare kernel reads the Gram itself);
    dpp adds ||x̂||^2 (4) and the Cholesky rows c [rows, k_max] fp32.  Gram mode
    adds the Gram [B, n_max, n_max] fp32 and the row norms (4 per row).  Packed input
    (``packed_elem_bytes`` = the feature element size) is gathered into a padded copy
    [B, n_max, D] wherever the padded layout is read: Gram mode, and row-mode divprune.
    The output is [B, k_max] int64.  :func:`call_workspace_bytes` adds the copies that
    depend on the input's layout and device.
    """
    if method == "topk":
        return rows * 4 + batch * k_max * 8
    per_row = 4 + 4 + 1 + 4
    extra = 0
    full_gram = gram_bytes(batch, n_max)
    padded_copy = batch * n_max * dim * packed_elem_bytes
    if method == "hybrid":
        per_row += 1
    elif method == "divprune":
        per_row += 4
        if not gram:
            extra += batch * n_max * dim * 4 + padded_copy + min(GRAM_CHUNK_BYTES, full_gram)
    elif method == "dpp":
        per_row += 4 + 4 * k_max
    if gram:
        per_row += 4
        extra += full_gram + padded_copy
    return rows * per_row + extra + batch * k_max * 8


def runs_kernel(batch: SelectionBatch) -> bool:
    """True when the fused kernels run ``batch``; float64 input goes to the torch backend."""
    return batch.method in KERNEL_METHODS and batch.features.dtype in KERNEL_DTYPES


def call_workspace_bytes(batch: SelectionBatch, sim: str = "auto", max_round: Optional[int] = None) -> int:
    """Memory a call allocates for ``batch`` beyond its input and output (the backend's
    ``workspace``): the torch backend's figure for what goes there (:func:`runs_kernel`), else
    :func:`workspace_bytes` in the similarity mode :func:`prepare` picks, plus the copies made
    on the way there: the contiguous rows of non-contiguous features
    (``batch.rows_copy_bytes()``) and, in Gram mode for 16-bit input where torch has no
    fp32-output bmm (CPU: the emulator), the fp32 operand of the Gram product.  ``max_round``
    changes nothing here."""
    if not runs_kernel(batch):
        return _tb.workspace(batch)
    dtype, bsz, dim, k_max = batch.features.dtype, batch.batch_size, batch.dim, int(batch.k_max)
    rows = batch.features.numel() // dim
    n_max = batch.max_length()
    packed_elem = batch.features.element_size() if batch.packed else 0
    gram = use_gram(batch.method, bsz, rows, dim, k_max, n_max, dtype, packed=batch.packed, sim=sim)
    total = workspace_bytes(batch.method, bsz, rows, dim, k_max, n_max, gram=gram, packed_elem_bytes=packed_elem)
    total += batch.rows_copy_bytes()
    if gram and dtype != torch.float32 and not _fp32_output_bmm(batch.device):
        total += bsz * n_max * dim * 4
    return total


def tf32_matmul_enabled() -> bool:
    """True when torch may run an fp32 CUDA matmul in TF32 (10-bit mantissa: too coarse for
    the fp32 certificate, so fp32 input then stays in row mode)."""
    return bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"


def _sim(sim: str) -> str:
    """``sim`` itself once it is one of :data:`SIMS` (the public entry points checked it already;
    this guards direct callers of :func:`prepare` and :func:`use_gram`)."""
    if sim not in SIMS:
        raise ValueError(f"sim: expected one of {list(SIMS)}, got {sim!r}")
    return sim


def use_gram(method: str, batch: int, rows: int, dim: int, k_max: int, n_max: int, dtype: torch.dtype,
             packed: bool = False, sim: str = "auto",
             cap: int = WORKSPACE_LIMIT_BYTES) -> bool:
    """The similarity source of a kernel call: True = Gram mode, False = row mode.

    Heuristic (documented in csrc/cuda/NOTES.md): Gram mode whenever the call's whole
    workspace *with* the Gram (``workspace_bytes(..., gram=True)``) is at most ``cap``
    (2 GiB, the issue-4 bound).  Gram mode replaces ``k·N·D`` feature reads per image by
    ``N²·D`` tensor-core flops plus ``k`` contiguous rows of N fp32, which wins for every
    k > ~N/200 on an H100 (estimate) and for every k at B = 1, where row mode runs on one SM.
    ``sim="gram"`` forces Gram mode regardless of the cap (it may then need more
    memory), ``sim="rows"`` forces row mode.  Precision is not a heuristic: fp32 input uses Gram
    mode only while TF32 matmuls are off (torch's default), even when forced.
    """
    if method not in GREEDY_METHODS:   # topk reads no similarity
        return False
    if dtype == torch.float32 and tf32_matmul_enabled():
        return False
    mode = _sim(sim)
    if mode != "auto":
        return mode == "gram"
    elem = torch.finfo(dtype).bits // 8 if packed else 0
    return workspace_bytes(method, batch, rows, dim, k_max, n_max, gram=True, packed_elem_bytes=elem) <= cap


def gram_matrix(x: torch.Tensor) -> torch.Tensor:
    """Raw (unnormalised) Gram ``x xᵀ`` of ``[B, n, D]`` as ``[B, n, n]`` fp32.

    fp16/bf16 on CUDA: one batched tensor-core matmul with fp32 accumulation and fp32 output
    (``torch.bmm(..., out_dtype=torch.float32)``); the products of two 16-bit numbers are exact
    in fp32, so nothing is rounded to 16 bits.  fp32: plain fp32 matmul (callers check TF32 is
    off).  CPU (tests only) or a torch without ``out_dtype``: the same product upcast to fp32."""
    if x.dtype == torch.float32:
        return torch.bmm(x, x.transpose(1, 2))
    if _fp32_output_bmm(x.device):
        return torch.bmm(x, x.transpose(1, 2), out_dtype=torch.float32)
    x = x.to(torch.float32)   # one fp32 copy serves as both operands
    return torch.bmm(x, x.transpose(1, 2))


def _fp32_output_bmm(device: torch.device) -> bool:
    """True where a 16-bit bmm can write fp32 directly (CUDA, with torch's ``out_dtype``)."""
    return device.type in ("cuda", "meta") and _HAS_BMM_OUT_DTYPE


def _probe_bmm_out_dtype() -> bool:
    try:
        a = torch.empty((1, 2, 2), dtype=torch.bfloat16, device="meta")
        return torch.bmm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except Exception:  # pragma: no cover - older torch
        return False


_HAS_BMM_OUT_DTYPE = _probe_bmm_out_dtype()


def gram_n_max(batch: SelectionBatch, sim: str = "auto") -> Optional[int]:
    """The Gram's padded length for this batch, or None when ``sim="rows"`` turns Gram mode off.
    Padded input: ``features.shape[1]`` (no sync); packed: ``max(lengths)`` (one host sync)."""
    if _sim(sim) == "rows":
        return None
    return batch.max_length()


# ----------------------------------------------------------------------------- preparation
@dataclass
class KernelCall:
    """The arguments of one ``mmrprune::fused_greedy`` call, in segment form (see :func:`prepare`).

    The per-row scores and, in Gram mode, the inverse norms are left to the op's prepare
    kernel (csrc/cuda/prepare.cu) wherever it can compute them: ``score`` is None unless
    ``score_kind`` is ``"keep"``, and ``inv_norm`` None in Gram mode means "from the Gram's
    diagonal".  :meth:`FusedGreedy.complete` runs that kernel alone and fills them in (tests)."""
    rows: torch.Tensor                    # [R, D] features, contiguous, a kernel dtype
    score: Optional[torch.Tensor]         # [R] fp32 Imp / DPP q when score_kind == "keep", else None
    first_score: Optional[torch.Tensor]   # [R] fp32 DivPrune first-step score, else None
    eligible: Optional[torch.Tensor]      # [R] uint8 hybrid pool, else None (every valid token)
    starts: torch.Tensor                  # [B] int64
    lengths: torch.Tensor                 # [B] int64
    ks: torch.Tensor                      # [B] int64
    k_max: int
    lam: float                            # trade-off of steps 2..k (0 except for mmr)
    dpp: bool
    gram: Optional[torch.Tensor] = None   # Gram mode: [B, n_max, n_max] fp32 raw Gram
    inv_norm: Optional[torch.Tensor] = None   # Gram mode: [R] fp32, or None (from the Gram's diagonal)
    sqn: Optional[torch.Tensor] = None        # Gram-mode dpp: [R] fp32 ||x̂||^2 (with inv_norm)
    weights: Optional[torch.Tensor] = None    # [R] fp32 raw importance the prepare kernel normalises
    score_kind: str = "keep"                  # one of SCORE_KINDS
    width: int = 0                            # padded rows: [B, width], prepared whole; 0: packed
    max_round: int = 0                        # picks per round of the maxsim kernels; 0: the kernels' own
    pool_lam: float = 0.0                     # score_kind "pool": the hybrid's lam, which sizes its pool

    def args(self) -> tuple:
        """Positional arguments of ``mmrprune::fused_greedy``: the fields, declared in the order of
        its schema (mmrprune/ops.py; tests/test_cuda_backend.py compares the two)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


# What the prepare kernel writes (csrc/cuda/prepare.h, ScoreKind): "pool" is Imp plus the
# hybrid's pool (eligible), "divprune" is a zero score plus DivPrune's first score from the Gram,
# "topk" is Imp ranked into the picks themselves (the op then runs no greedy kernel).
SCORE_KINDS = ("keep", "imp", "quality", "zero", "pool", "divprune", "topk")


def _weights_rows(batch: SelectionBatch) -> Optional[torch.Tensor]:
    """The raw importance in segment form, fp32 (a view when it already is)."""
    if batch.weights is None:
        return None
    return batch.weights.reshape(-1).to(torch.float32).contiguous()


def prepare(batch: SelectionBatch, sim: str = "auto", max_round: Optional[int] = None) -> KernelCall:
    """The :class:`KernelCall` of a kernel method, with ``mmrprune.select``'s tuning ``sim`` and
    ``max_round`` (None: the kernels' own).

    No torch op beyond the Gram product (Gram mode): scores, norms, hybrid's pool and DivPrune's
    first score come from the launch's prepare kernel, except row-mode DivPrune's first score
    (torch ops over row blocks, :func:`mmrprune.prepare.divprune_first_rows`).  topk: no Gram;
    the prepare kernel's ranking is the selection."""
    method = batch.method
    if method not in KERNEL_METHODS:
        raise ValueError(f"cuda kernel: method {method!r} has no kernel (kernel methods: {list(KERNEL_METHODS)})")
    if batch.features.dtype not in KERNEL_DTYPES:
        raise TypeError(f"cuda kernel: features must be float16, bfloat16 or float32, got {batch.features.dtype}")
    rows = batch.rows()
    call = KernelCall(rows=rows, score=None, first_score=None, eligible=None, starts=batch.starts.contiguous(),
                      lengths=batch.lengths.contiguous(), ks=batch.ks.contiguous(), k_max=int(batch.k_max),
                      lam=0.0, dpp=method == "dpp",
                      width=0 if batch.packed else int(batch.features.shape[1]),
                      max_round=0 if max_round is None else int(max_round))
    if method == "topk":
        call.score_kind, call.weights = "topk", _weights_rows(batch)
        return call
    n_max = gram_n_max(batch, sim)
    if n_max is not None and use_gram(method, batch.batch_size, rows.shape[0], batch.dim, call.k_max, n_max,
                                      batch.features.dtype, packed=batch.packed, sim=sim):
        if batch.packed:
            feats = rows[batch.padded_index(n_max)[0]]                        # [B, n_max, D] copy
        else:
            feats = rows.view(batch.batch_size, n_max, batch.dim)
        call.gram = gram_matrix(feats)
    if call.dpp:
        call.score_kind, call.weights = "quality", _weights_rows(batch)
        return call
    plan = maxsim_plan(method, batch.lam)
    call.lam = plan.lam
    if plan.divprune:   # importance ignored
        if call.gram is None:
            call.score_kind, call.first_score = "zero", divprune_first_rows(batch, rows)
        else:               # norms and the first score from the Gram, in the prepare kernel
            call.score_kind = "divprune"
    elif plan.pooled:       # Imp and the pool, in the prepare kernel
        call.score_kind, call.weights, call.pool_lam = "pool", _weights_rows(batch), float(batch.lam)
    else:
        call.score_kind, call.weights = "imp", _weights_rows(batch)
    return call


# ----------------------------------------------------------------------------- the launch
class _LazyStats(Mapping):
    """Statistics computed on first read: a statistic that costs device launches is paid for
    only by a caller that asks for it (``return_stats=True``)."""

    def __init__(self, **makers: Callable[[], torch.Tensor]):
        self._makers, self._values = makers, {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._values:
            self._values[name] = self._makers[name]()
        return self._values[name]

    def __iter__(self):
        return iter(self._makers)

    def __len__(self) -> int:
        return len(self._makers)


class FusedGreedy:
    """The fused greedy kernels of one compiled module, as a backend.

    ``ext`` is ``mmrprune._cuda`` (device ``"cuda"``) or ``mmrprune._cuda_emu`` (the same
    ``csrc/cuda`` sources with the kernels emulated, device ``"cpu"``).  Either module registers the
    op ``mmrprune::fused_greedy`` for its device; preparation (:func:`prepare`) and the call are
    shared, only the module and the tensors' device type differ."""

    def __init__(self, name: str, ext, import_error: str, device_type: str,
                 ready: Callable[[], tuple[bool, str]], summary: str):
        self.name, self.ext, self.import_error, self.device_type = name, ext, import_error, device_type
        self._ready = ready       # () -> (ok, why not): e.g. "is a GPU there"
        self.summary = summary    # what info() says of the backend when it is available
        self.backend = Backend(name=name, methods=METHODS, device_types=(device_type,), select=self.select,
                               status=self.status, options=TUNING, workspace=call_workspace_bytes)

    def status(self) -> tuple[bool, str]:
        if self.ext is None:
            return False, f"extension {self.module_name} not built ({self.import_error}) — {BUILD_HINTS[self.name]}"
        ok, why = self._ready()
        if not ok:
            return False, why
        return True, self.summary

    @property
    def module_name(self) -> str:
        return f"mmrprune._{self.name}"

    def select(self, batch: SelectionBatch, sim: str = "auto", max_round: Optional[int] = None):
        """``[B, k_max]`` local indices in selection order, -1 past each image's budget; from the
        greedy kernels also ``{"rounds": [B]}``, the sequential rounds each image ran (DPP: one
        per pick; topk runs none and reports none).
        ``sim``, ``max_round``: :func:`prepare`'s (the torch fallback has no such choice)."""
        if not runs_kernel(batch):
            return _tb.select(batch)   # float64 input
        if self.ext is None:
            raise RuntimeError(f"backend {self.name!r} is not available: {self.status()[1]}")
        call = prepare(batch, sim, max_round)

        def op(**kw):
            return torch.ops.mmrprune.fused_greedy(*call.args(), smem_state=_GRAM_SMEM_STATE, cluster=_CLUSTER, **kw)
        if call.score_kind == "topk":   # one ranking pass, no sequential rounds: no "rounds" to report
            return op()[0]
        if call.dpp:   # one pick per round: counted from the picks only when the stats are read
            out, _ = op(dpp_rounds=False)
            return out, _LazyStats(rounds=lambda: (out >= 0).sum(dim=1))
        out, rounds = op()
        return out, {"rounds": rounds}

    def max_round(self) -> int:
        """The kernels' own picks per round (``max_round=None``)."""
        return int(self.ext.MAX_ROUND)

    def complete(self, c: KernelCall) -> KernelCall:
        """``c`` with its score (and, in Gram mode, its norms) computed by the prepare kernel alone
        (``mmrprune::_fused_prepare``): for tests and the emulator harness, which check or run the
        greedy kernels on the prepared values."""
        norms = c.gram is not None and c.inv_norm is None
        if not norms and c.score_kind == "keep":
            return c
        score, inv, sqn, eligible, first = torch.ops.mmrprune._fused_prepare(
            c.rows, c.starts, c.lengths, c.gram if norms else None, c.weights, c.score_kind, c.width, c.dpp,
            c.ks, c.pool_lam)
        return dataclasses.replace(c, score=c.score if score is None else score, inv_norm=c.inv_norm if inv is None
                                   else inv, sqn=c.sqn if sqn is None else sqn,
                                   eligible=c.eligible if eligible is None else eligible,
                                   first_score=c.first_score if first is None else first, score_kind="keep")


def _gpu_ready() -> tuple[bool, str]:
    if torch.cuda.is_available():
        return True, ""
    if torch.version.cuda is None:
        return False, (f"torch.cuda is not available (torch {torch.__version__} is a CPU-only build); the "
                       "extension is built: run on a machine with a CUDA GPU and a CUDA build of torch")
    # a CUDA build that sees no GPU: the torch build is right, the device or its driver is not
    return False, (f"torch.cuda is not available (torch {torch.__version__}, built with CUDA {torch.version.cuda}, "
                   "finds no GPU); the extension is built: run on a machine with a CUDA GPU, its driver loaded "
                   "(nvidia-smi lists it) and the GPU visible (CUDA_VISIBLE_DEVICES)")


KERNELS = FusedGreedy("cuda", _ext, _IMPORT_ERROR, device_type="cuda", ready=_gpu_ready,
                      summary=("fused CUDA kernel: one block per image, all greedy steps in one launch "
                               "(similarity rows from a tensor-core Gram when it fits; sim='rows'/'gram' overrides)"))
BACKEND = KERNELS.backend
status = KERNELS.status
select = KERNELS.select
