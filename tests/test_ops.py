"""mmrprune.ops: every custom op is registered there, eager calls skip the dispatcher,
traced calls go through the registered op."""
from __future__ import annotations

import torch

from mmrprune import ops


def _counting_op(name):
    calls = []

    def impl(x: torch.Tensor) -> torch.Tensor:
        calls.append("impl")
        return x + 1

    def fake(x):
        return torch.empty_like(x)

    return ops.register_op(name, impl, fake, "cpu"), calls


def test_eager_call_runs_the_implementation_directly():
    op, calls = _counting_op("test_ops_eager")
    assert torch.equal(op(torch.zeros(2)), torch.ones(2))
    assert calls == ["impl"]
    # the registered op exists and gives the same answer through the dispatcher
    assert torch.equal(torch.ops.mmrprune.test_ops_eager(torch.zeros(2)), torch.ones(2))


def test_traced_call_goes_through_the_registered_op():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    op, calls = _counting_op("test_ops_traced")
    gm = make_fx(lambda x: op(x))(torch.zeros(3))
    assert "mmrprune.test_ops_traced" in gm.code           # the tracer saw the op, not its insides
    with FakeTensorMode() as mode:
        out = op(mode.from_tensor(torch.zeros(4)))
        assert out.shape == (4,)
    assert torch.equal(op(torch.zeros(3, device="meta")).new_zeros(3, device="cpu"), torch.zeros(3))
    seen = []

    def spy(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(lambda x: op(x), fullgraph=True, backend=spy)(torch.zeros(2))
    assert any("test_ops_traced" in t for t in seen), seen


def test_registering_twice_reuses_the_op():
    first, _ = _counting_op("test_ops_twice")
    second, calls = _counting_op("test_ops_twice")
    assert first.op is not None and second.op is not None        # no "already registered" error
    second(torch.zeros(1))
    assert calls == ["impl"]          # the new implementation still serves eager calls
