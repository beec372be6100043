"""Every Triton kernel compiles to a cubin for sm_80 and sm_90, without a GPU.

The interpreter accepts code the compiler rejects (``break``, data-dependent
``return``, type changes of loop-carried values...), so the interpreter tests
alone do not show the kernels build.  ``triton.compile`` runs the full pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> ptxas) for a target given by hand.  Also here:
the ``mmrprune::triton_greedy`` custom op traces with fake tensors (the path
``torch.compile`` takes), checked without launching anything.
"""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":   # kernels decorated for the interpreter cannot be compiled
    pytest.skip("TRITON_INTERPRET=1: compile tests need Triton's JIT functions", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402

from mmrprune import ops  # noqa: E402
from mmrprune.triton_kernels import greedy as G  # noqa: E402

ARCHS = (80, 90)
PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def _signature(kernel, dtype, constexprs, ints=("D", "n_pad", "k_max", "R")):
    """Triton signature of ``kernel``: ``x_ptr`` in ``dtype``, int64 index vectors, float32 elsewhere."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "x_ptr":
            sig[name] = PTR[dtype]
        elif name in ("starts_ptr", "lengths_ptr", "ks_ptr", "out_ptr", "rounds_ptr"):
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name == "lam":
            sig[name] = "fp32"
        elif name in ints:
            sig[name] = "i32"
        else:
            raise AssertionError(f"{kernel.__name__}: no type for argument {name!r}")
    return sig


def compile_cubin(kernel, dtype, constexprs, arch, num_warps=4, ints=("D", "n_pad", "k_max", "R")):
    sig = _signature(kernel, dtype, constexprs, ints)
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    cubin = compiled.asm["cubin"]
    assert isinstance(cubin, bytes) and cubin[:4] == b"\x7fELF", "no cubin produced"
    return compiled


_DOT = {"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_D": 32, "INPUT_PRECISION": "ieee", "UPCAST": False}
# (kernel, x dtype, constexprs): the configurations the launchers use, across fp16 / bf16 / fp32
CASES = [
    ("row_inv_norm", "bf16", {"BLOCK_R": 16, "BLOCK_D": 128}),
    ("gram", "bf16", _DOT),
    ("gram", "fp32", _DOT),
    ("max_offdiag_sim", "fp16", _DOT),
    ("greedy", "bf16", {"USE_GRAM": False, "DIVERSITY": True, "ROUND": 8, "BLOCK_N": 64, "BLOCK_D": 128}),
    ("greedy", "fp16", {"USE_GRAM": True, "DIVERSITY": True, "ROUND": 8, "BLOCK_N": 512, "BLOCK_D": 32}),
    ("greedy", "fp32", {"USE_GRAM": False, "DIVERSITY": False, "ROUND": 8, "BLOCK_N": 512, "BLOCK_D": 32}),
    ("greedy", "bf16", {"USE_GRAM": True, "DIVERSITY": True, "ROUND": 1, "BLOCK_N": 512, "BLOCK_D": 32}),
    ("dpp", "bf16", {"USE_GRAM": True, "BLOCK_N": 512, "BLOCK_D": 32}),
    ("dpp", "fp32", {"USE_GRAM": False, "BLOCK_N": 64, "BLOCK_D": 128}),
]


@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm{a}" for a in ARCHS])
@pytest.mark.parametrize("name,dtype,constexprs", CASES, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_kernel_compiles_to_cubin(name, dtype, constexprs, arch):
    kernel = getattr(G, f"_{name}_kernel")
    compile_cubin(kernel, dtype, constexprs, arch)


def test_every_kernel_is_covered():
    kernels = {n[1:-len("_kernel")] for n in dir(G) if n.startswith("_") and n.endswith("_kernel")}
    assert kernels == {c[0] for c in CASES}
    assert {c[1] for c in CASES} == {"fp16", "bf16", "fp32"}


@triton.jit
def _rejected_kernel(x_ptr, n, BLOCK: tl.constexpr):
    """Fine under the interpreter, rejected by the compiler: ``break`` in a loop."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, n):
        if i > 3:
            break
        acc += 1.0
    tl.store(x_ptr + tl.arange(0, BLOCK), acc)


def test_harness_fails_on_a_kernel_the_compiler_rejects():
    """The harness is not vacuous: a loop with ``break`` must make it raise."""
    with pytest.raises(triton.CompilationError):
        compile_cubin(_rejected_kernel, "fp32", {"BLOCK": 16}, 90, ints=("n",))


# ----------------------------------------------------------------------------- custom op
def _op_args(device="cpu"):
    x = torch.randn(40, 16, device=device)
    row = torch.rand(40, device=device)
    state = torch.full((40,), float("-inf"), device=device)
    starts = torch.tensor([0, 20], device=device)
    lengths = torch.tensor([20, 20], device=device)
    ks = torch.tensor([5, 3], device=device)
    return x, row, state, starts, lengths, ks


def test_op_is_registered_and_traces_with_fake_tensors():
    """``mmrprune::triton_greedy`` is a torch custom op with a fake kernel: make_fx traces it
    into a graph (the path torch.compile takes) without running a kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    assert isinstance(G.triton_greedy, ops.KernelOp)
    op = torch.ops.mmrprune.triton_greedy.default

    def f(x, row, state, starts, lengths, ks):
        return op(x, row, state, starts, lengths, ks, 5, 20, 0.5, G.MODE_DIVPRUNE, -1)

    gm = make_fx(f, tracing_mode="fake")(*_op_args())
    assert "mmrprune.triton_greedy" in gm.code
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) for a in _op_args()]
        for m in (G.MODE_MMR, G.MODE_DIVPRUNE, G.MODE_DPP):
            out, rounds = op(*fake, 5, 20, 0.5, m, 0)
            assert out.shape == (2, 5) and out.dtype == torch.int64
            assert rounds.shape == (2,) and rounds.dtype == torch.int64


def test_op_captures_in_one_graph_with_dynamo():
    """``torch.compile(fullgraph=True)`` captures the op (a graph break would raise here)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return lambda *args: (torch.full((2, 5), -1, dtype=torch.int64), torch.ones(2, dtype=torch.int64))  # never launches on CPU

    def f(x, row, state, starts, lengths, ks):
        return torch.ops.mmrprune.triton_greedy(x, row, state, starts, lengths, ks, 5, 20, 0.5, G.MODE_MMR, -1)

    torch._dynamo.reset()
    torch.compile(f, fullgraph=True, backend=capture)(*_op_args())
    assert len(graphs) == 1
    assert any("triton_greedy" in str(node.target) for node in graphs[0].graph.nodes)
