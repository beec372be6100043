"""Selection backends.

Each backend module exposes ``BACKEND``, a :class:`Backend`.  Its ``select``
takes a validated :class:`mmrprune.batch.SelectionBatch` and returns
``[B, k_max]`` int64 local token indices in selection order, each row padded
with -1 past that image's budget ``ks[b]``, on the batch's device, or
``(indices, stats)`` with ``stats`` a dict of ``[B]`` tensors it measured
(``"rounds"``: sequential rounds per image).  Everything
else (validation, ``order``, NumPy in/out, varlen flattening) happens once in
:mod:`mmrprune.api`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# How to get each optional backend: the one copy of every build hint (status messages,
# dispatch errors and `mmrprune info` all quote these).
BUILD_HINTS = {
    "cpu": "build the C++ extension: `pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`",
    "cuda": ("rebuild with MMRPRUNE_CUDA=1 and nvcc on PATH: `MMRPRUNE_CUDA=1 python setup.py build_ext --inplace` "
             "(or `MMRPRUNE_CUDA=1 pip install --no-build-isolation -e .`)"),
    "triton": "install triton (`pip install triton`) on a machine with a CUDA GPU",
    "cuda_emu": ("install the CUDA toolkit headers (nvcc's include/ dir; no GPU needed) and rebuild: "
                 "`python setup.py build_ext --inplace`"),
}


@dataclass(frozen=True)
class Backend:
    name: str
    methods: tuple             # methods this backend implements
    device_types: tuple        # tensor device types it accepts: "cpu", "cuda"
    select: Callable           # SelectionBatch -> Tensor [B, k_max] int64, or (Tensor, stats dict)
    status: Callable           # () -> (available: bool, detail: str)
