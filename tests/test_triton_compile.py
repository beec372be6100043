"""Every Triton kernel compiles to a cubin for sm_80 and sm_90, without a GPU, as the JIT
builds it at the target shapes, and none spills.

The interpreter accepts code the compiler rejects (``break``, data-dependent
``return``, type changes of loop-carried values...), so the interpreter tests
alone do not show the kernels build.  ``triton.compile`` runs the full pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> ptxas) for a target given by hand, with the
specialisation the runtime JIT applies to a launch: ``tt.divisibility = 16`` on
every pointer (torch allocations are 256-byte aligned) and on every integer
argument divisible by 16 at that shape (``JITFunction`` does the same from the
argument values).  ptxas's own report (``-v``, which Triton runs anyway) gives
registers and spill bytes; every kernel at every target shape must spill
nothing on sm_90.  ``python tests/test_triton_compile.py --update-committed`` writes
the per-kernel registers / spills / shared memory of the installed Triton to
``bench/results/triton_resources_triton<version>.json``.  Also here: the
``mmrprune::triton_greedy`` custom op traces with fake tensors (the path
``torch.compile`` takes), checked without launching anything.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import sys

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
SPILL_ARCH = 90                     # the target machines (H100); sm_80 is compiled, not held to zero spills
PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
INT_ARGS = ("D", "n_pad", "k_max", "R")


def _signature(kernel, dtype, constexprs, ints=INT_ARGS):
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


def _jit_attrs(kernel, sig, values):
    """The JIT's specialisation of a launch: ``tt.divisibility = 16`` on pointers and on the
    integer arguments whose value (``values``) is a multiple of 16.  An integer equal to 1 would
    become a constant; no target shape has one."""
    attrs = {}
    for idx, name in enumerate(kernel.arg_names):
        kind = sig[name]
        if kind.startswith("*") or (kind == "i32" and name in values and values[name] % 16 == 0):
            attrs[(idx,)] = [["tt.divisibility", 16]]
        assert not (kind == "i32" and values.get(name) == 1), f"{name} = 1 would be specialised as a constant"
    return attrs


_PTXAS_USED = re.compile(r"Compiling entry function '(\w+)'.*?Used (\d+) registers", re.S)
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")


def parse_ptxas(log: str) -> dict:
    """``{"registers", "spill_store_bytes", "spill_load_bytes", "stack_bytes"}`` from a ``ptxas -v`` log."""
    used, spill, stack = _PTXAS_USED.search(log), _PTXAS_SPILL.search(log), _PTXAS_STACK.search(log)
    if not (used and spill and stack):
        raise AssertionError(f"no ptxas -v report in the compile log:\n{log[-2000:]}")
    return {"registers": int(used.group(2)), "spill_store_bytes": int(spill.group(1)),
            "spill_load_bytes": int(spill.group(2)), "stack_bytes": int(stack.group(1))}


@contextlib.contextmanager
def _fresh_cache(tmp):
    """Compile into an empty cache (a cached kernel skips ptxas and so its report) with ptxas's report printed."""
    knobs = triton.knobs
    old = (knobs.cache.dir, knobs.nvidia.dump_ptxas_log)
    knobs.cache.dir, knobs.nvidia.dump_ptxas_log = str(tmp), True
    try:
        yield
    finally:
        knobs.cache.dir, knobs.nvidia.dump_ptxas_log = old


def compile_cubin(kernel, dtype, constexprs, arch, num_warps=4, ints=INT_ARGS, values=None, cache_dir=None):
    """Compile for ``arch``; with ``values`` (integer argument values of a launch) under the JIT's
    divisibility specialisation.  Returns ``(compiled, resources)``; ``resources`` (registers,
    spills, shared memory) needs ``cache_dir`` (an empty folder, so ptxas really runs)."""
    sig = _signature(kernel, dtype, constexprs, ints)
    attrs = _jit_attrs(kernel, sig, values) if values is not None else None
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    with contextlib.ExitStack() as stack:
        if cache_dir is not None:
            stack.enter_context(_fresh_cache(cache_dir))
        stack.enter_context(contextlib.redirect_stdout(log))
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    cubin = compiled.asm["cubin"]
    assert isinstance(cubin, bytes) and cubin[:4] == b"\x7fELF", "no cubin produced"
    res = None
    if cache_dir is not None:
        res = parse_ptxas(log.getvalue())
        res["shared_bytes"] = int(compiled.metadata.shared)
        res["num_warps"] = num_warps
    return compiled, res


_DOT = {"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_D": 32, "INPUT_PRECISION": "ieee", "UPCAST": False}
# the target shapes (bf16; lam 0.5; keep 25 %): integer arguments of the launches
SHAPES = {
    "a": {"D": 4096, "n_pad": 576, "k_max": 64, "R": 576},
    "b": {"D": 3584, "n_pad": 2691, "k_max": 673, "R": 2691},
    "c": {"D": 3584, "n_pad": 2691, "k_max": 673, "R": 64 * 2691},
    "d": {"D": 3584, "n_pad": 16384, "k_max": 4096, "R": 16384},
}


def _greedy(shape, dtype="bf16", use_gram=True, diversity=True, rnd=G.MAX_ROUND):
    block_n, block_d, warps = G.greedy_config(use_gram, SHAPES[shape]["n_pad"] if use_gram else 0, rnd)
    return ("greedy", dtype, {"USE_GRAM": use_gram, "DIVERSITY": diversity, "ROUND": rnd,
                              "BLOCK_N": block_n, "BLOCK_D": block_d}, warps, shape)


def _offdiag(shape, use_gram, dtype="bf16"):
    block_m, block_k = G.offdiag_blocks(use_gram)
    return ("max_offdiag_sim", dtype, {**_DOT, "USE_GRAM": use_gram, "BLOCK_M": block_m, "BLOCK_K": block_k}, 4, shape)


def _dpp(shape, use_gram, dtype="bf16"):
    block_n, block_d = G._loop_blocks(use_gram)
    return ("dpp", dtype, {"USE_GRAM": use_gram, "BLOCK_N": block_n, "BLOCK_D": block_d}, 4, shape)


# (kernel, x dtype, constexprs, num_warps, shape): the launchers' configurations at the target
# shapes, plus fp16 / fp32 builds
CASES = [
    ("row_inv_norm", "bf16", {"BLOCK_R": 16, "BLOCK_D": 128}, 4, "b"),
    ("gram", "bf16", _DOT, 4, "a"),
    ("gram", "bf16", _DOT, 4, "b"),
    ("gram", "fp32", _DOT, 4, "b"),
    _offdiag("b", True), _offdiag("d", False, dtype="fp16"),
    _greedy("a"), _greedy("b"), _greedy("c"), _greedy("d"),
    _greedy("d", use_gram=False),
    _greedy("b", dtype="fp16", rnd=1),
    _greedy("b", dtype="fp32", use_gram=False, diversity=False),
    _dpp("a", True), _dpp("b", True), _dpp("b", False, dtype="fp32"),
]
_IDS = [f"{c[0]}-{c[1]}-{c[4]}-{'gram' if c[2].get('USE_GRAM') else 'rows' if 'USE_GRAM' in c[2] else 'x'}-r{c[2].get('ROUND', 0)}-w{c[3]}"
        for c in CASES]


def check_no_spills(name, res):
    assert res["spill_store_bytes"] == 0 and res["spill_load_bytes"] == 0, (
        f"{name} spills ({res}): lower its registers (smaller tiles per thread, more warps) before it ships")


@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm{a}" for a in ARCHS])
@pytest.mark.parametrize("name,dtype,constexprs,warps,shape", CASES, ids=_IDS)
def test_kernel_compiles_without_spills(name, dtype, constexprs, warps, shape, arch, tmp_path):
    kernel = getattr(G, f"_{name}_kernel")
    _, res = compile_cubin(kernel, dtype, constexprs, arch, warps, values=SHAPES[shape],
                           cache_dir=tmp_path if arch == SPILL_ARCH else None)
    if arch == SPILL_ARCH:
        check_no_spills(f"_{name}_kernel {dtype} at ({shape}) {constexprs} num_warps={warps}", res)


def test_every_kernel_is_covered():
    kernels = {n[1:-len("_kernel")] for n in dir(G) if n.startswith("_") and n.endswith("_kernel")}
    assert kernels == {c[0] for c in CASES}
    assert {c[1] for c in CASES} == {"fp16", "bf16", "fp32"}
    # every target shape of the greedy loop, in the launcher's own configuration
    assert {c[4] for c in CASES if c[0] == "greedy" and c[2]["USE_GRAM"]} == set(SHAPES)


def test_specialisation_is_the_jits():
    """The attributes mark pointers and the multiples of 16, nothing else (n_pad = 2691 is not one)."""
    kernel = G._greedy_kernel
    sig = _signature(kernel, "bf16", CASES[7][2])
    attrs = _jit_attrs(kernel, sig, SHAPES["b"])
    marked = {kernel.arg_names[k[0]] for k in attrs}
    assert marked == {n for n in kernel.arg_names if n.endswith("_ptr")} | {"D"}


@pytest.mark.parametrize("method,gram", [("mmr", True), ("divprune", True), ("dpp", True), ("topk", False)])
def test_workspace_estimate_counts_the_gram(method, gram, monkeypatch):
    """``mmrprune.workspace`` counts the float32 Gram of every call that builds one (up to
    GRAM_MAX_BYTES, so up to 2 GiB the workspace limit must see)."""
    from mmrprune import workspace
    from mmrprune.validation import validate
    batch = validate(torch.randn(2, 40, 16), None, k=5, keep_ratio=None, lam=0.5, method=method,
                     lengths=None, order="selection", check_finite=False, method_params=None).batch
    sizes = {sim: workspace.estimate_bytes("triton", batch, sim) for sim in ("rows", "gram", "auto")}
    assert sizes["gram"] - sizes["rows"] == (2 * 40 * 40 * 4 if gram else 0)
    assert sizes["auto"] == sizes["gram"]             # 12.8 KB is far under GRAM_MAX_BYTES
    monkeypatch.setattr(G, "GRAM_MAX_BYTES", 2 * 40 * 40 * 4 - 1)
    assert workspace.estimate_bytes("triton", batch) == sizes["rows"]


@triton.jit
def _spilling_kernel(x_ptr, n, BLOCK: tl.constexpr):
    """Keeps ``BLOCK`` floats live across a loop: on one warp more than 255 registers per thread."""
    acc = tl.load(x_ptr + tl.arange(0, BLOCK))
    for i in range(0, n):
        acc = acc * 1.0001 + tl.load(x_ptr + (tl.arange(0, BLOCK) + i) % BLOCK)
    tl.store(x_ptr + tl.arange(0, BLOCK), acc)


def test_spill_check_fails_on_a_spilling_kernel(tmp_path):
    """The spill check is not vacuous: 8192 live floats on one warp (256 per thread) must be reported and rejected."""
    _, res = compile_cubin(_spilling_kernel, "fp32", {"BLOCK": 8192}, SPILL_ARCH, num_warps=1, ints=("n",),
                           values={"n": 7}, cache_dir=tmp_path)
    assert res["spill_store_bytes"] > 0
    with pytest.raises(AssertionError, match="spills"):
        check_no_spills("_spilling_kernel", res)


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

    torch._C._dispatch_find_schema_or_throw("mmrprune::triton_greedy", "")   # registered (raises if not)
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


# ----------------------------------------------------------------------------- record
def record(path: str) -> None:
    """Write registers / spills / shared memory of every case on sm_90 to ``path``: a list of flat records."""
    import platform
    from mmrprune.bench.records import git_commit, write_json
    import tempfile
    rows = []
    for (name, dtype, constexprs, warps, shape), case_id in zip(CASES, _IDS):
        with tempfile.TemporaryDirectory() as tmp:
            _, res = compile_cubin(getattr(G, f"_{name}_kernel"), dtype, constexprs, SPILL_ARCH, warps,
                                   values=SHAPES[shape], cache_dir=tmp)
        rows.append({"case": case_id, "kernel": f"_{name}_kernel", "dtype": dtype, "shape": shape,
                     "constexprs": dict(constexprs), **res, "arch": f"sm_{SPILL_ARCH}", "triton": triton.__version__,
                     "torch": torch.__version__, "python": platform.python_version(), "commit": git_commit(),
                     "command": "python tests/test_triton_compile.py --update-committed"})
        print(f"{case_id:55s} regs {res['registers']:4d}  spills {res['spill_store_bytes']}/{res['spill_load_bytes']} B"
              f"  smem {res['shared_bytes']} B", flush=True)
    write_json(path, rows)
    print(f"wrote {path}")


def main(argv=None) -> None:
    """``python tests/test_triton_compile.py [--out PATH | --update-committed]`` (from the repository
    root): the record of the installed Triton, ``bench/results/triton_resources_triton<major><minor>.json``."""
    import argparse
    from mmrprune.bench.records import add_output_arguments, output_file
    major, minor = triton.__version__.split(".")[:2]
    kind = f"triton_resources_triton{major}{minor}"
    committed = f"bench/results/{kind}.json"
    ap = argparse.ArgumentParser(description=main.__doc__)
    add_output_arguments(ap, kind, "the JSON record", committed)
    a = ap.parse_args(argv)
    record(output_file(kind, a.out, a.update_committed, committed, ap.error))


if __name__ == "__main__":
    main()
