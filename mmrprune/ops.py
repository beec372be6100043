"""torch.library registration of the compiled selection kernels.

``torch.ops.mmrprune.cpu_select`` wraps the C++ extension ``mmrprune._cpu`` as
a custom op, so :func:`mmrprune.select` traces under
``torch.compile(fullgraph=True)``: the op is opaque to the compiler, and its
fake implementation tells it the output is an int64 ``[B, k_max]`` tensor.

The op takes the segment form of a :class:`mmrprune.batch.SelectionBatch`
(``rows [R, D]``, per-row ``importance``/``quality`` in the compute dtype,
``starts``/``lengths``/``ks`` ``[B]`` int64) and returns local indices in
selection order, -1 past ``ks[b]``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .backends import BUILD_HINTS
from .reference import METHODS

try:
    from . import _cpu
    CPU_IMPORT_ERROR = None
except ImportError as exc:  # not built: the cpu backend reports why
    _cpu = None
    CPU_IMPORT_ERROR = str(exc)

# The codes of csrc/cpu/select.h's Method and DType enums, as the compiled module exports them
# (no copy of the numbering lives in Python).
METHOD_CODES = dict(_cpu.METHOD_CODES) if _cpu is not None else {}
CPU_DTYPE_CODES = ({getattr(torch, name): code for name, code in _cpu.DTYPE_CODES.items()}
                   if _cpu is not None else {})
if _cpu is not None and set(METHOD_CODES) != set(METHODS):
    # a method added on one side only: make the cpu backend unavailable, saying why
    CPU_IMPORT_ERROR = (f"mmrprune._cpu implements methods {sorted(METHOD_CODES)}, the package "
                        f"{sorted(METHODS)}: rebuild the extension")
    _cpu = None


def _check_tensor(t: torch.Tensor, name: str, dtypes, ndim: int):
    if t.device.type != "cpu":
        raise ValueError(f"mmrprune::cpu_select: {name} must be a CPU tensor, got device {t.device}")
    if t.dtype not in dtypes:
        raise TypeError(f"mmrprune::cpu_select: {name} must have dtype in {list(dtypes)}, got {t.dtype}")
    if t.ndim != ndim:
        raise ValueError(f"mmrprune::cpu_select: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"mmrprune::cpu_select: {name} must be contiguous")


@torch.library.custom_op("mmrprune::cpu_select", mutates_args=(), device_types="cpu")
def cpu_select(rows: torch.Tensor, importance: torch.Tensor, quality: Optional[torch.Tensor],
               starts: torch.Tensor, lengths: torch.Tensor, ks: torch.Tensor, k_max: int,
               method: str, lam: float, pivot_ratio: float, alpha: float, tau: float,
               radius: int, grid_w: int) -> torch.Tensor:
    if _cpu is None:
        raise RuntimeError(f"mmrprune::cpu_select: the C++ extension mmrprune._cpu is not usable "
                           f"({CPU_IMPORT_ERROR}); {BUILD_HINTS['cpu']}")
    if method not in METHOD_CODES:
        raise ValueError(f"mmrprune::cpu_select: unknown method {method!r}")
    _check_tensor(rows, "rows", tuple(CPU_DTYPE_CODES), 2)
    compute = torch.float64 if rows.dtype == torch.float64 else torch.float32
    _check_tensor(importance, "importance", (compute,), 1)
    if importance.shape[0] != rows.shape[0]:
        raise ValueError(f"mmrprune::cpu_select: importance has {importance.shape[0]} rows, features {rows.shape[0]}")
    if quality is not None:
        _check_tensor(quality, "quality", (compute,), 1)
        if quality.shape[0] != rows.shape[0]:
            raise ValueError(f"mmrprune::cpu_select: quality has {quality.shape[0]} rows, features {rows.shape[0]}")
    elif method == "dpp":
        raise ValueError("mmrprune::cpu_select: method 'dpp' needs quality")
    for name, t in (("starts", starts), ("lengths", lengths), ("ks", ks)):
        _check_tensor(t, name, (torch.int64,), 1)
        if t.shape[0] != starts.shape[0]:
            raise ValueError(f"mmrprune::cpu_select: {name} has {t.shape[0]} entries, starts {starts.shape[0]}")
    bsz = starts.shape[0]
    out = torch.empty((bsz, k_max), dtype=torch.int64)
    _cpu.select(rows.data_ptr(), CPU_DTYPE_CODES[rows.dtype], rows.shape[0], rows.shape[1],
                starts.data_ptr(), lengths.data_ptr(), ks.data_ptr(), bsz, k_max,
                importance.data_ptr(), quality.data_ptr() if quality is not None else 0,
                METHOD_CODES[method], lam, pivot_ratio, alpha, tau, radius, grid_w,
                torch.get_num_threads(), out.data_ptr())
    return out


@cpu_select.register_fake
def _(rows, importance, quality, starts, lengths, ks, k_max, method, lam, pivot_ratio, alpha, tau, radius, grid_w):
    return rows.new_empty((starts.shape[0], k_max), dtype=torch.int64)
