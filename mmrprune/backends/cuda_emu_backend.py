"""``backend="cuda_emu"``: the CUDA backend's kernels executed on CPU tensors by an emulator.

For tests and CI on machines without a GPU (csrc/README.md, "CUDA emulator"): the module
``mmrprune._cuda_emu`` is built from the *same* ``csrc/cuda`` sources as ``mmrprune._cuda``,
with each CUDA thread run as a CPU fiber (csrc/emu/cuda_emu.h).  A call runs exactly the
``cuda`` backend's path: :func:`cuda_backend.prepare` (torch ops on CPU: Imp/q, hybrid pool,
DivPrune first score, Gram and norms in Gram mode, the ``MMRPRUNE_CUDA_GRAM`` choice) and
:func:`cuda_backend.launch_with` (checks, scratch, row/Gram kernels, shared-memory opt-in),
then the emulated kernels.  Slow (every barrier is a context switch of every thread): never
chosen by ``backend="auto"``.
"""
from __future__ import annotations

import torch

from ..batch import SelectionBatch
from . import Backend
from . import cuda_backend as _cb
from . import torch_backend as _tb

try:  # built by setup.py whenever the CUDA headers are present
    from .. import _cuda_emu as _ext
    _IMPORT_ERROR = ""
except ImportError as exc:  # pragma: no cover - depends on the build
    _ext = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def _build_reason() -> str:
    try:
        from .._build_config import BUILD
    except ImportError:
        return "no build record (mmrprune/_build_config.py)"
    return str(BUILD.get("cuda_emu_status", "not built by this setup.py"))


def status() -> tuple[bool, str]:
    if _ext is None:
        return False, f"extension mmrprune._cuda_emu not built ({_IMPORT_ERROR}): {_build_reason()}"
    return True, ("the unmodified CUDA kernels on CPU tensors, one fiber per GPU thread (csrc/emu): "
                  "tests and CI without a GPU; slow, never picked by 'auto'")


def select(batch: SelectionBatch) -> torch.Tensor:
    """``[B, k_max]`` local indices in selection order, as the ``cuda`` backend computes them."""
    if batch.method not in _cb.KERNEL_METHODS or batch.features.dtype not in _cb.DTYPE_CODES:
        return _tb.select(batch)   # topk (a sort), float64 input: the cuda backend's fallback too
    if _ext is None:
        raise RuntimeError(f"backend 'cuda_emu' is not available: {status()[1]}")
    a = _cb.prepare(batch)
    return _cb.launch_with(_ext, "cpu", a["rows"], a["score"], a["first_score"], a["eligible"], a["starts"],
                           a["lengths"], a["ks"], a["k_max"], a["lam"], a["dpp"], a["gram"], a["inv_norm"],
                           a["sqn"])


BACKEND = Backend(
    name="cuda_emu",
    methods=_cb.METHODS,
    device_types=("cpu",),
    select=select,
    status=status,
)
