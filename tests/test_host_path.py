"""The host path of the CUDA backend: how many device launches and host syncs one eager call costs.

Run on the ``cuda_emu`` backend, which runs the ``cuda`` backend's host code unchanged on CPU
tensors.  A :class:`TorchDispatchMode` sees every aten op the host issues; the launchers of the
compiled module (prepare, inv_norms, greedy_*) are counted by wrapping the module, since the
custom op is opaque to the mode.  Two CPU-only differences are accounted for, not hidden:

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
LAUNCHERS = ("prepare", "inv_norms", "greedy_maxsim", "greedy_maxsim_gram", "greedy_dpp", "greedy_dpp_gram")
# The budget of an eager call, validation included: the Gram product, the prepare kernel, the
# greedy kernel, the position sort.
LAUNCH_BUDGET = 4
BUDGET_METHODS = ("mmr", "fps", "dpp", "divprune", "hybrid")
# topk goes to the torch backend (a sort after torch's importance ops): its count today, pinned
# so that it can only go down.
PINNED_LAUNCHES = {"topk": 26}


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
    # validation as for accelerator input, the ops' eager route, read-backs counted (host_ops)
    with accelerator_host_path(module.calls):
        yield module


def _count(module, fn):
    fn()   # first call: one-time probes and caches stay out of the count
    module.calls.clear()
    with OpCounter() as mode:
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
    assert ops["bmm"] == 1, ops   # Gram mode at this size
    assert counted.calls["prepare"] == 1, counted.calls
    assert launches + kernels <= LAUNCH_BUDGET, (ops, counted.calls)


@pytest.mark.parametrize("method", sorted(PINNED_LAUNCHES))
def test_whole_call_pinned_methods(counted, method):
    ops, launches, kernels, syncs = _count(counted, _select(method, False))
    launches -= _cpu_gram_cast(ops)
    assert syncs == 0, ops
    assert launches + kernels <= PINNED_LAUNCHES[method], (ops, counted.calls)


@pytest.mark.parametrize("method", BUDGET_METHODS + tuple(sorted(PINNED_LAUNCHES)))
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
