"""The host path of the CUDA backend: how many device launches and host syncs one eager call costs.

Run on the ``cuda_emu`` backend, which runs the ``cuda`` backend's host code unchanged on CPU
tensors.  A :class:`TorchDispatchMode` sees every aten op the host issues; the launchers of the
compiled module (prepare, inv_norms, greedy_*) are counted by wrapping the module, since the
custom op is opaque to the mode.  Two CPU-only differences are accounted for, not hidden:

* validation checks value ranges on CPU tensors because that costs no sync there; on a GPU it
  does so only with ``check_finite=True``, which is what :func:`_as_accelerator` makes it do;
* torch has no fp32-output bmm on CPU, so the emulated Gram product casts the rows to fp32 first
  (one ``_to_copy``) where CUDA runs ``bmm(..., out_dtype=float32)``.
"""
from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mmrprune
from mmrprune import validation
from mmrprune.backends import cuda_backend as cb

emu = pytest.importorskip("mmrprune.backends.cuda_emu_backend")
if emu.KERNELS.ext is None:
    pytest.skip(f"cuda_emu not built: {emu.KERNELS.import_error}", allow_module_level=True)

# aten ops that allocate or re-view memory without a kernel launch
NO_LAUNCH = {"view", "_unsafe_view", "reshape", "transpose", "t", "expand", "unsqueeze", "squeeze", "detach",
             "alias", "as_strided", "slice", "select", "permute", "empty", "empty_strided", "new_empty",
             "diagonal", "lift_fresh", "_reshape_alias"}
SYNCS = {"_local_scalar_dense"}
LAUNCHERS = ("prepare", "inv_norms", "greedy_maxsim", "greedy_maxsim_gram", "greedy_dpp", "greedy_dpp_gram")
# The budget of the backend's part of an eager call (after validation): the Gram product, the
# prepare kernel, the greedy kernel, the position sort.
BACKEND_LAUNCHES = 4


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)] += 1
        return func(*args, **(kwargs or {}))


class _CountingModule:
    """The compiled module with its launchers counted."""

    def __init__(self, ext):
        self._ext, self.calls = ext, collections.Counter()

    def __getattr__(self, name):
        attr = getattr(self._ext, name)
        if name not in LAUNCHERS:
            return attr

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return attr(*args, **kwargs)
        return counted


@pytest.fixture
def counted(monkeypatch):
    module = _CountingModule(emu.KERNELS.ext)
    monkeypatch.setattr(emu.KERNELS, "ext", module)
    monkeypatch.setattr(validation, "_value_checks", _as_accelerator)
    # the eager route (ops.KernelOp calls the implementation), so the mode sees the op's own
    # torch ops too, not the registered op as one opaque call
    monkeypatch.setattr(mmrprune.ops, "_tracing", lambda first: False)
    # a read-back of a whole tensor does not dispatch an aten op on CPU (on CUDA it is a copy to
    # the host): counted at the Python method
    for name in ("tolist", "numpy"):
        method = getattr(torch.Tensor, name)

        def read_back(self, *args, _method=method, **kwargs):
            module.calls["read_back"] += 1
            return _method(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, read_back)
    return module


def _as_accelerator(device, check_finite):
    """validation's choice for accelerator input (see the module docstring)."""
    return check_finite, check_finite


def _count(module, fn):
    fn()   # first call: one-time probes and caches stay out of the count
    module.calls.clear()
    with _Counter() as mode:
        fn()
    ops = mode.ops
    kernels = sum(n for name, n in module.calls.items() if name in LAUNCHERS)
    aten_launches = sum(n for name, n in ops.items() if name not in NO_LAUNCH | SYNCS and not name.startswith("cuda_emu"))
    return ops, aten_launches, kernels, sum(ops[name] for name in SYNCS) + module.calls["read_back"]


def _inputs(b=2, n=64, d=32):
    torch.manual_seed(0)
    return torch.randn(b, n, d, dtype=torch.bfloat16), torch.rand(b, n)


def _cpu_gram_cast(ops) -> int:
    """The CPU stand-in for CUDA's fp32-output bmm: one rows-to-fp32 cast per Gram product."""
    return 0 if cb._fp32_output_bmm(torch.device("cpu")) else min(ops["_to_copy"], ops["bmm"])


@pytest.mark.parametrize("method", ["mmr", "fps", "dpp"])
@pytest.mark.parametrize("order", ["position", "selection"])
def test_backend_part_few_launches_no_sync(counted, method, order):
    x, w = _inputs()
    batch = validation.validate(x, w, k=8, keep_ratio=None, lam=0.5, method=method, order=order,
                                check_finite=False).batch
    request = validation.Request(batch=batch, numpy_in=False, single_image=False, order=order)
    ops, launches, kernels, syncs = _count(counted, lambda: mmrprune.api._run(request, "cuda_emu"))
    launches -= _cpu_gram_cast(ops)
    extra_dpp = 2 if method == "dpp" else 0   # its rounds: (out >= 0).sum(dim=1)
    assert syncs == 0, ops
    assert ops["bmm"] == 1, ops   # Gram mode at this size
    assert counted.calls["prepare"] == 1, counted.calls
    assert launches + kernels <= BACKEND_LAUNCHES + extra_dpp, (ops, counted.calls)


@pytest.mark.parametrize("check_finite", [False, True])
def test_whole_call_syncs(counted, check_finite):
    """No host sync with check_finite=False.  With check_finite=True validation reads its scans
    back (features, importance, its span): the count is pinned so that it can only go down."""
    x, w = _inputs()
    ops, launches, kernels, syncs = _count(
        counted, lambda: mmrprune.select(x, w, k=8, backend="cuda_emu", check_finite=check_finite))
    assert syncs == (3 if check_finite else 0), ops


def test_counter_sees_a_sync(counted):
    """The counter catches a host read-back (.item(), bool(), int())."""
    _, _, _, syncs = _count(counted, lambda: int(torch.ones(3).sum()))
    assert syncs == 1
