"""Counting what a call asks of the host, on CPU: the aten ops it dispatches and its host syncs.

Shared by tests/test_host_path.py (launches and syncs of one eager call on the cuda backend's
host path) and bench/gpu/smoke.py's dry run (the call a CUDA graph would capture makes no
sync: a sync is what a capture refuses).  On CPU a sync is free, so it is counted where CUDA
would pay it: ``_local_scalar_dense`` (``.item()``, ``int()``, ``bool()``), ``nonzero`` and a
boolean-mask index (both size their output from the data), and a whole-tensor read-back
(``.tolist()``, ``.numpy()``, a copy to the host on CUDA; counted at the Python method, since on
CPU it dispatches no aten op).
"""
from __future__ import annotations

import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCS = {"_local_scalar_dense", "nonzero", "bool_index"}
READ_BACKS = ("tolist", "numpy")


class OpCounter(TorchDispatchMode):
    """Every aten op by name (``ops``), plus ``bool_index`` for a boolean-mask index."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)] += 1
        if func is torch.ops.aten.index.Tensor and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            self.ops["bool_index"] += 1
        return func(*args, **(kwargs or {}))

    def syncs(self) -> int:
        return sum(self.ops[name] for name in SYNCS)


def as_accelerator(device, check_finite):
    """validation's choice for accelerator input: value checks (and their read-back) only with
    ``check_finite=True`` (on CPU it checks always, since there it costs no sync)."""
    return check_finite, check_finite


@contextlib.contextmanager
def accelerator_host_path(read_backs: collections.Counter):
    """Run mmrprune's host code on CPU as it runs for CUDA tensors: validation as for an
    accelerator.  Whole-tensor read-backs are added to ``read_backs["read_back"]``."""
    from mmrprune import validation
    saved = [(validation, "_value_checks", validation._value_checks)]
    saved += [(torch.Tensor, name, getattr(torch.Tensor, name)) for name in READ_BACKS]
    validation._value_checks = as_accelerator
    for name in READ_BACKS:
        method = getattr(torch.Tensor, name)

        def read_back(self, *args, _method=method, **kwargs):
            read_backs["read_back"] += 1
            return _method(self, *args, **kwargs)
        setattr(torch.Tensor, name, read_back)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
