"""The one module that defines mmrprune's custom ops: their schemas and fakes.

Every kernel family is one op, defined here once, with its implementations registered by the
compiled modules under their dispatch keys, and called through ``torch.ops.mmrprune.*`` in eager
and traced code alike:

* ``mmrprune::cpu_select``: CPU key, ``mmrprune._cpu`` (csrc/cpu/op.cpp);
* ``mmrprune::fused_greedy``: CUDA key, ``mmrprune._cuda`` (csrc/cuda/op.cpp); CPU key,
  ``mmrprune._cuda_emu``, the same source driving the emulated kernels (tests, no GPU);
  ``mmrprune::_fused_prepare``, its prepare kernel alone (tests and the emulator harness);
* ``mmrprune::triton_greedy``: a Python ``triton_op`` (``mmrprune/triton_kernels/greedy.py``),
  through :func:`register_triton_op`.

The schemas live here rather than in each module's ``TORCH_LIBRARY``: a namespace may be
defined by one library only, ``_cuda`` and ``_cuda_emu`` share a source, and any subset of the
modules may be built.  A module's implementation is checked against the schema when both are
registered (the dispatcher compares the C++ signature), whichever comes first.  The fakes say the
output shapes, so :func:`mmrprune.select` traces under ``torch.compile(fullgraph=True)``.

The cpu and fused ops take the segment form of a :class:`mmrprune.batch.SelectionBatch`
(``rows [R, D]``, per-row scores, ``starts``/``lengths``/``ks`` ``[B]`` int64) and return local
indices in selection order, -1 past ``ks[b]``.  They check their arguments in C++ (a
``ValueError``/``TypeError`` naming the argument).

Version floor: ``torch.library.register_fake`` arrived in torch 2.4 and ``triton_op`` /
``wrap_triton`` in 2.6, so pyproject.toml requires ``torch>=2.6``.
"""
from __future__ import annotations

from typing import Callable

import torch

from .reference import METHODS

SCHEMAS = {
    "cpu_select": (
        "cpu_select(Tensor rows, Tensor importance, Tensor? quality, Tensor starts, Tensor lengths, Tensor ks, "
        "int k_max, str method, float lam, float pivot_ratio, float alpha, float tau, int radius, int grid_w, "
        "str isa=\"\") -> Tensor"),
    # score_kind: what the prepare kernel writes into the per-row score (csrc/cuda/prepare.h ScoreKind)
    "fused_greedy": (
        "fused_greedy(Tensor rows, Tensor? score, Tensor? first_score, Tensor? eligible, Tensor starts, "
        "Tensor lengths, Tensor ks, int k_max, float lam, bool dpp, Tensor? gram=None, Tensor? inv_norm=None, "
        "Tensor? sqn=None, Tensor? weights=None, str score_kind=\"keep\", int width=0, int max_round=0, "
        "float pool_lam=0.0, int smem_state=-1, bool dpp_rounds=True, int cluster=0) -> (Tensor picks, Tensor rounds)"),
    "_fused_prepare": (
        "_fused_prepare(Tensor rows, Tensor starts, Tensor lengths, Tensor? gram, Tensor? weights, "
        "str score_kind, int width, bool dpp, Tensor? ks=None, float pool_lam=0.0) "
        "-> (Tensor score, Tensor inv_norm, Tensor sqn, Tensor eligible, Tensor first_score)"),
}


def _defined(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"mmrprune::{name}", "")
        return True
    except RuntimeError:
        return False


_LIB = torch.library.Library("mmrprune", "FRAGMENT")   # kept alive: dropping it undefines the ops
for _name, _schema in SCHEMAS.items():
    if not _defined(_name):   # defined already: this module imported under a second name, or reloaded
        _LIB.define(_schema)


def _register_fake(name: str):
    def register(fake: Callable) -> Callable:
        torch.library.register_fake(f"mmrprune::{name}", fake, lib=_LIB)
        return fake
    return register


@_register_fake("cpu_select")
def _cpu_select_fake(rows, importance, quality, starts, lengths, ks, k_max, method, lam, pivot_ratio, alpha, tau,
                     radius, grid_w, isa=""):
    return rows.new_empty((starts.shape[0], k_max), dtype=torch.int64)


@_register_fake("fused_greedy")
def _fused_greedy_fake(rows, score, first_score, eligible, starts, lengths, ks, k_max, lam, dpp, gram=None,
                       inv_norm=None, sqn=None, weights=None, score_kind="keep", width=0, max_round=0, pool_lam=0.0,
                       smem_state=-1, dpp_rounds=True, cluster=0):
    return (rows.new_empty((starts.shape[0], k_max), dtype=torch.int64),
            rows.new_empty((starts.shape[0],), dtype=torch.int64))


def register_triton_op(name: str, impl: Callable):
    """Register ``impl`` (which launches through ``torch.library.wrap_triton``) as
    ``mmrprune::name``; torch derives its fake from the traced launches."""
    if _defined(name):
        return getattr(torch.ops.mmrprune, name).default
    return torch.library.triton_op(f"mmrprune::{name}", mutates_args=())(impl)


try:
    from . import _cpu   # registers mmrprune::cpu_select's CPU implementation
    CPU_IMPORT_ERROR = None
except ImportError as exc:  # not built: the cpu backend reports why
    _cpu = None
    CPU_IMPORT_ERROR = str(exc)
if _cpu is not None and hasattr(_cpu, "select"):
    # a module built before cpu_select took tensors (it registers no op) is older than this package
    _cpu, CPU_IMPORT_ERROR = None, "mmrprune._cpu is older than this package (raw-pointer entry points): rebuild it"

# The method names cpu_select takes, as the compiled module exports them (csrc/cpu/op.h).
METHOD_CODES = dict(_cpu.METHOD_CODES) if _cpu is not None else {}
if _cpu is not None and set(METHOD_CODES) != set(METHODS):
    # a method added on one side only: make the cpu backend unavailable, saying why
    CPU_IMPORT_ERROR = (f"mmrprune._cpu implements methods {sorted(METHOD_CODES)}, the package "
                        f"{sorted(METHODS)}: rebuild the extension")
    _cpu = None
