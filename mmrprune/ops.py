"""The one module that registers mmrprune's custom ops, and how every backend calls them.

Each compiled kernel is a ``torch.library`` custom op with a fake implementation, so
:func:`mmrprune.select` traces under ``torch.compile(fullgraph=True)``: the op is opaque
to the compiler, and its fake says the output is an int64 ``[B, k_max]`` tensor.

* ``mmrprune::cpu_select``: the C++ extension ``mmrprune._cpu`` (implemented below);
* ``mmrprune::cuda_greedy``: the CUDA launch (:mod:`mmrprune.backends.cuda_backend`);
* ``mmrprune::triton_greedy``: the Triton launch (``mmrprune/triton_kernels/greedy.py``), through
  :func:`register_triton_op`.

Each op takes the segment form of a :class:`mmrprune.batch.SelectionBatch`
(``rows [R, D]``, per-row scores, ``starts``/``lengths``/``ks`` ``[B]`` int64) and
returns local indices in selection order, -1 past ``ks[b]``.

Version floor: ``torch.library.custom_op`` arrived in torch 2.4 and ``triton_op`` /
``wrap_triton`` in 2.6, so setup.py requires ``torch>=2.6`` and nothing here needs a
fallback for older versions.

Eager calls skip the dispatcher.  Going through ``torch.ops`` costs a fixed amount of
Python per call, several times a small kernel's whole budget (``bench/op_overhead.py``
measures it; the figures are in bench/results/op_overhead.md), and eager mode gains nothing
from it (each implementation checks its own arguments).  So :class:`KernelOp` calls the
implementation directly unless the call is being traced (``torch.compile``/``torch.export``,
a fake or meta tensor, an active dispatch mode), where the registered op is what the tracer
must see.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .backends import BUILD_HINTS
from .reference import METHODS


def _tracing(first: torch.Tensor) -> bool:
    """True when the call must go through the registered op: under torch.compile/export,
    inside a torch dispatch mode (make_fx, FakeTensorMode), or when the first tensor argument
    (the rows; the others share its kind) is a fake, meta or subclass tensor.  Kept to a few
    attribute reads: it runs on every eager call."""
    return (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or type(first) is not torch.Tensor or first.is_meta)


class KernelOp:
    """A registered custom op and its plain implementation (see the module docstring)."""

    def __init__(self, op, impl: Callable):
        self.op = op          # torch.ops.mmrprune.<name>: what tracers see
        self.impl = impl      # the Python function behind it: what eager calls run

    def __call__(self, *args):
        if _tracing(args[0]):
            return self.op(*args)
        return self.impl(*args)

    def register_fake(self, fake: Callable):
        self.op.register_fake(fake)
        return fake


def _existing(name: str):
    """The op ``mmrprune::name`` if this process registered it already (a module imported
    under two names, or reloaded), else None."""
    try:
        return getattr(torch.ops.mmrprune, name)
    except (AttributeError, RuntimeError):
        return None


def register_op(name: str, impl: Callable, fake: Callable, device_types) -> KernelOp:
    """Register ``impl`` as the custom op ``mmrprune::name`` (no mutated arguments) with
    its fake implementation; returns the :class:`KernelOp` the backends call."""
    existing = _existing(name)
    if existing is not None:
        return KernelOp(existing, impl)
    op = torch.library.custom_op(f"mmrprune::{name}", mutates_args=(), device_types=device_types)(impl)
    op.register_fake(fake)
    return KernelOp(op, impl)


def register_triton_op(name: str, impl: Callable) -> KernelOp:
    """Register ``impl`` (which launches through ``torch.library.wrap_triton``) as
    ``mmrprune::name``; torch derives its fake from the traced launches."""
    existing = _existing(name)
    if existing is not None:
        return KernelOp(existing, impl)
    return KernelOp(torch.library.triton_op(f"mmrprune::{name}", mutates_args=())(impl), impl)


try:
    from . import _cpu
    CPU_IMPORT_ERROR = None
except ImportError as exc:  # not built: the cpu backend reports why
    _cpu = None
    CPU_IMPORT_ERROR = str(exc)
# a module built before these were exported is older than this package
_CPU_EXPORTS = ("METHOD_CODES", "SCRATCH_ALIGN")
if _cpu is not None and not all(hasattr(_cpu, name) for name in _CPU_EXPORTS):
    _missing = [name for name in _CPU_EXPORTS if not hasattr(_cpu, name)]
    _cpu, CPU_IMPORT_ERROR = None, f"mmrprune._cpu is older than this package (no {', '.join(_missing)}): rebuild it"

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


def _cpu_select(rows: torch.Tensor, importance: torch.Tensor, quality: Optional[torch.Tensor],
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


def _cpu_select_fake(rows, importance, quality, starts, lengths, ks, k_max, method, lam, pivot_ratio, alpha, tau,
                     radius, grid_w):
    return rows.new_empty((starts.shape[0], k_max), dtype=torch.int64)


cpu_select = register_op("cpu_select", _cpu_select, _cpu_select_fake, "cpu")
