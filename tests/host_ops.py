"""Counting what a call asks of the host, on CPU: the aten ops it dispatches and its host syncs.

Shared by tests/test_host_path.py (launches and syncs of one eager call on the cuda backend's
host path), bench/gpu_model.py (the host term of its estimates: :func:`count_call` and the rules
below, so that the model and the test's budget count one way) and bench/gpu/smoke.py's dry run
(the call a CUDA graph would capture makes no sync: a sync is what a capture refuses).  On CPU a
sync is free, so it is counted where CUDA would pay it: ``_local_scalar_dense`` (``.item()``,
``int()``, ``bool()``), ``nonzero`` and a boolean-mask index (both size their output from the
data), and a whole-tensor read-back (``.tolist()``, ``.numpy()``, a copy to the host on CUDA;
counted at the Python method, since on CPU it dispatches no aten op).
"""
from __future__ import annotations

import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCS = {"_local_scalar_dense", "nonzero", "bool_index"}
READ_BACKS = ("tolist", "numpy")
# aten ops that allocate or re-view memory without a kernel launch
# (scalar_tensor: a Python number wrapped as a CPU scalar operand, never a device launch)
NO_LAUNCH = {"view", "_unsafe_view", "reshape", "_reshape_alias", "transpose", "t", "permute", "expand", "unsqueeze",
             "squeeze", "detach", "alias", "as_strided", "slice", "select", "narrow", "diagonal", "unbind", "split",
             "chunk", "empty", "empty_like", "empty_strided", "new_empty", "scalar_tensor", "lift_fresh",
             "sym_size", "sym_stride", "is_same_size"}
# mmrprune's own ops: counted by the kernels they launch, not as one launch
CUSTOM_NAMESPACE = "mmrprune"


class OpCounter(TorchDispatchMode):
    """Every aten op by name (``ops``), plus ``bool_index`` for a boolean-mask index."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.custom = collections.Counter()   # ops of CUSTOM_NAMESPACE, also in ``ops``

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
        self.ops[name] += 1
        if getattr(func, "namespace", None) == CUSTOM_NAMESPACE:
            self.custom[name] += 1
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


def cpu_gram_cast(ops: collections.Counter) -> int:
    """Launches that only the CPU run makes: torch has no fp32-output bmm on CPU, so a 16-bit Gram
    product casts its rows to fp32 first (one ``_to_copy`` per ``bmm``) where CUDA runs
    ``bmm(..., out_dtype=float32)``."""
    from mmrprune.backends import cuda_backend
    return 0 if cuda_backend._fp32_output_bmm(torch.device("cpu")) else min(ops["_to_copy"], ops["bmm"])


def count_call(fn, kernel_launches=None) -> dict:
    """What one repeated eager call of ``fn`` asks of the host, as it would on a GPU.

    The first call runs uncounted (one-time probes, and the per-shape constants validation keeps,
    cost launches once); the second runs under :class:`OpCounter` with validation as for
    accelerator input (:func:`accelerator_host_path`).  ``kernel_launches``: a callable giving a
    running total of kernels launched inside the custom ops (the emulator's ``launches()``, a
    list of recorded Triton launches), or None where nothing can count them.

    Returns ``ops`` (every aten op by name), ``aten_launches`` (the kernel-launching aten ops,
    views, allocations, syncs, custom ops and the CPU-only Gram cast left out), ``custom_ops``,
    ``kernels`` (launched inside the custom ops; None if not counted) and ``syncs`` (host syncs
    and whole-tensor read-backs)."""
    read_backs = collections.Counter()
    with accelerator_host_path(read_backs):
        fn()
        read_backs.clear()
        start = kernel_launches() if kernel_launches else None
        with OpCounter() as mode:
            fn()
        kernels = kernel_launches() - start if kernel_launches else None
    ops = mode.ops
    aten = sum(n for name, n in ops.items() if name not in NO_LAUNCH | SYNCS and name not in mode.custom)
    return {"ops": dict(ops), "aten_launches": aten - cpu_gram_cast(ops), "custom_ops": sum(mode.custom.values()),
            "kernels": kernels, "syncs": mode.syncs() + read_backs["read_back"]}
