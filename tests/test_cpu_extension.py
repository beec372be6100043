"""The C++ CPU backend (mmrprune._cpu): build, exactness, threads, SIMD paths, certificate."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import certify
import mmrprune
from mmrprune import ops
from mmrprune import reference as R
from mmrprune.backends import cpu_backend

pytestmark = pytest.mark.skipif(ops._cpu is None, reason=f"mmrprune._cpu not built: {ops.CPU_IMPORT_ERROR}")

METHOD_PARAMS = {"d2pruner": {"grid": (6, 10)}}  # 60 tokens per image below


def _cpu_select(x, w, method, **kw):
    return mmrprune.select(x, w, method=method, order="selection", backend="cpu",
                           **METHOD_PARAMS.get(method, {}), **kw)


def _well_separated(method, n, d, k, batch, seed0=0, need=2e-4):
    """Gaussian tokens + distinct importance whose reference margin exceeds `need` (twice the
    float32 certificate tolerance) in every image, so exact equality is owed."""
    for seed in range(seed0, seed0 + 50):
        x = certify.gaussian_tokens(n, d, batch=batch, seed=seed)
        w = certify.distinct_importance(n, batch=batch, seed=seed)
        params = METHOD_PARAMS.get(method, {})
        if all(certify.reference_margin(x[b], w[b], k, method, 0.5, **params) > need for b in range(batch)):
            return x, w
    raise AssertionError(f"no well-separated input found for {method}")


def test_extension_loads_and_reports():
    assert ops._cpu.isa() in ("avx512", "avx2", "sse2", "generic")
    ok, detail = cpu_backend.BACKEND.status()
    assert ok, detail
    assert ops._cpu.isa() in detail


def test_info_cli_reports_build_flags():
    out = subprocess.run([sys.executable, "-m", "mmrprune", "info"], capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if l.strip().startswith("cpu "))
    assert " yes " in line, line
    assert "-O3" in line and "kernels" in line, line


def test_status_without_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(ops, "_cpu", None)
    monkeypatch.setattr(ops, "CPU_IMPORT_ERROR", "No module named 'mmrprune._cpu'")
    ok, detail = cpu_backend.BACKEND.status()
    assert not ok and "build_ext --inplace" in detail and "pip install" in detail
    with pytest.raises(RuntimeError, match="not available"):
        mmrprune.select(torch.randn(5, 4), k=2, backend="cpu")


def test_auto_picks_cpu_for_cpu_tensors():
    from mmrprune import dispatch
    assert dispatch.resolve("auto", "cpu", "mmr").name == "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", R.METHODS)
def test_equals_reference_on_well_separated_inputs(method, dtype):
    n, d, k, batch = 60, 24, 15, 3
    x, w = _well_separated(method, n, d, k, batch)
    xt, wt = torch.from_numpy(x).to(dtype), torch.from_numpy(w).to(dtype)
    x_before, w_before = xt.clone(), wt.clone()
    got = _cpu_select(xt, wt, method, k=k)
    assert got.dtype == torch.int64 and got.shape == (batch, k)
    for b in range(batch):
        ref = R.select_one(x[b], w[b], k, method, 0.5, **METHOD_PARAMS.get(method, {}))
        np.testing.assert_array_equal(got[b].numpy(), ref, err_msg=f"{method} image {b}")
    assert torch.equal(xt, x_before) and torch.equal(wt, w_before)  # inputs untouched


@pytest.mark.parametrize("method", R.METHODS)
def test_padded_and_varlen_segments(method):
    n, d, k = 60, 24, 10
    x, w = _well_separated(method, n, d, k, 3, seed0=100)
    lengths = [60, 0, 60]  # middle image empty: selects nothing
    xt, wt = torch.from_numpy(x).float(), torch.from_numpy(w).float()
    got = _cpu_select(xt, wt, method, k=k, lengths=torch.tensor(lengths))
    assert (got[1] == -1).all()
    for b in (0, 2):
        ref = R.select_one(x[b], w[b], k, method, 0.5, **METHOD_PARAMS.get(method, {}))
        np.testing.assert_array_equal(got[b].numpy(), ref)
    # packed form of images 0 and 2 gives the same picks as flat row indices
    packed = torch.cat([xt[0], xt[2]])
    wp = torch.cat([wt[0], wt[2]])
    flat, cu_k = mmrprune.select_varlen(packed, wp, torch.tensor([0, 60, 120]), k=k, method=method,
                                        order="selection", backend="cpu", **METHOD_PARAMS.get(method, {}))
    assert cu_k.tolist() == [0, k, 2 * k]
    assert torch.equal(flat[:k], got[0]) and torch.equal(flat[k:] - 60, got[2])


@pytest.mark.parametrize("method", ["mmr", "divprune", "dpp", "hybrid"])
def test_budget_larger_than_image_and_single_token(method):
    x = torch.randn(2, 7, 5)
    got = mmrprune.select(x, torch.rand(2, 7), k=20, method=method, lengths=torch.tensor([7, 1]),
                          order="selection", backend="cpu")
    assert got.shape == (2, 7)
    assert sorted(got[0].tolist()) == list(range(7))
    assert got[1].tolist() == [0] + [-1] * 6


@pytest.mark.parametrize("method", R.METHODS)
def test_threads_give_the_same_answer(method, real_tokens_small):
    x, w = real_tokens_small
    kw = {"grid": (32, 32)} if method == "d2pruner" else {}
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mmrprune.select(x, w, k=48, method=method, order="selection", backend="cpu", **kw)
        torch.set_num_threads(2)
        two = mmrprune.select(x, w, k=48, method=method, order="selection", backend="cpu", **kw)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


@pytest.fixture(scope="module")
def real_tokens_small():
    from mmrprune.data import load_dinov2
    d = load_dinov2()
    return torch.from_numpy(np.asarray(d["tokens"][:4])), torch.from_numpy(np.asarray(d["cls_attention"][:4]))


@pytest.mark.parametrize("isa", ["sse2", "avx2", "avx512"])
def test_every_simd_path_matches_reference(isa):
    if not ops._cpu.isa_supported(isa):
        pytest.skip(f"this CPU cannot run {isa}")
    n, d, k = 60, 37, 15  # D not a multiple of any vector width: exercises the scalar tail
    x, w = _well_separated("mmr", n, d, k, 2, seed0=200)
    rows = torch.from_numpy(x).float().reshape(-1, d).contiguous()
    imp = torch.from_numpy(np.stack([R.normalized_importance(w[b], n) for b in range(2)])).float().reshape(-1)
    starts, lengths, ks = torch.tensor([0, n]), torch.tensor([n, n]), torch.tensor([k, k])
    out = torch.ops.mmrprune.cpu_select(rows, imp, None, starts, lengths, ks, k, "mmr", 0.5, 0.5, 1.0, 0.5, 1, 0,
                                        isa=isa)
    for b in range(2):
        np.testing.assert_array_equal(out[b].numpy(), R.select_mmr(x[b], w[b], k, 0.5))


def test_extension_rejects_inconsistent_segments():
    rows = torch.randn(10, 4)
    imp = torch.zeros(10)
    starts, lengths, ks = torch.tensor([0]), torch.tensor([10]), torch.tensor([11])  # k > length
    with pytest.raises(ValueError, match="ks"):
        torch.ops.mmrprune.cpu_select(rows, imp, None, starts, lengths, ks, 11, "mmr", 0.5, 0.5, 1.0, 0.5, 1, 0)
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.mmrprune.cpu_select(rows, imp, None, starts, torch.tensor([12]), torch.tensor([2]), 11, "mmr",
                                      0.5, 0.5, 1.0, 0.5, 1, 0)


def test_op_rejects_bad_tensors():
    rows, imp = torch.randn(10, 4), torch.zeros(10)
    s, n, k = torch.tensor([0]), torch.tensor([10]), torch.tensor([3])
    args = (s, n, k, 3, "mmr", 0.5, 0.5, 1.0, 0.5, 1, 0)
    op = torch.ops.mmrprune.cpu_select
    with pytest.raises(TypeError, match="importance must have dtype Float"):
        op(rows, imp.double(), None, *args)
    with pytest.raises(ValueError, match="rows must be contiguous"):
        op(torch.randn(4, 10).t(), imp, None, *args)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        op(rows, imp, None, s, n, k, 3, "nope", 0.5, 0.5, 1.0, 0.5, 1, 0)
    with pytest.raises(ValueError, match="method 'dpp' needs quality"):
        op(rows, imp, None, s, n, k, 3, "dpp", 0.5, 0.5, 1.0, 0.5, 1, 0)
    with pytest.raises(ValueError, match="importance must have shape \\[10\\]"):
        op(rows, imp[:9], None, *args)
    with pytest.raises(TypeError, match="starts must have dtype Long"):
        op(rows, imp, None, s.int(), n, k, 3, "mmr", 0.5, 0.5, 1.0, 0.5, 1, 0)
    with pytest.raises(ValueError, match="ks must have shape \\[1\\]"):
        op(rows, imp, None, s, n, torch.tensor([3, 3]), 3, "mmr", 0.5, 0.5, 1.0, 0.5, 1, 0)
    with pytest.raises(TypeError, match="rows must be float32, float64, float16 or bfloat16"):
        op(rows.int(), imp, None, *args)
    with pytest.raises(ValueError, match="k_max must be >= 0"):
        op(rows, imp, None, s, n, k, -1, "mmr", 0.5, 0.5, 1.0, 0.5, 1, 0)


@pytest.mark.parametrize("method", R.METHODS)
def test_certificate_on_real_tokens(method):
    """float16 DINOv2 tokens: near-duplicates abound, so exact equality is not owed;
    every step must be an argmax within the float16 tolerance."""
    from mmrprune.data import load_dinov2
    d = load_dinov2()
    x = torch.from_numpy(np.asarray(d["tokens"][:3]))
    w = torch.from_numpy(np.asarray(d["cls_attention"][:3]))
    params = {"grid": (32, 32)} if method == "d2pruner" else {}
    k = 64
    got = mmrprune.select(x, w, k=k, method=method, order="selection", backend="cpu", **params)
    for b in range(x.shape[0]):
        certify.check_certificate(x[b], w[b], got[b].numpy(), method=method, lam=0.5,
                                  tol=certify.tol_for(x.dtype), k=k, **params)


def test_bfloat16_input_certificate():
    x = torch.from_numpy(certify.clustered_tokens(200, 48, batch=2, seed=3)).to(torch.bfloat16)
    w = torch.from_numpy(certify.distinct_importance(200, batch=2, seed=3)).to(torch.bfloat16)
    got = mmrprune.select(x, w, k=40, method="mmr", order="selection", backend="cpu")
    for b in range(2):
        certify.check_certificate(x[b], w[b], got[b].numpy(), method="mmr", lam=0.5, tol=4e-3, k=40)


def _first_step_case(n, d, seed, kind):
    """Normalised float64 rows whose smallest max-off-diagonal sim is separated from the next by > 1e-4."""
    for s in range(seed, seed + 50):
        rng = np.random.default_rng(s)
        if kind == "gaussian":
            x = rng.standard_normal((n, d))
        elif kind == "far_pairs":  # near-duplicates n/2 apart, nothing alike nearby: the band bound is
            x = rng.standard_normal((n, d))  # useless and the pruned search falls back to the full pass
            h = n // 2  # n odd: the last token is unpaired, the one to find
            x[h:2 * h] = x[:h] + 0.2 * rng.standard_normal((h, d))
        else:  # clustered, neighbours in sequence order alike (like patch tokens): the band bound prunes
            c = rng.standard_normal((-(-n // 40), d))
            x = np.repeat(c, 40, axis=0)[:n] + 0.3 * rng.standard_normal((n, d))
            x[rng.integers(0, n)] += 3.0 * rng.standard_normal(d)  # one outlier to find
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        g = x @ x.T
        np.fill_diagonal(g, -np.inf)
        best = g.max(axis=1)
        srt = np.sort(best)
        if n <= 2 or srt[1] - srt[0] > 1e-4:
            return x, best
    raise AssertionError("no well-separated first step found")


@pytest.mark.parametrize("isa", ["sse2", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,d,kind", [(1, 8, "gaussian"), (2, 8, "gaussian"), (7, 37, "gaussian"),
                                      (61, 24, "gaussian"), (250, 37, "clustered"), (403, 64, "gaussian"), (401, 64, "far_pairs"),
                                      (1000, 40, "clustered")])
def test_divprune_first_step_tiled_and_pruned(isa, dtype, n, d, kind):
    """DivPrune step 1: the register-tiled triangular pass gives max_{j != i} sim(i, j) of the float64
    computation (N not a multiple of any tile or block), and the pruned search used by select() returns
    its exact argmin, with and without a second thread, on every SIMD path."""
    if not ops._cpu.isa_supported(isa):
        pytest.skip(f"this CPU cannot run {isa}")
    x64, ref = _first_step_case(n, d, seed=n, kind=kind)
    xn = np.ascontiguousarray(x64.astype(dtype))
    for threads in (1, 2):
        best = np.empty(n, dtype=dtype)
        pick = ops._cpu.divprune_first_step(xn, best, threads, isa)
        if n == 1:
            assert pick == 0 and best[0] == -np.inf
            continue
        np.testing.assert_allclose(best, ref, atol=1e-5 if dtype == np.float32 else 1e-12)
        assert pick == int(np.argmin(ref)) == int(np.argmin(best))
    # and select() picks it first
    got = mmrprune.select(torch.from_numpy(xn), k=1, method="divprune", order="selection", backend="cpu")
    assert got.tolist() == [int(np.argmin(ref)) if n > 1 else 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["f32", "bf16", "f64"])
@pytest.mark.parametrize("method", ["mmr", "fps", "hybrid", "divprune"])
def test_batch_one_with_spare_threads_gives_the_same_picks(method, dtype):
    """B = 1 with 2 threads: the helper thread loads rows, computes the first similarity row and
    refreshes stale heap entries in batches (cut into pieces of a token's owed sims); the
    picks must be bit-identical to 1 thread."""
    x = torch.from_numpy(certify.clustered_tokens(700, 48, seed=21, centres=12)).to(dtype)
    w = torch.from_numpy(certify.distinct_importance(700, seed=21)).to(dtype)
    before = torch.get_num_threads()
    try:
        got = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got[threads] = mmrprune.select(x, w, k=175, method=method, backend="cpu", order="selection")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[1], got[2])
    certify.check_certificate(x, w, got[2].numpy(), method, 0.5, tol=certify.tol_for(dtype), k=175)


def _with_threads(threads, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("method", ["mmr", "divprune", "dpp", "d2pruner"])
@pytest.mark.parametrize("threads,batch", [(3, 1), (5, 2), (4, 3), (3, 5)])
def test_every_crew_shape_gives_one_threads_picks(method, threads, batch):
    """Threads are split into one caller per image (up to the thread count) and crews of the
    spare threads (threads // B per image): 3 threads for 1 image is a crew of 3, 5 for 2 is
    two crews of 2 (one thread unused), 4 for 3 is three callers alone.  More threads than
    this machine's cores, so helpers are often not scheduled and callers take their tasks."""
    x = torch.from_numpy(certify.clustered_tokens(60, 24, batch=batch, seed=5, centres=6))
    w = torch.from_numpy(certify.distinct_importance(60, batch=batch, seed=5))
    one = _with_threads(1, lambda: _cpu_select(x, w, method, k=25))
    many = _with_threads(threads, lambda: _cpu_select(x, w, method, k=25))
    assert one.shape == (batch, 25) and torch.equal(one, many)


def test_concurrent_calls_from_python_threads():
    """The GIL is released during a call, so calls from several Python threads run at once,
    each with its own OpenMP team and its own scratch; every answer must equal the serial one."""
    from concurrent.futures import ThreadPoolExecutor
    cases = [(torch.from_numpy(certify.clustered_tokens(300, 32, batch=b, seed=s, centres=5)),
              torch.from_numpy(certify.distinct_importance(300, batch=b, seed=s))) for s, b in ((1, 1), (2, 3), (3, 1))]
    want = [_cpu_select(x, w, "mmr", k=60) for x, w in cases]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: _cpu_select(*cases[i % 3], "mmr", k=60), range(12)))
    for i, g in enumerate(got):
        assert torch.equal(g, want[i % 3]), i


def test_row_scratch_is_kept_reused_and_released():
    """The normalised rows' buffer stays mapped between calls (a fresh one costs page faults),
    is reused by a call of the same shape, never exceeds the limit, and can be handed back."""
    ops._cpu.release_scratch()
    assert ops._cpu.scratch_bytes() == 0
    x = torch.randn(1, 500, 300)
    mmrprune.select(x, k=10, backend="cpu")
    held = ops._cpu.scratch_bytes()
    assert held >= 500 * 300 * 4
    for _ in range(3):
        mmrprune.select(x, k=10, backend="cpu")
        assert ops._cpu.scratch_bytes() == held  # taken and given back, not grown
    assert 0 < ops._cpu.scratch_bytes() <= ops._cpu.SCRATCH_CACHE_LIMIT
    assert ops._cpu.release_scratch() == held
    assert ops._cpu.scratch_bytes() == 0
    assert cpu_backend.release_scratch() == 0
