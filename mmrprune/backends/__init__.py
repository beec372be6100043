"""Selection backends.

Each backend module exposes ``BACKEND``, a :class:`Backend`.  Its ``select``
takes a validated :class:`mmrprune.batch.SelectionBatch` and returns
``[B, k_max]`` int64 local token indices in selection order, each row padded
with -1 past that image's budget ``ks[b]``, on the batch's device, or
``(indices, stats)`` with ``stats`` a dict of ``[B]`` tensors it measured
(``"rounds"``: sequential rounds per image).  A backend that has kernel variants lists the
tuning keywords it takes in ``options`` (see :data:`TUNING`); its ``select`` then takes them
as keyword arguments, already checked by :func:`check_tuning`, and so does its ``workspace``,
which says how many scratch bytes a batch needs beyond its input and output (what
:mod:`mmrprune.workspace` checks against the limit).  :meth:`Backend.supports` says whether it
runs a batch's method on the batch's device.  Everything
else (validation, ``order``, NumPy in/out, varlen flattening) happens once in
:mod:`mmrprune.api`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

# How to get each optional backend: the one copy of every build hint (status messages,
# dispatch errors and `mmrprune info` all quote these).
BUILD_HINTS = {
    "cpu": ("build the C++ extension against the installed torch (again after changing torch): "
            "`pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`"),
    "cuda": ("rebuild with MMRPRUNE_CUDA=1 and nvcc on PATH: `MMRPRUNE_CUDA=1 python setup.py build_ext --inplace` "
             "(or `MMRPRUNE_CUDA=1 pip install --no-build-isolation -e .`)"),
    "triton": "install triton (`pip install triton`) on a machine with a CUDA GPU",
    "cuda_emu": ("install the CUDA toolkit headers (nvcc's include/ dir; no GPU needed) and rebuild: "
                 "`python setup.py build_ext --inplace`"),
}


# Kernel tuning: which similarity source the fused kernels read, and how many picks one round
# of the mmr-family kernels may commit.  Neither changes a result (every variant is checked
# against the same picks), only speed and memory, so a backend without the choice ignores them.
SIMS = ("auto", "gram", "rows")   # auto: Gram while it fits the kernel's bound, else rows
MAX_ROUND = 8                     # the kernels' own largest round (csrc/cuda kMaxRound, triton MAX_ROUND)
TUNING = ("sim", "max_round")


def check_tuning(sim, max_round) -> dict:
    """``{"sim": ..., "max_round": ...}`` once both are valid; a clear error otherwise."""
    if not isinstance(sim, str) or sim not in SIMS:
        raise ValueError(f"sim: expected one of {list(SIMS)} ('auto': Gram rows while the Gram fits, "
                         f"'gram': always, 'rows': recompute each similarity row), got {sim!r}")
    if max_round is not None and (isinstance(max_round, bool) or not isinstance(max_round, int)
                                  or not 1 <= max_round <= MAX_ROUND):
        raise ValueError(f"max_round: expected None (the kernel's default, {MAX_ROUND}) or an int in "
                         f"[1, {MAX_ROUND}] (picks one round may commit; 1 = one pick per step), got {max_round!r}")
    return {"sim": sim, "max_round": max_round}


@dataclass(frozen=True)
class Backend:
    name: str
    methods: tuple             # methods this backend implements
    device_types: tuple        # tensor device types it accepts: "cpu", "cuda"
    select: Callable           # SelectionBatch -> Tensor [B, k_max] int64, or (Tensor, stats dict)
    status: Callable           # () -> (available: bool, detail: str)
    options: tuple = ()        # tuning keywords its select and workspace take (a subset of TUNING)
    # (SelectionBatch, **options) -> int: scratch bytes beyond the input and the output, an upper
    # estimate of the large buffers (per-call constants of a few KB left out)
    workspace: Optional[Callable] = None

    def supports(self, batch, any_device: bool = False) -> tuple[bool, str]:
        """``(True, "")`` when this backend runs ``batch``'s method on the batch's device (on one of
        its devices with ``any_device``, or for a meta batch, which is only sized), else
        ``(False, why)``."""
        if batch.method not in self.methods:
            return False, f"backend {self.name!r} does not implement method {batch.method!r} (it has {list(self.methods)})"
        dev = batch.device.type
        if not any_device and dev != "meta" and dev not in self.device_types:
            return False, f"backend {self.name!r} takes {' or '.join(self.device_types)} tensors, not {dev}"
        return True, ""

    def workspace_bytes(self, batch, **options) -> int:
        """:attr:`workspace` of ``batch`` with those of ``options`` this backend takes."""
        if self.workspace is None:
            raise TypeError(f"backend {self.name!r} does not say how much workspace it needs (no `workspace`)")
        return int(self.workspace(batch, **{k: v for k, v in options.items() if k in self.options}))
