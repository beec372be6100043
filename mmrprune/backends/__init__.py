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


@dataclass(frozen=True)
class Backend:
    name: str
    methods: tuple             # methods this backend implements
    device_types: tuple        # tensor device types it accepts: "cpu", "cuda"
    select: Callable           # SelectionBatch -> Tensor [B, k_max] int64, or (Tensor, stats dict)
    status: Callable           # () -> (available: bool, detail: str)
