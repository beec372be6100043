"""The host path of the CUDA backend: how many device launches and host syncs one eager call costs.

Run on the ``cuda_emu`` backend, which runs the ``cuda`` backend's host code unchanged on CPU
tensors.  A :class:`TorchDispatchMode` sees every aten op the Python host code issues, and the op
``mmrprune::fused_greedy`` as one opaque call; the kernels that op launches are counted by the
emulator itself (``_cuda_emu.launches()``, every ``<<<>>>`` the emulated kernels run).  The op's
own allocations (``at::empty`` of its output and scratch) launch nothing and are not seen; on the
path counted here it issues no other aten op (``dpp_rounds=False``: DPP's rounds are counted from
the picks only when asked for).  Two CPU-only differences are accounted for, not hidden:

* validation checks value ranges on CPU tensors because that costs no sync there; on a GPU it
  does so only with ``check_finite=True``, which is what ``host_ops.as_accelerator`` makes it do;
* torch has no fp32-output bmm on CPU, so the emulated Gram product casts the rows to fp32 first
  (one ``_to_copy``) where CUDA runs ``bmm(..., out_dtype=float32)``.

The count is of a repeated call (the first one is left out: one-time probes, and the per-shape
constants that validation keeps, cost launches once).
"""
from __future__ import annotations

import collections

import pytest
import torch

import mmrprune
from host_ops import SYNCS, OpCounter, accelerator_host_path
from mmrprune.backends import cuda_backend as cb

emu = pytest.importorskip("mmrprune.backends.cuda_emu_backend")
if emu.KERNELS.ext is None:
    pytest.skip(f"cuda_emu not built: {emu.KERNELS.import_error}", allow_module_level=True)

# aten ops that allocate or re-view memory without a kernel launch
NO_LAUNCH = {"view", "_unsafe_view", "reshape", "transpose", "t", "expand", "unsqueeze", "squeeze", "detach",
             "alias", "as_strided", "slice", "select", "permute", "empty", "empty_strided", "new_empty",
             "diagonal", "lift_fresh", "_reshape_alias"}
MMRPRUNE_OPS = {"fused_greedy"}   # counted by the kernels it launches
# The budget of an eager call, validation included: the Gram product, the prepare kernel, the
# greedy kernel, the position sort.
LAUNCH_BUDGET = 4
GREEDY_METHODS = ("mmr", "fps", "dpp", "divprune", "hybrid")
BUDGET_METHODS = GREEDY_METHODS + ("topk",)


class _Calls:
    """Host read-backs, counted at the Python methods, and the emulated kernel launches."""

    def __init__(self, ext):
        self._ext, self.calls, self._start = ext, collections.Counter(), ext.launches()

    def clear(self):
        self.calls.clear()
        self._start = self._ext.launches()

    def kernels(self) -> int:
        return self._ext.launches() - self._start


@pytest.fixture
def counted():
    module = _Calls(emu.KERNELS.ext)
    # validation as for accelerator input, read-backs counted (host_ops)
    with accelerator_host_path(module.calls):
        yield module


def _count(module, fn):
    fn()   # first call: one-time probes and caches stay out of the count
    module.clear()
    with OpCounter() as mode:
        fn()
    ops = mode.ops
    kernels = module.kernels()
    aten_launches = sum(n for name, n in ops.items() if name not in NO_LAUNCH | SYNCS and name not in MMRPRUNE_OPS)
    return ops, aten_launches, kernels, sum(ops[name] for name in SYNCS) + module.calls["read_back"]


def _inputs(b=2, n=64, d=32):
    torch.manual_seed(0)
    return torch.randn(b, n, d, dtype=torch.bfloat16), torch.rand(b, n)


def _cpu_gram_cast(ops) -> int:
    """The CPU stand-in for CUDA's fp32-output bmm: one rows-to-fp32 cast per Gram product."""
    return 0 if cb._fp32_output_bmm(torch.device("cpu")) else min(ops["_to_copy"], ops["bmm"])


def _select(method, check_finite, order="position"):
    x, w = _inputs()
    lam = 0.5 if method in ("mmr", "hybrid") else None
    return lambda: mmrprune.select(x, w, k=8, method=method, lam=lam, order=order, backend="cuda_emu",
                                   check_finite=check_finite)


@pytest.mark.parametrize("method", BUDGET_METHODS)
@pytest.mark.parametrize("order", ["position", "selection"])
def test_whole_call_few_launches_no_sync(counted, method, order):
    """``select(..., check_finite=False)``, validation to the returned tensor: at most
    LAUNCH_BUDGET launches and no host sync."""
    ops, launches, kernels, syncs = _count(counted, _select(method, False, order))
    launches -= _cpu_gram_cast(ops)
    assert syncs == 0, ops
    assert ops["fused_greedy"] == 1, ops
    if method in GREEDY_METHODS:
        assert ops["bmm"] == 1, ops   # Gram mode at this size
        assert kernels == 2, (ops, kernels)   # prepare + greedy
    else:   # topk: no Gram, and the prepare kernel's ranking is the selection
        assert ops["bmm"] == 0 and kernels == 1, (ops, kernels)
    assert launches + kernels <= LAUNCH_BUDGET, (ops, kernels)


@pytest.mark.parametrize("method", BUDGET_METHODS)
def test_whole_call_one_sync_with_check_finite(counted, method):
    """check_finite=True: validation's scans (features, importance, its span) read back once."""
    ops, launches, kernels, syncs = _count(counted, _select(method, True))
    assert syncs <= 1, ops


def test_dpp_rounds_counted_when_asked(counted):
    """DPP's rounds cost launches only for a caller that asks for the stats, and are its picks."""
    x, w = _inputs()
    out, stats = mmrprune.select(x, w, k=8, method="dpp", backend="cuda_emu", return_stats=True,
                                 check_finite=False)
    assert torch.equal(stats["rounds"], (out >= 0).sum(dim=1))
    one, one_stats = mmrprune.select(x[0], w[0], k=8, method="dpp", backend="cuda_emu", return_stats=True)
    assert torch.equal(one, out[0]) and int(one_stats["rounds"]) == 8


def test_counter_sees_a_sync(counted):
    """The counter catches a host read-back (.item(), bool(), int()) and a boolean mask index
    (its size is read back on CUDA)."""
    _, _, _, syncs = _count(counted, lambda: int(torch.ones(3).sum()))
    assert syncs == 1
    t = torch.arange(4)
    _, _, _, syncs = _count(counted, lambda: t[t > 1])
    assert syncs == 1


def test_counter_sees_every_kernel(counted):
    """The op's launches are counted one by one: row mode adds the norm kernel to Gram mode's
    prepare and greedy kernels."""
    x, w = _inputs()
    _, _, kernels, _ = _count(counted, lambda: mmrprune.select(x, w, k=8, method="mmr", lam=0.5, sim="rows",
                                                               backend="cuda_emu", check_finite=False))
    assert kernels == 3
