"""Workspace estimate and limit: a call that would need more scratch memory than the
limit fails up front with the bytes it needs, instead of being OOM-killed half way.

The dominant buffer is DPP's greedy-MAP state, ``N x k`` Cholesky rows per image
(inherent to the incremental Cholesky): at N = 100,000 and k = 25,000 that is
10 GB in float32, from a 25 MB input.  Every backend's estimate below counts the
buffers it allocates beyond the input and the output, per call.

The limit is a call's ``workspace_limit=`` argument; without it, the environment variable
``MMRPRUNE_MAX_WORKSPACE`` (read at every call), else ``DEFAULT_LIMIT_BYTES`` (4 GiB).
:func:`mmrprune.workspace_bytes` says what a call needs before making it.  Accepted
(an int of bytes too, for the argument), case and surrounding spaces aside:

* a byte count: a decimal number (digits, with an optional fraction) and an optional
  binary suffix ``K``, ``M``, ``G`` or ``T`` (``KiB``/``KB`` and so on too), e.g.
  ``8589934592``, ``512M``, ``1.5G``; at least 1 byte and at most ``MAX_LIMIT_BYTES``,
  fractions of a byte rounded down;
* ``unlimited``: no limit, the only spelling of it.

Anything else (``inf``, ``1e9``, ``0``, ``-1``, ``0.5``, a number past 2**63) raises a
``ValueError`` that names the variable and these forms.
"""
from __future__ import annotations

import os
import re
from fractions import Fraction

import torch

from .batch import SelectionBatch

ENV_VAR = "MMRPRUNE_MAX_WORKSPACE"
UNLIMITED = "unlimited"
DEFAULT_LIMIT_BYTES = 4 << 30
MAX_LIMIT_BYTES = 2**63 - 1        # what an int64 byte count holds; far past any machine
_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_BYTE_COUNT = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?:(?P<unit>[KMGT])I?)?B?", re.IGNORECASE | re.ASCII)
_MAX_DIGITS = 40      # no number this long is a limit (and Python refuses to parse > 4300 digits)
_QUOTED_CHARS = 40    # a message quotes at most this much of the variable's value


class WorkspaceLimitError(MemoryError):
    """The call would need more scratch memory than the workspace limit allows."""


def parse_limit(raw: str) -> int | None:
    """``MMRPRUNE_MAX_WORKSPACE``'s value as bytes (None: unlimited); see the module docstring."""
    text = raw.strip()
    if text.lower() == UNLIMITED:
        return None
    match = _BYTE_COUNT.fullmatch(text)
    value = 0
    if match and len(match["number"]) <= _MAX_DIGITS:   # longer is past MAX_LIMIT_BYTES anyway
        value = int(Fraction(match["number"]) * _SUFFIX[(match["unit"] or "").upper()])
    if not 1 <= value <= MAX_LIMIT_BYTES:
        shown = repr(raw) if len(raw) <= _QUOTED_CHARS else f"{raw[:_QUOTED_CHARS]!r}... ({len(raw)} characters)"
        raise ValueError(f"{ENV_VAR}: expected a byte count of at least 1 byte (digits with an optional K, M, G "
                         f"or T suffix, e.g. 8589934592, 512M or 1.5G; at most {MAX_LIMIT_BYTES}) or "
                         f"'{UNLIMITED}' for no limit; got {shown}")
    return value


def limit_bytes(limit=None) -> int | None:
    """The workspace limit in bytes (None: unlimited): a call's ``workspace_limit`` (a positive
    int, a byte-count string as the variable takes, or ``"unlimited"``), else
    ``MMRPRUNE_MAX_WORKSPACE``, else :data:`DEFAULT_LIMIT_BYTES`."""
    if limit is None:
        raw = os.environ.get(ENV_VAR, "")
        return DEFAULT_LIMIT_BYTES if not raw.strip() else parse_limit(raw)
    if isinstance(limit, bool) or not isinstance(limit, (int, str)):
        raise TypeError(f"workspace_limit: expected a byte count (int or a string such as '512M') or "
                        f"'{UNLIMITED}', got {type(limit).__name__}")
    if isinstance(limit, int):
        if not 1 <= limit <= MAX_LIMIT_BYTES:
            raise ValueError(f"workspace_limit: expected at least 1 byte and at most {MAX_LIMIT_BYTES}, got {limit}")
        return limit
    try:
        return parse_limit(limit)
    except ValueError as exc:
        raise ValueError(str(exc).replace(f"{ENV_VAR}:", "workspace_limit:", 1)) from None


def _n_max(batch: SelectionBatch) -> int:
    """Longest image: the padded width, or (packed) the longest segment (the backends read it too)."""
    if not batch.packed:
        return int(batch.features.shape[1])
    return max(1, int(batch.lengths.max().item())) if batch.batch_size else 1


def estimate_bytes(backend: str, batch: SelectionBatch, sim: str = "auto") -> int:
    """Scratch bytes ``backend`` allocates for ``batch`` beyond its input and output (an upper
    estimate of the large buffers; per-call constants of a few KB are left out).  Every copy
    of the input counts: ``batch.rows()`` copies non-contiguous (expanded, strided) features
    whole (``batch.rows_copy_bytes()``) for the backends that read rows.  ``sim`` is the call's
    similarity source (``mmrprune.select``'s ``sim=``), read by the backends that have one."""
    method, bsz, dim, k = batch.method, batch.batch_size, batch.dim, int(batch.k_max)
    rows = batch.features.numel() // dim
    n = _n_max(batch)
    c = 8 if batch.compute_dtype == torch.float64 else 4       # bytes of the compute dtype
    rows_copy = batch.rows_copy_bytes()
    if backend == "numpy":       # float64, one image at a time, plus a float64 copy of every row
        per_image = 2 * n * dim * 8 + 4 * n * 8          # x * x and x̂ while normalising
        if method == "dpp":
            per_image += k * n * 8
        elif method == "divprune":
            per_image += 2 * n * n * 8                     # xh @ xh.T and 1 - it
        elif method == "d2pruner":
            per_image += 3 * n * n * 8 + n * n             # sims, near, their sum, the edge mask
        return rows_copy + rows * dim * 8 + per_image
    if backend == "cpu":         # per-thread scratch (whole blocks of SCRATCH_ALIGN), one image at a time
        from .ops import _cpu
        threads, align = max(1, min(torch.get_num_threads(), bsz)), _cpu.SCRATCH_ALIGN
        per_image = -(-n * dim * c // align) * align + 6 * n * 8
        if method == "dpp":
            per_image += n * k * c
        return rows_copy + 2 * rows * c + threads * per_image
    if backend == "torch":       # batched [B, N] state; the normalised copy [B, N, D] and its transpose
        padded = bsz * n
        total = 2 * padded * dim * c + 8 * padded * 8
        if batch.packed:
            total += padded * dim * batch.features.element_size()
        if method == "dpp":
            total += bsz * k * n * c
        elif method in ("mmr", "fps", "hybrid", "divprune"):
            from .backends.torch_backend import GRAM_MAX_BYTES
            gram = bsz * n * n * 4
            if c == 4 and gram <= GRAM_MAX_BYTES:   # the step loops' float32 Gram (torch_backend)
                total += gram
            if method == "divprune":                # its first step's row blocks
                from .prepare import GRAM_CHUNK_BYTES
                total += min(GRAM_CHUNK_BYTES, bsz * n * n * c)
        return total
    if backend in ("cuda", "cuda_emu"):   # the similarity mode the backend picks, its copies
        from .backends import cuda_backend
        if not cuda_backend.runs_kernel(batch):
            return estimate_bytes("torch", batch)
        return cuda_backend.call_workspace_bytes(batch, n, sim)
    if backend == "triton":      # per-row fp32 state, dpp's Cholesky rows; float64 input is scaled
        total = rows_copy + rows * 6 * 4          # (a float64 copy) and converted (an fp32 copy) first
        if batch.features.dtype == torch.float64:
            total += rows * dim * (8 + 4)
        if method == "dpp":
            total += max(k - 1, 1) * rows * 4
        from .backends import triton_backend
        if method != "topk" and triton_backend._kernels is not None:   # its float32 Gram, when it builds one
            if triton_backend._kernels.uses_gram(bsz, n, triton_backend.GRAM_SETTING[sim]):
                total += bsz * n * n * 4
        return total
    return 0


def _human(nbytes: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} B"


def check(backend: str, batch: SelectionBatch, limit=None, sim: str = "auto") -> None:
    """Raise :class:`WorkspaceLimitError` when ``backend`` would need more than the limit
    (:func:`limit_bytes` of ``limit``)."""
    limit = limit_bytes(limit)
    if limit is None:
        return
    need = estimate_bytes(backend, batch, sim)
    if need > limit:
        raise WorkspaceLimitError(
            f"workspace: backend {backend!r} would need about {_human(need)} ({need} bytes) of scratch memory "
            f"for method {batch.method!r} with B={batch.batch_size}, N={_n_max(batch)}, D={batch.dim}, "
            f"k={batch.k_max}, above the limit of {_human(limit)} ({limit} bytes); raise the limit with the "
            f"argument workspace_limit= (e.g. workspace_limit='32G' or '{UNLIMITED}') or the environment variable "
            f"{ENV_VAR} (its default), or lower k, or split the batch")
