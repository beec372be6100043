"""``backend="cuda_emu"``: the CUDA backend's kernels executed on CPU tensors by an emulator.

For tests and CI on machines without a GPU (csrc/README.md, "CUDA emulator"): the module
``mmrprune._cuda_emu`` is built from the *same* ``csrc/cuda`` sources as ``mmrprune._cuda``,
with each CUDA thread run as a CPU fiber (csrc/emu/cuda_emu.h).  A call runs exactly the
``cuda`` backend's path: :func:`cuda_backend.prepare` (torch ops on CPU: Imp/q, hybrid pool,
DivPrune first score, Gram and norms in Gram mode, the ``sim=`` choice) and
:class:`cuda_backend.FusedGreedy`'s call of ``mmrprune::fused_greedy``, whose CPU implementation is
this module: the op source of ``mmrprune._cuda`` (checks, scratch, row/Gram kernels, shared-memory
opt-in) driving the emulated kernels.  Slow (every barrier is a context switch of every thread): never
chosen by ``backend="auto"``.
"""
from __future__ import annotations

from . import cuda_backend as _cb

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


KERNELS = _cb.FusedGreedy(
    "cuda_emu", _ext, _IMPORT_ERROR and f"{_IMPORT_ERROR}: {_build_reason()}", device_type="cpu",
    ready=lambda: (True, ""),
    summary=("the unmodified CUDA kernels on CPU tensors, one fiber per GPU thread (csrc/emu): "
             "tests and CI without a GPU; slow, never picked by 'auto'"))
BACKEND = KERNELS.backend
status = KERNELS.status
select = KERNELS.select
