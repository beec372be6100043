"""mmrprune.ops: each op's schema is defined once, the compiled modules register its
implementations under their dispatch keys, and every call, eager or traced, goes through the
dispatcher (no direct call of an implementation)."""
from __future__ import annotations

import importlib

import pytest
import torch

import mmrprune
from mmrprune import ops


def test_every_schema_is_defined_once_with_a_fake():
    for name, schema in ops.SCHEMAS.items():
        found = torch._C._dispatch_find_schema_or_throw(f"mmrprune::{name}", "")
        assert str(found.schema()) == str(torch._C.parse_schema(f"mmrprune::{schema}"))
    for name in ("cpu_select", "fused_greedy"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mmrprune::{name}", "Meta"), name   # the fake


@pytest.mark.skipif(ops._cpu is None, reason=f"mmrprune._cpu not built: {ops.CPU_IMPORT_ERROR}")
def test_cpu_module_registers_the_cpu_kernel():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mmrprune::cpu_select", "CPU")
    assert set(ops.METHOD_CODES) == set(mmrprune.reference.METHODS)


@pytest.mark.skipif(ops._cpu is None, reason=f"mmrprune._cpu not built: {ops.CPU_IMPORT_ERROR}")
def test_eager_select_goes_through_the_dispatcher():
    """The profiler records the ops the dispatcher runs: an eager select's op is one of them."""
    x = torch.randn(1, 16, 8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        mmrprune.select(x, k=3, backend="cpu")
    assert [e.name for e in prof.events()].count("mmrprune::cpu_select") == 1


def test_fake_gives_the_output_shape_without_running():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(rows, imp, starts):
        return torch.ops.mmrprune.cpu_select(rows, imp, None, starts, starts, starts, 4, "mmr", 0.5, 0.5, 1.0, 0.5,
                                             1, 0)

    with FakeTensorMode():
        out = f(torch.empty(12, 8), torch.empty(12), torch.zeros(3, dtype=torch.int64))
        assert out.shape == (3, 4) and out.dtype == torch.int64
    gm = make_fx(f, tracing_mode="fake")(torch.empty(12, 8), torch.empty(12), torch.zeros(3, dtype=torch.int64))
    assert "mmrprune.cpu_select" in gm.code


@pytest.mark.skipif(ops._cpu is None, reason=f"mmrprune._cpu not built: {ops.CPU_IMPORT_ERROR}")
def test_reimporting_ops_keeps_the_ops():
    """ops.py imported again (a reload, or under a second name) defines nothing twice, and the
    modules' kernels stay attached to the redefined schemas."""
    x = torch.randn(1, 16, 8)
    want = mmrprune.select(x, k=3, backend="cpu")
    importlib.reload(ops)
    assert torch.equal(mmrprune.select(x, k=3, backend="cpu"), want)
