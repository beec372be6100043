"""The fused CUDA backend (csrc/cuda/, mmrprune/backends/cuda_backend.py).

Runs everywhere:
* the compile check (bench/cuda_compile_check.sh: compile for sm_80/sm_90, link,
  no spills), skipped when nvcc is absent, and the built module loading into this CPU torch
  with the op's CUDA implementation registered against its schema;
* the op's argument checks (csrc/cuda/op.cpp), on its emulator build (CPU tensors; the same
  source as the CUDA one): each fails before a launch;
* the torch-side preparation in segment form (hybrid pool, DivPrune first score,
  Imp / q layout, padded and packed) against the float64 reference, on CPU tensors;
* the workspace formula and its 2 GiB bound at N = 32,768;
* the custom op's fake implementation under FakeTensorMode;
* Gram mode's pure-Python side: the sim= setting, the use_gram heuristic
  and its workspace at the issue-4 sizes (N = 32,768 stays under 2 GiB), the fp32 Gram
  and the DivPrune first score from it, the padded/packed Gram layout, fake tracing with
  the Gram arguments.
The kernels themselves, once per target (``KernelTarget``): on a GPU (``cuda``, skipped
without one) and on CPU tensors through the emulator (``cuda_emu``, smaller sizes): the
reference certificate and exact reference indices, padded and varlen batches,
determinism, every output written — in row mode and in Gram mode (shared-memory and
global token state).  GPU only: CUDA-graph capture with check_finite=False.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import certify
from mmrprune import prepare as P
from mmrprune import reference as R
from mmrprune.backends import cuda_backend as cb
from mmrprune.validation import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK_SCRIPT = os.path.join(ROOT, "bench", "cuda_compile_check.sh")
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU: torch.cuda.is_available() is False")


# ----------------------------------------------------------------------------- build
@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Run the compile check once; yields (completed process, build dir)."""
    if NVCC is None:
        pytest.skip("nvcc not found: cannot compile-check the CUDA sources")
    build = tmp_path_factory.mktemp("cuda_build")
    env = dict(os.environ, NVCC=NVCC, PYTHON=sys.executable)
    proc = subprocess.run(["bash", CHECK_SCRIPT, str(build)], capture_output=True, text=True, env=env, timeout=900)
    return proc, build


def test_compile_check_builds_and_is_spill_free(compiled):
    proc, build = compiled
    assert proc.returncode == 0, f"compile check failed:\n{proc.stdout}\n{proc.stderr}"
    assert "OK: built" in proc.stdout
    # every kernel instantiation shows up for both archs, without spills
    for arch in ("sm_80", "sm_90"):
        for kernel in ("inv_norm_kernel", "greedy_maxsim_kernel", "greedy_dpp_kernel"):
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(arch) and kernel in ln]
            assert len(lines) == 6, f"{arch} {kernel}: expected 3 dtypes x 2 load widths, got {lines}"
            assert all("spill_st=0 spill_ld=0" in ln and "stack=0" in ln for ln in lines), lines


def test_compile_check_gram_kernels_are_spill_free(compiled):
    proc, _ = compiled
    assert proc.returncode == 0, f"compile check failed:\n{proc.stdout}\n{proc.stderr}"
    for arch in ("sm_80", "sm_90"):
        maxsim = [ln for ln in proc.stdout.splitlines() if ln.startswith(arch) and "greedy_maxsim_gram_kernel" in ln]
        dpp = [ln for ln in proc.stdout.splitlines() if ln.startswith(arch) and "greedy_dpp_gram_kernel" in ln]
        assert len(maxsim) == 3, f"{arch}: expected the register-slot, smem and global-state instantiations, got {maxsim}"
        assert len(dpp) == 2, f"{arch}: expected the Cholesky rows in shared and in global memory, got {dpp}"
        assert all("spill_st=0 spill_ld=0" in ln and "stack=0" in ln for ln in maxsim + dpp)


def _ptxas_report():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import ptxas_report
    finally:
        sys.path.pop(0)
    return ptxas_report


def test_committed_ptxas_record_is_current(compiled):
    """bench/results/ptxas_resources.json (registers, shared memory, occupancy per kernel) is what
    this compiler builds from these sources; regenerate with bench/ptxas_report.py
    --update-committed on the compile check's report when a kernel changes."""
    import json
    proc, build = compiled
    assert proc.returncode == 0, f"compile check failed:\n{proc.stdout}\n{proc.stderr}"
    with open(os.path.join(build, "ptxas_resources.json")) as f:
        fresh = json.load(f)
    with open(os.path.join(ROOT, "bench", "results", "ptxas_resources.json")) as f:
        committed = json.load(f)
    if {r["nvcc"] for r in committed} != {r["nvcc"] for r in fresh}:
        pytest.skip(f"record made with nvcc {committed[0]['nvcc']}, this is {fresh[0]['nvcc']}")
    key = ("arch", "kernel", "regs", "stack", "spill_st", "spill_ld", "smem_static", "occupancy")
    assert [[r[k] for k in key] for r in fresh] == [[r[k] for k in key] for r in committed]
    # per arch: 3 row kernels x 6 variants, 4 maxsim + 4 DPP Gram kernels (one / two of them cluster kernels), prepare
    assert len(fresh) == 2 * (6 * 3 + 4 + 4 + 1)


def test_ptxas_check_fails_on_a_spilling_kernel(tmp_path):
    """The resource check can fail: greedy.cu with the Gram maxsim kernel's launch bounds asking for
    two 1024-thread blocks per SM (32 registers) spills on sm_90, and the check names it."""
    if NVCC is None:
        pytest.skip("nvcc not found")
    with open(os.path.join(ROOT, "csrc", "cuda", "greedy.cu")) as f:
        src = f.read()
    anchor = "__launch_bounds__(kGreedyThreads) greedy_maxsim_gram_kernel("
    assert src.count(anchor) == 1, "greedy.cu changed: update this mutant"
    mutant = tmp_path / "greedy.cu"
    mutant.write_text(src.replace(anchor, "__launch_bounds__(kGreedyThreads, 2) greedy_maxsim_gram_kernel("))
    proc = subprocess.run([NVCC, "-c", str(mutant), "-o", str(tmp_path / "g.o"), "-O3", "-std=c++17",
                           f"-I{os.path.join(ROOT, 'csrc', 'cuda')}", "-gencode", "arch=compute_90,code=sm_90",
                           "-Xptxas", "-v"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = tmp_path / "report.txt"
    report.write_text(proc.stderr)
    check = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "ptxas_report.py"), str(report)],
                           capture_output=True, text=True)
    assert check.returncode == 1, check.stdout
    assert "FAIL" in check.stdout and "sm_90 greedy_maxsim_gram_kernel<smem=" in check.stdout.split("FAIL")[-1]
    assert _ptxas_report().bad(_ptxas_report().parse(proc.stderr))


def test_occupancy_arithmetic():
    occ = _ptxas_report().occupancy
    # 64 registers x 1024 threads = the whole register file: one block, half the warps
    assert occ("sm_90", 64, 1024, 2096) == {"blocks_per_sm": 1, "occupancy": 0.5, "limiter": "registers"}
    # 40 registers round to 1280 per warp: 51 warps -> 3 blocks of 16 warps
    assert occ("sm_90", 40, 512, 272)["blocks_per_sm"] == 3
    # 120 KiB of shared memory per block: one block fits in 164 KiB (sm_80), the limiter is smem
    assert occ("sm_80", 32, 256, 120 * 1024) == {"blocks_per_sm": 1, "occupancy": 0.125, "limiter": "smem"}


def test_compiled_module_loads_into_cpu_torch_and_registers_the_ops(compiled):
    """The module the compile check linked (op source against torch's CPU headers and libraries,
    kernels with the static CUDA runtime) imports into this CPU torch and registers
    mmrprune::fused_greedy and _fused_prepare for CUDA tensors; the dispatcher compares the C++
    signatures with the schemas of mmrprune/ops.py at that point.  Run in a fresh interpreter:
    this one has the package's own mmrprune._cuda registered already."""
    proc, build = compiled
    assert proc.returncode == 0, f"compile check failed:\n{proc.stdout}\n{proc.stderr}"
    so = [f for f in os.listdir(build) if f.startswith("_cuda") and f.endswith(".so")]
    assert so, f"no _cuda*.so in {build}: {os.listdir(build)}"
    code = f"""
import importlib.util, torch
import mmrprune.ops   # the schemas
spec = importlib.util.spec_from_file_location("_cuda", {os.path.join(build, so[0])!r})
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
for op in ("fused_greedy", "_fused_prepare"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mmrprune::" + op, "CUDA"), op
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("mmrprune::" + op, "CPU"), op
assert mod.MAX_ROUND == 8 and mod.smem_bytes(4096) == 4096 * 4 and mod.gram_state_smem_bytes(2691) == 5 * 2691
assert len({{mod.DTYPE_FLOAT32, mod.DTYPE_FLOAT16, mod.DTYPE_BFLOAT16}}) == 3
assert not hasattr(mod, "launches")   # the emulator's counter only
print("loaded")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0 and "loaded" in run.stdout, run.stdout + run.stderr


# ----------------------------------------------------------------------------- op argument checks
# The op's checks are one C++ source for both builds; they run here on the emulator build (CPU
# tensors), and every one fails before a kernel is launched.
def _op_args(**over):
    rows = torch.zeros(10, 8, dtype=torch.bfloat16)
    seg = torch.tensor([0, 5])
    a = dict(rows=rows, score=torch.zeros(10), first_score=None, eligible=None, starts=seg,
             lengths=torch.tensor([5, 5]), ks=torch.tensor([2, 2]), k_max=3, lam=0.5, dpp=False)
    a.update(over)
    return a


def _emu_op():
    from mmrprune.backends import cuda_emu_backend as emu
    ok, why = emu.status()
    if not ok:
        pytest.skip(f"the op's CPU implementation is the emulator build: {why}")
    return torch.ops.mmrprune.fused_greedy


@pytest.mark.parametrize("over, error, needle", [
    (dict(rows=torch.zeros(10, 8, dtype=torch.float64)), TypeError, "rows must be float16, bfloat16 or float32"),
    (dict(rows=torch.zeros(10, dtype=torch.bfloat16)), ValueError, "rows must be 2-D [rows, dim]"),
    (dict(rows=torch.zeros(8, 10, dtype=torch.bfloat16).t()), ValueError, "rows must be contiguous"),
    (dict(starts=torch.tensor([0, 5], dtype=torch.int32)), TypeError, "starts must be Long, got Int"),
    (dict(lengths=torch.tensor([5, 5, 0])), ValueError, "lengths must have shape [2]"),
    (dict(ks=torch.tensor([2, 2])[::1].repeat(2)[::2]), ValueError, "ks must be contiguous"),
    (dict(k_max=-1), ValueError, "k_max must be >= 0, got -1"),
    (dict(lam=1.5), ValueError, "lam must be in [0, 1], got 1.5"),
    (dict(lam=float("nan")), ValueError, "lam must be in [0, 1]"),
    (dict(score=None), ValueError, "score_kind 'keep' needs a score"),
    (dict(score=torch.zeros(9)), ValueError, "score must have shape [10]"),
    (dict(score=torch.zeros(10, dtype=torch.float64)), TypeError, "score must be Float"),
    (dict(first_score=torch.zeros(3)), ValueError, "first_score must have shape [10]"),
    (dict(eligible=torch.zeros(10)), TypeError, "eligible must be Byte"),
    (dict(score_kind="nope"), ValueError, "score_kind must be one of 'keep', 'imp', 'quality', 'zero'"),
    (dict(width=4), ValueError, "padded rows must be [B * width = 8], got 10"),
    (dict(width=-1), ValueError, "width must be >= 0"),
    (dict(gram=torch.zeros(2, 5, 4)), ValueError, "gram must be [B=2, n_max, n_max]"),
    (dict(gram=torch.zeros(2, 5, 5, dtype=torch.float16)), TypeError, "gram must be Float"),
    (dict(gram=torch.zeros(2, 4, 4), width=5), ValueError, "padded rows of width 5 need a Gram of that width"),
    (dict(inv_norm=torch.zeros(10)), ValueError, "inv_norm is read in Gram mode only"),
    (dict(gram=torch.zeros(2, 5, 5), inv_norm=torch.zeros(10), dpp=True), ValueError, "needs sqn"),
    (dict(max_round=9), ValueError, "max_round must be 0 (the kernels' own, 8) or in [1, 8], got 9"),
    (dict(max_round=-1), ValueError, "max_round must be 0"),
    (dict(smem_state=2), ValueError, "smem_state must be -1 (auto), 0 (global scratch) or 1"),
    (dict(cluster=17), ValueError, "cluster must be 0 (the launcher's choice), 1 (one block per image) or the CTAs "
                                   "per image, at most 16, got 17"),
    (dict(cluster=-1), ValueError, "cluster must be 0"),
])
def test_op_rejects_bad_arguments(over, error, needle):
    op = _emu_op()
    from mmrprune.backends import cuda_emu_backend as emu
    before = emu.KERNELS.ext.launches()
    with pytest.raises(error, match="mmrprune::fused_greedy") as info:
        op(**_op_args(**over))
    assert needle in str(info.value)
    assert emu.KERNELS.ext.launches() == before    # rejected before any launch


def test_op_accepts_the_base_arguments():
    """The arguments the rejection cases start from are valid (so each case fails on its change)."""
    out, rounds = _emu_op()(**_op_args())
    assert out.shape == (2, 3) and (out[:, :2] >= 0).all() and (out[:, 2] == -1).all()
    assert rounds.shape == (2,)


def test_prepare_op_rejects_bad_arguments():
    _emu_op()
    rows, seg = torch.zeros(10, 8), torch.tensor([0, 5])
    with pytest.raises(ValueError, match="score_kind must be one of"):
        torch.ops.mmrprune._fused_prepare(rows, seg, seg, None, None, "nope", 0, False)
    with pytest.raises(TypeError, match="weights must be Float"):
        torch.ops.mmrprune._fused_prepare(rows, seg, seg, None, torch.zeros(10, dtype=torch.float64), "imp", 0, False)


# ----------------------------------------------------------------------------- backend contract
def test_backend_contract():
    b = cb.BACKEND
    assert b.name == "cuda" and b.device_types == ("cuda",)
    assert set(b.methods) <= set(R.METHODS)
    assert {"mmr", "fps", "hybrid", "divprune", "dpp", "topk"} == set(b.methods)
    ok, reason = b.status()
    if cb._ext is None:
        assert not ok and "MMRPRUNE_CUDA=1" in reason
    elif not HAS_GPU:
        assert not ok and "torch.cuda is not available" in reason
    else:
        assert ok


def test_float64_has_no_kernel_dtype():
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        cb.prepare(validate(torch.randn(4, 3, dtype=torch.float64), None, k=2, keep_ratio=None, lam=0.5,
                            method="mmr").batch)


def test_workspace_bounds():
    n, d = 32768, 4096
    for method in ("mmr", "fps", "hybrid", "divprune"):
        assert cb.workspace_bytes(method, 1, n, d, n // 4, n) <= cb.WORKSPACE_LIMIT_BYTES, method
    assert cb.workspace_bytes("dpp", 1, n, d, n // 4, n) <= cb.WORKSPACE_LIMIT_BYTES
    # the DPP Cholesky rows grow with k: 4 bytes per row and step, plus one output column
    grow = cb.workspace_bytes("dpp", 3, 3 * n, d, 101, n) - cb.workspace_bytes("dpp", 3, 3 * n, d, 100, n)
    assert grow == 4 * 3 * n + 8 * 3
    # the greedy state itself is O(rows): 13 bytes per row for mmr
    assert cb.workspace_bytes("mmr", 1, n, d, 1, n) == 13 * n + 8
    # issue 4 (d): B=1, N=16384, D=3584
    assert cb.workspace_bytes("divprune", 1, 16384, 3584, 4096, 16384) <= cb.WORKSPACE_LIMIT_BYTES


# ----------------------------------------------------------------------------- Gram mode: heuristic, workspace
def test_sim_is_checked_where_it_is_read():
    with pytest.raises(ValueError, match=r"sim: expected one of \['auto', 'gram', 'rows'\], got '1'"):
        cb.use_gram("mmr", 1, 576, 64, 64, 576, torch.bfloat16, sim="1")


ISSUE4 = {  # name: (batch, n, dim, k)
    "a": (1, 576, 4096, 64),
    "b": (1, 2691, 3584, 673),
    "c": (64, 2691, 3584, 673),
    "d": (1, 16384, 3584, 4096),
}


@pytest.mark.parametrize("method", ["mmr", "fps", "hybrid", "divprune"])
@pytest.mark.parametrize("target", sorted(ISSUE4))
def test_use_gram_picks_gram_for_issue4_targets(method, target):
    b, n, d, k = ISSUE4[target]
    for dtype in (torch.bfloat16, torch.float16):
        assert cb.use_gram(method, b, b * n, d, k, n, dtype, sim="auto"), (method, target)
        ws = cb.workspace_bytes(method, b, b * n, d, k, n, gram=True)
        assert ws <= cb.WORKSPACE_LIMIT_BYTES
        assert ws >= cb.gram_bytes(b, n)


def test_use_gram_dpp_only_when_cholesky_rows_fit():
    b, n, d, k = ISSUE4["b"]
    assert cb.use_gram("dpp", b, b * n, d, k, n, torch.bfloat16, sim="auto")
    b, n, d, k = ISSUE4["c"]   # Gram 1.85 GB + Cholesky rows 0.46 GB > 2 GiB: row mode
    assert not cb.use_gram("dpp", b, b * n, d, k, n, torch.bfloat16, sim="auto")


@pytest.mark.parametrize("method", ["mmr", "fps", "hybrid", "divprune", "dpp"])
@pytest.mark.parametrize("packed", [False, True])
def test_n32768_stays_in_row_mode_under_2gib(method, packed):
    n, d, k = 32768, 4096, 32768 // 4
    assert cb.gram_bytes(1, n) == 4 << 30
    assert not cb.use_gram(method, 1, n, d, k, n, torch.bfloat16, packed=packed, sim="auto")
    assert cb.workspace_bytes(method, 1, n, d, k, n, gram=False) <= cb.WORKSPACE_LIMIT_BYTES


def test_use_gram_override_and_precision_rule(monkeypatch):
    b, n, d, k = 1, 32768, 4096, 64
    assert cb.use_gram("mmr", b, n, d, k, n, torch.bfloat16, sim="gram")      # forced past the cap
    assert not cb.use_gram("mmr", 1, 576, d, k, 576, torch.bfloat16, sim="rows")
    assert not cb.use_gram("topk", 1, 576, d, k, 576, torch.bfloat16, sim="gram")
    assert cb.use_gram("mmr", 1, 576, d, k, 576, torch.float32, sim="auto")
    monkeypatch.setattr(cb, "tf32_matmul_enabled", lambda: True)
    assert not cb.use_gram("mmr", 1, 576, d, k, 576, torch.float32, sim="gram")   # TF32: never for fp32
    assert cb.use_gram("mmr", 1, 576, d, k, 576, torch.bfloat16, sim="auto")
    assert not cb.use_gram("mmr", 1, 576, d, k, 576, torch.bfloat16, sim="rows")


def test_use_gram_cap_is_a_workspace_bound():
    b, n, d, k = 8, 1000, 256, 10
    ws = cb.workspace_bytes("mmr", b, b * n, d, k, n, gram=True)
    assert cb.use_gram("mmr", b, b * n, d, k, n, torch.bfloat16, sim="auto", cap=ws)
    assert not cb.use_gram("mmr", b, b * n, d, k, n, torch.bfloat16, sim="auto", cap=ws - 1)
    # packed input counts its padded copy
    wp = cb.workspace_bytes("mmr", b, b * n, d, k, n, gram=True, packed_elem_bytes=2)
    assert wp == ws + b * n * d * 2
    assert not cb.use_gram("mmr", b, b * n, d, k, n, torch.bfloat16, packed=True, sim="auto", cap=ws)


def test_gram_matrix_fp32_accumulation():
    x = torch.randn(2, 7, 33, dtype=torch.float64)
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        xd = x.to(dt)
        g = cb.gram_matrix(xd)
        assert g.dtype == torch.float32 and g.shape == (2, 7, 7)
        want = xd.double() @ xd.double().transpose(1, 2)
        torch.testing.assert_close(g.double(), want, rtol=1e-5, atol=1e-5)


def test_gram_matrix_meta():
    a = torch.empty(3, 5, 16, dtype=torch.bfloat16, device="meta")
    assert cb.gram_matrix(a).dtype == torch.float32 and cb.gram_matrix(a).shape == (3, 5, 5)


# ----------------------------------------------------------------------------- torch-side preparation (CPU)
def _padded_request(method, lam=0.5, k=5, seed=0, b=3, n=17, d=24, lengths=(17, 9, 1)):
    x = torch.from_numpy(certify.clustered_tokens(n, d, batch=b, seed=seed)).to(torch.float32)
    w = torch.from_numpy(certify.distinct_importance(n, batch=b, seed=seed))
    return validate(x, w, k=k, keep_ratio=None, lam=lam, method=method,
                    lengths=torch.tensor(lengths), method_params={}).batch


def _packed_request(method, lam=0.5, k=5, seed=1, lens=(11, 0, 7, 1), d=20):
    t = sum(lens)
    x = torch.from_numpy(certify.gaussian_tokens(t, d, seed=seed)).to(torch.float32)
    w = torch.from_numpy(certify.distinct_importance(t, seed=seed))
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int64)
    return validate(x, w, k=k, keep_ratio=None, lam=lam, method=method, cu_seqlens=cu, method_params={}).batch


def _images(batch):
    """(rows slice start, length, features [n, D] float64, raw weights [n]) per image."""
    rows = batch.rows().to(torch.float64).numpy()
    w = batch.weights.reshape(-1).to(torch.float64).numpy()
    for s, n in zip(batch.starts.tolist(), batch.lengths.tolist()):
        yield s, n, rows[s:s + n], w[s:s + n]


@pytest.mark.parametrize("make", [_padded_request, _packed_request])
@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 1.0])
def test_hybrid_pool_rows_match_reference(make, lam):
    batch = make("hybrid", lam=lam)
    pool = P.hybrid_pool_rows(batch).numpy()
    covered = np.zeros(pool.shape[0], dtype=bool)
    for (s, n, _, w), k in zip(_images(batch), batch.ks.tolist()):
        covered[s:s + n] = True
        want = np.zeros(n, dtype=bool)
        if n:
            c = R.hybrid_pool_size(n, k, lam)
            want[np.argsort(-R.normalized_importance(w, n), kind="stable")[:c]] = True
        np.testing.assert_array_equal(pool[s:s + n], want)
    assert not pool[~covered].any(), "padding rows must never be in the pool"


def test_hybrid_pool_ties_go_to_lowest_index():
    x = torch.randn(2, 8, 4)
    w = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0, 2.0, 1.0, 0.5]] * 2)
    batch = validate(x, w, k=2, keep_ratio=None, lam=0.5, method="hybrid", method_params={}).batch
    pool = P.hybrid_pool_rows(batch).reshape(2, 8)           # c = max(2, round(2 / 0.5)) = 4
    expect = torch.tensor([False, True, True, True, False, True, False, False])
    assert torch.equal(pool[0], expect) and torch.equal(pool[1], expect)


@pytest.mark.parametrize("make", [_padded_request, _packed_request])
def test_divprune_first_rows_match_reference(make):
    batch = make("divprune")
    first = cb.divprune_first_rows(batch).numpy()
    for s, n, x, _ in _images(batch):
        if n == 0:
            continue
        if n == 1:
            assert first[s] == np.inf
            continue
        xh = R.normalize_rows(x)
        g = xh @ xh.T
        np.fill_diagonal(g, -np.inf)
        np.testing.assert_allclose(first[s:s + n], 1.0 - g.max(axis=1), atol=2e-6)


def _completed(call):
    """``call`` with the prepare kernel's outputs (score, Gram-mode norms), run on the emulator."""
    from mmrprune.backends import cuda_emu_backend as emu
    if emu.KERNELS.ext is None:
        pytest.skip(f"the prepare kernel runs on the emulator here: {emu.KERNELS.status()[1]}")
    return emu.KERNELS.complete(call)


@pytest.mark.parametrize("make", [_padded_request, _packed_request])
@pytest.mark.parametrize("method", ["mmr", "fps", "hybrid", "divprune", "dpp"])
def test_prepare_segment_form(make, method):
    batch = make(method, lam=0.4)
    a = _completed(cb.prepare(batch))
    rows = batch.rows()
    assert a.rows.shape == rows.shape and a.rows.is_contiguous()
    assert a.score.dtype == torch.float32 and a.score.shape == (rows.shape[0],)
    assert a.k_max == batch.k_max and a.dpp == (method == "dpp")
    assert a.lam == {"mmr": 0.4}.get(method, 0.0)
    assert (a.eligible is not None) == (method == "hybrid")
    assert (a.first_score is not None) == (method == "divprune")
    for s, n, _, w in _images(batch):
        if n == 0:
            continue
        if method == "dpp":
            want = R.dpp_quality(w, n)
        elif method == "divprune":
            want = np.zeros(n)
        else:
            want = R.normalized_importance(w, n)
        np.testing.assert_allclose(a.score[s:s + n].numpy(), want, atol=1e-6)


@pytest.mark.parametrize("make", [_padded_request, _packed_request])
@pytest.mark.parametrize("method", ["mmr", "hybrid", "divprune", "dpp"])
def test_prepare_gram_mode_layout(make, method):
    batch = make(method)
    row = _completed(cb.prepare(batch, sim="rows"))
    gm = _completed(cb.prepare(batch, sim="gram"))
    assert row.gram is None and row.inv_norm is None and row.sqn is None
    g, inv = gm.gram, gm.inv_norm
    n_max = max(batch.lengths.tolist()) if batch.packed else batch.features.shape[1]
    assert g.dtype == torch.float32 and g.shape == (batch.batch_size, n_max, n_max) and g.is_contiguous()
    assert inv.shape == (batch.rows().shape[0],) and (gm.sqn is not None) == (method == "dpp")
    for b, (s, n, x, _) in enumerate(_images(batch)):
        if n == 0:
            continue
        np.testing.assert_allclose(g[b, :n, :n].double().numpy(), x @ x.T, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(inv[s:s + n].double().numpy(), 1 / np.linalg.norm(x, axis=1), rtol=1e-6)
    for key in ("score", "eligible"):
        if getattr(row, key) is not None:
            assert torch.equal(getattr(row, key), getattr(gm, key))
    if method == "divprune":   # the first score from the Gram equals the row-mode one
        a, b_ = row.first_score.numpy(), gm.first_score.numpy()
        fin = np.isfinite(a)
        assert np.array_equal(fin, np.isfinite(b_))
        np.testing.assert_allclose(b_[fin], a[fin], atol=2e-6)


def test_divprune_first_from_gram_masks_padding_and_diagonal():
    """The prepare kernel's Gram-mode first score: padding is never a neighbour, a lone token
    scores +inf."""
    x = torch.randn(3, 5, 8)
    x[1, 2:] = 100.0                                   # padding is never a neighbour
    batch = validate(x, None, k=1, keep_ratio=None, lam=0.5, method="divprune", method_params={},
                     lengths=[5, 2, 1]).batch
    call = _completed(cb.prepare(batch, sim="gram"))
    first = call.first_score.view(3, 5)
    for b, n in ((0, 5), (1, 2)):
        xh = R.normalize_rows(x[b, :n].double().numpy())
        g = xh @ xh.T
        np.fill_diagonal(g, -np.inf)
        np.testing.assert_allclose(first[b, :n].numpy(), 1 - g.max(axis=1), atol=2e-6)
    assert first[2, 0].item() == float("inf")


def test_prepare_rejects_non_kernel_method():
    with pytest.raises(ValueError, match="no kernel"):
        cb.prepare(validate(torch.randn(2, 8, 4), torch.rand(2, 8), k=2, keep_ratio=None, lam=0.5, method="d2pruner",
                            lengths=None, method_params={"alpha": 1.0}).batch)


# ----------------------------------------------------------------------------- custom op (fake path, CPU)
def test_custom_op_fake_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode
    assert hasattr(torch.ops.mmrprune, "fused_greedy")
    with FakeTensorMode():
        rows = torch.empty(12, 8, dtype=torch.bfloat16)
        score = torch.empty(12)
        seg = torch.zeros(3, dtype=torch.int64)
        out, rounds = torch.ops.mmrprune.fused_greedy(rows, score, None, None, seg, seg, seg, 5, 0.5, False)
        assert out.shape == (3, 5) and out.dtype == torch.int64
        assert rounds.shape == (3,) and rounds.dtype == torch.int64
        out, rounds = torch.ops.mmrprune.fused_greedy(rows, score, score, None, seg[:2], seg[:2], seg[:2], 7, 0.0,
                                                     True)
        assert out.shape == (2, 7) and rounds.shape == (2,)


def test_custom_op_traces_into_fx_graph():
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(rows, score, starts, lengths, ks):
        return torch.ops.mmrprune.fused_greedy(rows, score, None, None, starts, lengths, ks, 4, 0.5, False)

    args = (torch.empty(10, 8, device="meta"), torch.empty(10, device="meta"),
            torch.zeros(2, dtype=torch.int64, device="meta"), torch.zeros(2, dtype=torch.int64, device="meta"),
            torch.zeros(2, dtype=torch.int64, device="meta"))
    gm = make_fx(f, tracing_mode="fake")(*args)
    assert "mmrprune.fused_greedy" in str(gm.graph)


def test_custom_op_fake_with_gram_arguments():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    with FakeTensorMode():
        rows = torch.empty(12, 8, dtype=torch.bfloat16)
        score, seg = torch.empty(12), torch.zeros(3, dtype=torch.int64)
        gram = torch.empty(3, 4, 4)
        out, _ = torch.ops.mmrprune.fused_greedy(rows, score, None, None, seg, seg, seg, 5, 0.5, False,
                                                gram, score, None)
        assert out.shape == (3, 5) and out.dtype == torch.int64

    def f(x, score, starts, lengths, ks):          # Gram computed by torch ops, then the op: one graph
        nrm = torch.linalg.vector_norm(x.reshape(-1, x.shape[-1]), dim=-1, dtype=torch.float32)
        inv = 1.0 / nrm.clamp_min(R.NORM_EPS)
        sqn = (nrm * inv) ** 2
        g = cb.gram_matrix(x)
        return torch.ops.mmrprune.fused_greedy(x.reshape(-1, x.shape[-1]), score, None, None, starts, lengths, ks,
                                              4, 0.0, True, g, inv, sqn)

    args = (torch.empty(2, 5, 8, dtype=torch.bfloat16, device="meta"), torch.empty(10, device="meta"),
            torch.zeros(2, dtype=torch.int64, device="meta"), torch.zeros(2, dtype=torch.int64, device="meta"),
            torch.zeros(2, dtype=torch.int64, device="meta"))
    gm = make_fx(f, tracing_mode="fake")(*args)
    text = str(gm.graph)
    assert "mmrprune.fused_greedy" in text and "bmm" in text


def test_kernel_call_fields_are_the_op_arguments_in_schema_order():
    """KernelCall.args() passes its fields positionally: they must be the schema's leading
    arguments, in order."""
    import dataclasses
    schema = torch.ops.mmrprune.fused_greedy.default._schema
    fields = [f.name for f in dataclasses.fields(cb.KernelCall)]
    assert [a.name for a in schema.arguments][:len(fields)] == fields


def test_op_is_implemented_per_device_by_the_built_modules():
    """One op, two implementations: CUDA tensors run mmrprune._cuda, CPU tensors the emulator
    build mmrprune._cuda_emu; a module that is not built leaves its key without a kernel."""
    from mmrprune.backends import cuda_emu_backend as emu
    for ext, key in ((cb.KERNELS.ext, "CUDA"), (emu.KERNELS.ext, "CPU")):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("mmrprune::fused_greedy", key) == (ext is not None), key


# ----------------------------------------------------------------------------- kernels: GPU or emulator
class KernelTarget:
    """Where the kernel tests run: ``cuda`` (the real kernels on a GPU) or ``cuda_emu`` (the same
    csrc/cuda sources executed on CPU tensors by csrc/emu).  ``size(gpu, emu)`` picks the
    problem size: the emulator runs every GPU thread as a fiber, so it gets smaller problems
    that keep the property each test is about (e.g. more tokens than threads)."""

    def __init__(self, backend, device):
        self.backend, self.device = backend, device

    def __repr__(self):
        return self.backend

    def size(self, gpu, emu):
        return gpu if self.backend == "cuda" else emu

    def greedy_rounds(self, *args):
        """The kernel op: ``(picks [B, k_max], rounds [B])`` (the tensors' device picks the build)."""
        return torch.ops.mmrprune.fused_greedy(*args, smem_state=cb._GRAM_SMEM_STATE, cluster=cb._CLUSTER)

    def greedy(self, *args):
        return self.greedy_rounds(*args)[0]


@pytest.fixture(params=["cuda", "cuda_emu"])
def target(request):
    if request.param == "cuda" and not HAS_GPU:
        pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False (cuda_emu runs these kernels on CPU)")
    if request.param == "cuda_emu":
        from mmrprune.backends import cuda_emu_backend as emu
        ok, why = emu.status()
        if not ok:
            pytest.skip(f"backend cuda_emu unavailable: {why}")
    return KernelTarget(request.param, "cuda" if request.param == "cuda" else "cpu")


def _cuda_select(target, x, w, method, **kw):
    import mmrprune
    return mmrprune.select(x, w, method=method, backend=target.backend, order="selection", **kw)


GPU_METHODS = ["mmr", "fps", "hybrid", "divprune", "dpp", "topk"]


@pytest.mark.parametrize("method", GPU_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 70])       # 70: not a multiple of 8, scalar-load path
def test_kernel_certificate_padded(target, method, dtype, dim):
    b, n, k = 3, 300, 40
    xs = certify.clustered_tokens(n, dim, batch=b, seed=5)
    ws = certify.distinct_importance(n, batch=b, seed=5)
    x = torch.from_numpy(xs).to(dtype).to(target.device)
    w = torch.from_numpy(ws).to(torch.float32).to(target.device)
    lengths = torch.tensor([n, 123, 1], device=target.device)
    out = _cuda_select(target, x, w, method, k=k, lengths=lengths, lam=0.6).cpu()
    for i, ln in enumerate(lengths.tolist()):
        certify.check_certificate(x[i, :ln], w[i, :ln], out[i], method=method, lam=0.6, tol=certify.tol_for(dtype),
                                  k=min(k, ln))


@pytest.mark.parametrize("method", GPU_METHODS)
def test_kernel_exact_indices_when_margins_are_clear(target, method):
    n, d, k = 200, 48, 30
    compared = 0
    for seed in range(6):
        x = certify.gaussian_tokens(n, d, seed=seed)
        w = certify.distinct_importance(n, seed=seed)
        if certify.reference_margin(x, w, k, method, lam=0.5) <= 1e-4:
            continue
        got = _cuda_select(target, torch.from_numpy(x).float().to(target.device),
                           torch.from_numpy(w).float().to(target.device), method, k=k, lam=0.5).cpu().numpy()
        np.testing.assert_array_equal(got, R.select_one(x, w, k, method, 0.5))
        compared += 1
    assert compared >= 1, f"{method}: every seed had a margin <= 1e-4, so nothing was compared"


@pytest.mark.parametrize("method", ["mmr", "hybrid", "divprune", "dpp"])
def test_kernel_varlen_matches_padded(target, sim_mode, method):
    import mmrprune
    lens = [50, 0, 17, 1, 64]
    d = 40
    xs = [torch.from_numpy(certify.gaussian_tokens(max(n, 1), d, seed=i))[:n].float() for i, n in enumerate(lens)]
    ws = [torch.from_numpy(certify.distinct_importance(max(n, 1), seed=i))[:n].float() for i, n in enumerate(lens)]
    packed, wp = torch.cat(xs).to(target.device), torch.cat(ws).to(target.device)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), device=target.device)
    flat, cu_k = mmrprune.select_varlen(packed, wp, cu, k=10, method=method, backend=target.backend,
                                        order="selection", sim=sim_mode)
    n_max = max(lens)
    xp = torch.zeros(len(lens), n_max, d)
    wpad = torch.zeros(len(lens), n_max)
    for i, n in enumerate(lens):
        xp[i, :n], wpad[i, :n] = xs[i], ws[i]
    padded = mmrprune.select(xp.to(target.device), wpad.to(target.device), k=10, method=method,
                             lengths=torch.tensor(lens, device=target.device), backend=target.backend,
                             order="selection", sim=sim_mode).cpu()
    for i, n in enumerate(lens):
        got = flat[cu_k[i]:cu_k[i + 1]].cpu() - int(cu[i])
        assert torch.equal(got, padded[i, :min(10, n)]), (method, i)
        assert (padded[i, min(10, n):] == -1).all()
        if n:
            certify.check_certificate(xs[i], ws[i], got, method=method, lam=0.5, tol=1e-4, k=min(10, n))


def test_kernel_deterministic_and_writes_every_output(target):
    n, d = target.size(1000, 400), target.size(256, 64)
    torch.manual_seed(0)
    x = torch.randn(4, n, d, device=target.device, dtype=torch.bfloat16)
    w = torch.rand(4, n, device=target.device)
    lengths = torch.tensor([n, 10, 0, n - 1], device=target.device)
    batch = validate(x, w, k=64, keep_ratio=None, lam=0.5, method="mmr", lengths=lengths, method_params={}).batch
    a = cb.prepare(batch)
    outs = [target.greedy(*a.args()) for _ in range(3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    o = outs[0].cpu()
    assert (o[1, 10:] == -1).all() and (o[2] == -1).all() and (o[1, :10] >= 0).all() and (o[0] >= 0).all()


@pytest.fixture(params=["rows", "gram"], ids=["row", "gram"])
def sim_mode(request):
    """Runs a GPU test once in row mode and once in Gram mode (select's sim=)."""
    return request.param


@pytest.mark.parametrize("method", ["mmr", "fps", "hybrid", "divprune", "dpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_modes_certificate(target, sim_mode, method, dtype):
    # n > 512 threads per block: several tokens per thread in dpp
    b, n, k, d = 3, target.size(700, 600), target.size(90, 30), 96
    xs = certify.clustered_tokens(n, d, batch=b, seed=11)
    ws = certify.distinct_importance(n, batch=b, seed=11)
    x = torch.from_numpy(xs).to(dtype).to(target.device)
    w = torch.from_numpy(ws).to(torch.float32).to(target.device)
    lengths = torch.tensor([n, 333, 2], device=target.device)
    out = _cuda_select(target, x, w, method, k=k, lengths=lengths, lam=0.4, sim=sim_mode).cpu()
    for i, ln in enumerate(lengths.tolist()):
        certify.check_certificate(x[i, :ln], w[i, :ln], out[i], method=method, lam=0.4, tol=certify.tol_for(dtype),
                                  k=min(k, ln))


@pytest.mark.parametrize("method", ["mmr", "fps", "hybrid", "divprune", "dpp"])
def test_kernel_gram_and_row_modes_match_reference_on_clear_margins(target, monkeypatch, method):
    n, d, k = target.size(1500, 1100), 64, target.size(40, 20)   # n > 1024: tokens per thread > 1 in Gram mode
    checked = 0
    for seed in range(4):
        x = certify.gaussian_tokens(n, d, seed=seed)
        w = certify.distinct_importance(n, seed=seed)
        if certify.reference_margin(x, w, k, method, lam=0.5) <= 1e-4:
            continue
        want = R.select_one(x, w, k, method, 0.5)
        for mode in ("rows", "gram"):
            got = _cuda_select(target, torch.from_numpy(x).float().to(target.device),
                               torch.from_numpy(w).float().to(target.device), method, k=k, lam=0.5,
                               sim=mode).cpu().numpy()
            np.testing.assert_array_equal(got, want, err_msg=f"mode {mode}")
        checked += 1
    assert checked, "no seed with a clear reference margin"


@pytest.mark.parametrize("method", ["mmr", "divprune", "hybrid"])
def test_kernel_gram_state_in_global_memory_matches_shared(target, monkeypatch, method):
    n, k = target.size(1300, 1100), target.size(100, 40)
    torch.manual_seed(0)
    x = torch.randn(3, n, 128, device=target.device, dtype=torch.bfloat16)
    w = torch.rand(3, n, device=target.device)
    lengths = torch.tensor([n, 700, 1], device=target.device)
    smem = _cuda_select(target, x, w, method, k=k, lengths=lengths, sim="gram")
    monkeypatch.setattr(cb, "_GRAM_SMEM_STATE", 0)
    glob = _cuda_select(target, x, w, method, k=k, lengths=lengths, sim="gram")
    assert torch.equal(smem, glob)
    o = smem.cpu()
    assert (o[2, 1:] == -1).all() and (o[2, 0] == 0).all() and (o[:2] >= 0).all()


def test_kernel_gram_register_slots_match_shared_state(target, monkeypatch):
    """Gram mode keeps up to 4 tokens per thread in registers when the padded length fits 4 x 1024
    threads, else the token state stays in shared memory: an image of 3000 tokens picks the same
    (exact rounds included) alone (register slots, tail slots predicated off) and padded to 4200
    (shared memory), and both as with the state in global memory."""
    torch.manual_seed(1)
    n_pad, n = 4200, 3000
    x = torch.randn(2, n_pad, 32, device=target.device, dtype=torch.bfloat16)
    w = torch.rand(2, n_pad, device=target.device)
    lengths = torch.tensor([n_pad, n], device=target.device)
    kw = dict(k=24, lam=0.5, return_stats=True, sim="gram")
    smem, s_stats = _cuda_select(target, x, w, "mmr", lengths=lengths, **kw)
    alone, a_stats = _cuda_select(target, x[1:, :n], w[1:, :n], "mmr", **kw)
    monkeypatch.setattr(cb, "_GRAM_SMEM_STATE", 0)
    glob, g_stats = _cuda_select(target, x, w, "mmr", lengths=lengths, **kw)
    assert torch.equal(smem, glob) and torch.equal(smem[1:], alone)
    assert s_stats["rounds"].tolist() == g_stats["rounds"].tolist()
    assert s_stats["rounds"].tolist()[1:] == a_stats["rounds"].tolist()
    assert (smem >= 0).all()


def test_kernel_dpp_gram_cholesky_rows_in_shared_memory_match_global(target, monkeypatch):
    """Gram-mode DPP keeps the Cholesky rows in shared memory when ld * k_max floats fit the device's
    opt-in limit, else in global scratch: the same picks either way (the emulator's limit is lowered
    to force the global kernel; on a GPU k = 600 of 1000 tokens does not fit and k = 40 does, and
    greedy DPP's picks for a smaller k are the prefix of those for a larger one)."""
    torch.manual_seed(2)
    n = 1000
    x = torch.randn(2, n, 32, device=target.device, dtype=torch.bfloat16)
    w = torch.rand(2, n, device=target.device)
    small = _cuda_select(target, x, w, "dpp", k=40, sim="gram")
    if target.backend == "cuda_emu":
        monkeypatch.setenv("CUDA_EMU_SMEM_OPTIN", "8192")
        big = _cuda_select(target, x, w, "dpp", k=40, sim="gram")
    else:
        big = _cuda_select(target, x, w, "dpp", k=600, sim="gram")[:, :40]
    assert torch.equal(small, big) and (small >= 0).all()


@needs_gpu
@pytest.mark.parametrize("mode, dtype, method", [("rows", torch.float16, "mmr"), ("gram", torch.bfloat16, "divprune")],
                         ids=["row-mmr", "gram-divprune"])
def test_gpu_cuda_graph_capture_without_host_sync(mode, dtype, method):
    import mmrprune
    x = torch.randn(2, 256, 128, device="cuda", dtype=dtype)
    w = torch.rand(2, 256, device="cuda")
    kw = dict(k=16, method=method, backend="cuda", order="selection", check_finite=False, sim=mode)
    eager = mmrprune.select(x, w, **kw)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        mmrprune.select(x, w, **kw)   # warm-up on the side stream
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = mmrprune.select(x, w, **kw)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


