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


import pytest
import torch

import mmrprune
from host_ops import count_call

emu = pytest.importorskip("mmrprune.backends.cuda_emu_backend")
if emu.KERNELS.ext is None:
    pytest.skip(f"cuda_emu not built: {emu.KERNELS.import_error}", allow_module_level=True)

# The budget of an eager call, validation included: the Gram product, the prepare kernel, the
# greedy kernel, the position sort.
LAUNCH_BUDGET = 4
GREEDY_METHODS = ("mmr", "fps", "dpp", "divprune", "hybrid")
BUDGET_METHODS = GREEDY_METHODS + ("topk",)


def _count(fn):
    """(ops, launching aten ops, kernels launched by the op, host syncs) of one repeated call,
    by the rules of host_ops.count_call (the ones the cost model charges)."""
    c = count_call(fn, emu.KERNELS.ext.launches)
    return c["ops"], c["aten_launches"], c["kernels"], c["syncs"]


def _inputs(b=2, n=64, d=32):
    torch.manual_seed(0)
    return torch.randn(b, n, d, dtype=torch.bfloat16), torch.rand(b, n)


def _select(method, check_finite, order="position"):
    x, w = _inputs()
    lam = 0.5 if method in ("mmr", "hybrid") else None
    return lambda: mmrprune.select(x, w, k=8, method=method, lam=lam, order=order, backend="cuda_emu",
                                   check_finite=check_finite)


@pytest.mark.parametrize("method", BUDGET_METHODS)
@pytest.mark.parametrize("order", ["position", "selection"])
def test_whole_call_few_launches_no_sync(method, order):
    """``select(..., check_finite=False)``, validation to the returned tensor: at most
    LAUNCH_BUDGET launches and no host sync."""
    ops, launches, kernels, syncs = _count(_select(method, False, order))
    assert syncs == 0, ops
    assert ops.get("fused_greedy") == 1, ops
    if method in GREEDY_METHODS:
        assert ops.get("bmm") == 1, ops   # Gram mode at this size
        assert kernels == 2, (ops, kernels)   # prepare + greedy
    else:   # topk: no Gram, and the prepare kernel's ranking is the selection
        assert ops.get("bmm", 0) == 0 and kernels == 1, (ops, kernels)
    assert launches + kernels <= LAUNCH_BUDGET, (ops, kernels)


@pytest.mark.parametrize("method", BUDGET_METHODS)
def test_whole_call_one_sync_with_check_finite(method):
    """check_finite=True: validation's scans (features, importance, its span) read back once."""
    ops, launches, kernels, syncs = _count(_select(method, True))
    assert syncs <= 1, ops


def test_dpp_rounds_counted_when_asked():
    """DPP's rounds cost launches only for a caller that asks for the stats, and are its picks."""
    x, w = _inputs()
    out, stats = mmrprune.select(x, w, k=8, method="dpp", backend="cuda_emu", return_stats=True,
                                 check_finite=False)
    assert torch.equal(stats["rounds"], (out >= 0).sum(dim=1))
    one, one_stats = mmrprune.select(x[0], w[0], k=8, method="dpp", backend="cuda_emu", return_stats=True)
    assert torch.equal(one, out[0]) and int(one_stats["rounds"]) == 8


def test_counter_sees_a_sync():
    """The counter catches a host read-back (.item(), bool(), int()) and a boolean mask index
    (its size is read back on CUDA)."""
    _, _, _, syncs = _count(lambda: int(torch.ones(3).sum()))
    assert syncs == 1
    t = torch.arange(4)
    _, _, _, syncs = _count(lambda: t[t > 1])
    assert syncs == 1


def test_counter_sees_every_kernel():
    """The op's launches are counted one by one: row mode adds the norm kernel to Gram mode's
    prepare and greedy kernels."""
    x, w = _inputs()
    _, _, kernels, _ = _count(lambda: mmrprune.select(x, w, k=8, method="mmr", lam=0.5, sim="rows",
                                                               backend="cuda_emu", check_finite=False))
    assert kernels == 3
