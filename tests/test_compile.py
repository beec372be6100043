"""mmrprune.select inside torch.compile(fullgraph=True) on CPU tensors, and the native ops' opcheck."""
from __future__ import annotations

import pytest
import torch

import mmrprune
from mmrprune import ops
from mmrprune import reference as R

pytestmark = pytest.mark.skipif(ops._cpu is None, reason=f"mmrprune._cpu not built: {ops.CPU_IMPORT_ERROR}")


@pytest.mark.parametrize("method", R.METHODS)
def test_select_under_compile_fullgraph(method):
    torch.manual_seed(0)
    x = torch.randn(3, 48, 16, dtype=torch.float16)
    w = torch.rand(3, 48)
    lengths = torch.tensor([48, 48 if method == "d2pruner" else 30, 0])  # d2pruner: every image fills its grid
    params = {"grid": (6, 8), "alpha": 1.0} if method == "d2pruner" else {}

    def f(x, w, lengths):
        return mmrprune.select(x, w, k=9, method=method, lengths=lengths, order="selection", **params)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(x, w, lengths)
    assert got.dtype == torch.int64 and got.shape == (3, 9)
    assert torch.equal(got, f(x, w, lengths))
    assert (got[2] == -1).all()


def test_compiled_graph_calls_the_cpu_op():
    seen = []

    def spy_backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    def f(x, w):
        return mmrprune.select(x, w, keep_ratio=0.25, method="mmr")

    torch._dynamo.reset()
    x, w = torch.randn(2, 40, 8), torch.rand(2, 40)
    out = torch.compile(f, fullgraph=True, backend=spy_backend)(x, w)
    assert any("mmrprune.cpu_select" in t for t in seen), seen
    assert torch.equal(out, f(x, w))


def _sample(method, dtype):
    torch.manual_seed(1)
    rows = torch.randn(50, 12, dtype=dtype)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    imp = torch.rand(50, dtype=compute)
    q = torch.rand(50, dtype=compute) if method == "dpp" else None
    starts, lengths, ks = torch.tensor([0, 20]), torch.tensor([20, 30]), torch.tensor([5, 7])
    grid_w = 5 if method == "d2pruner" else 0
    return (rows, imp, q, starts, lengths, ks, 7, method, 0.5, 0.5, 0.5 if grid_w else 1.0, 0.5, 1, grid_w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("method", R.METHODS)
def test_opcheck(method, dtype):
    # d2pruner: grid_w=5 lays the 20- and 30-token segments out as 4x5 and 6x5 grids
    torch.library.opcheck(torch.ops.mmrprune.cpu_select.default, _sample(method, dtype))


def test_fake_impl_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        args = list(_sample("mmr", torch.float32))
        args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        out = torch.ops.mmrprune.cpu_select(*args)
    assert out.shape == (2, 7) and out.dtype == torch.int64


@pytest.mark.parametrize("sim", ["rows", "gram"])
@pytest.mark.parametrize("method", ["mmr", "dpp"])
def test_opcheck_fused_greedy(method, sim):
    """mmrprune::fused_greedy's schema, fake and C++ implementation agree (torch's opcheck), on its
    emulator build: the same op source as the CUDA one, for CPU tensors."""
    from mmrprune.backends import cuda_backend as cb
    from mmrprune.backends import cuda_emu_backend as emu
    from mmrprune.validation import validate
    ok, why = emu.status()
    if not ok:
        pytest.skip(f"backend cuda_emu unavailable: {why}")
    torch.manual_seed(2)
    batch = validate(torch.randn(2, 12, 8, dtype=torch.bfloat16), torch.rand(2, 12), k=3, keep_ratio=None, lam=0.5,
                     method=method, lengths=torch.tensor([12, 7])).batch
    call = cb.prepare(batch, sim)
    assert (call.gram is not None) == (sim == "gram")
    torch.library.opcheck(torch.ops.mmrprune.fused_greedy.default, call.args(), {"dpp_rounds": method == "dpp"})
