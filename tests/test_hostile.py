"""Regression tests for hostile inputs, on every (backend, device) pair this machine runs:
the defects of two red-team passes (the first: large values, messages, workspace; the second:
stats, features that require grad, the workspace limit's estimate and variable, flags and
scalars), plus a short run of the seeded hostile fuzz (the sanitizer job, .ci/sanitize.sh,
runs a longer one)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import tested_package
import torch

import mmrprune
from mmrprune import reference as R

METHODS = R.METHODS


@pytest.mark.parametrize("method", METHODS)
def test_every_image_empty_gives_empty_width(backend_device, method):
    """keep_ratio with every length 0: output [B, 0] (the cpu extension once got a null pointer)."""
    bd = backend_device
    bd.require(method)
    x, w = bd.tensor(torch.randn(2, 16, 8)), bd.tensor(torch.rand(2, 16))
    params = {"alpha": 1.0} if method == "d2pruner" else {}
    out = bd.select(x, w, keep_ratio=0.5, lengths=bd.tensor(torch.tensor([0, 0])), method=method, **params)
    assert out.shape == (2, 0) and out.dtype == torch.int64
    kept, idx = mmrprune.prune(x, w, keep_ratio=0.5, lengths=bd.tensor(torch.tensor([0, 0])), method=method,
                               backend=bd.name, **params)
    assert kept.shape == (2, 0, 8) and idx.shape == (2, 0)


@pytest.mark.parametrize("lam", [1e-19, 1e-300, 5e-324, 1e-3])
def test_hybrid_tiny_lam_pools_the_whole_image(backend_device, lam):
    """k / lam beyond int64 (or inf) must clamp the pool to N, as the reference does: FPS over
    the whole image, not top-k (the pool size once overflowed on cpu, torch and in C++)."""
    bd = backend_device
    bd.require("hybrid")
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 8, generator=g, dtype=torch.float64), torch.rand(64, generator=g, dtype=torch.float64)
    assert R.hybrid_pool_size(64, 10, lam) == 64
    want = R.select_hybrid(x.numpy(), w.numpy(), 10, lam)
    got = bd.select(bd.tensor(x), bd.tensor(w), k=10, method="hybrid", lam=lam, order="selection")
    np.testing.assert_array_equal(got.cpu().numpy(), want)
    # and it is FPS over the whole image, which top-k is not here
    np.testing.assert_array_equal(want, R.select_hybrid(x.numpy(), w.numpy(), 10, 0.0))
    assert set(want.tolist()) != set(R.select_topk(x.numpy(), w.numpy(), 10).tolist())


def test_hybrid_pool_size_reference():
    assert R.hybrid_pool_size(100, 10, 0.5) == 20
    assert R.hybrid_pool_size(100, 10, 1.0) == 10
    assert R.hybrid_pool_size(100, 10, 0.0) == 100
    assert R.hybrid_pool_size(100, 10, 5e-324) == 100   # k / lam = inf


@pytest.mark.parametrize("lam", [1e-19, 5e-324, 0.25])
def test_hybrid_pool_of_gpu_backends_clamps_before_converting(lam):
    """The cuda, triton and torch backends build the pool with torch ops (prepare.py) on the
    host side of the call: check it on CPU tensors against the reference's pool."""
    from mmrprune.prepare import hybrid_pool_rows
    from mmrprune.validation import validate
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 50, 4, generator=g), torch.rand(2, 50, generator=g)
    lengths = torch.tensor([50, 31])
    batch = validate(x, w, k=4, keep_ratio=None, lam=lam, method="hybrid", lengths=lengths).batch
    want = []
    for b, n in enumerate(lengths.tolist()):
        c = R.hybrid_pool_size(n, 4, lam)
        ranked = np.argsort(-R.normalized_importance(w[b, :n].double().numpy(), n), kind="stable")
        mask = np.zeros(50, dtype=bool)
        mask[ranked[:c]] = True
        want.append(mask)
    want = np.concatenate(want)
    np.testing.assert_array_equal(hybrid_pool_rows(batch).numpy(), want)


def test_select_varlen_requires_cu_seqlens():
    x, w = torch.randn(10, 4), torch.rand(10)
    with pytest.raises(TypeError, match=r"cu_seqlens: select_varlen needs .* got None"):
        mmrprune.select_varlen(x, w, None, k=3)
    with pytest.raises(TypeError, match="cu_seqlens"):
        mmrprune.select_varlen(x.numpy(), w.numpy(), None, k=3)


# ---------------------------------------------------------------------------- large values (item 4)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_features_whose_norm_would_overflow_are_rejected(dtype):
    from mmrprune.validation import feature_limit
    d = 64
    limit = feature_limit(dtype, d)
    assert limit == pytest.approx(np.sqrt(torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).max
                                          / d) / 2)
    x = torch.randn(32, d, dtype=torch.float64)
    x[3, 5] = 2.0 * limit
    with pytest.raises(ValueError, match=r"features: largest \|value\| is .* above the accepted .* divide"):
        mmrprune.select(x.to(dtype), torch.rand(32), k=4)
    with pytest.raises(ValueError, match=r"features: largest \|value\|"):
        mmrprune.select(x.to(dtype).numpy() if dtype != torch.bfloat16 else x.float().numpy(), None, k=4)


def test_the_issue_reproducer_is_rejected_not_degraded():
    """|x| ~ 4e18 in float32 used to normalise to zero rows (MMR became top-k, DPP index order)."""
    x = torch.randn(64, 64) * 4e18
    for method in ("mmr", "dpp"):
        with pytest.raises(ValueError, match="features: largest"):
            mmrprune.select(x, torch.rand(64), k=8, method=method)


@pytest.mark.parametrize("method", ["mmr", "dpp", "fps", "divprune"])
def test_large_features_below_the_limit_match_unscaled(backend_device, method):
    """Near the limit (scaled by 2**58, exactly, so the normalised rows have the same bits),
    every backend picks what it picks unscaled, and float64 picks match the reference."""
    bd = backend_device
    bd.require(method)
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(40, 8, generator=g, dtype=torch.float64), torch.rand(40, generator=g, dtype=torch.float64)
    big = x * 2.0**58
    for dtype in (torch.float64, torch.float32):
        a = bd.select(bd.tensor(big, dtype), bd.tensor(w, dtype), k=10, method=method, order="selection")
        b = bd.select(bd.tensor(x, dtype), bd.tensor(w, dtype), k=10, method=method, order="selection")
        np.testing.assert_array_equal(a.cpu().numpy(), b.cpu().numpy())
    got64 = bd.select(bd.tensor(big), bd.tensor(w), k=10, method=method, order="selection")
    np.testing.assert_array_equal(got64.cpu().numpy(), R.select_one(big.numpy(), w.numpy(), 10, method))


def test_importance_whose_span_overflows_is_rejected():
    x = torch.randn(16, 8)
    w = torch.tensor([-3e38, 3e38] * 8)
    with pytest.raises(ValueError, match=r"importance: max - min over an image overflows torch.float32"):
        mmrprune.select(x, w, k=4)
    w64 = torch.tensor([-1.5e308, 1.5e308] * 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"importance: max - min over an image overflows torch.float64"):
        mmrprune.select(x.double(), w64, k=4)


def test_importance_span_is_checked_per_image(backend_device):
    """Two images whose spans are each finite in float32 are accepted, even though the batch's
    overall span is not, and every backend agrees with the reference."""
    bd = backend_device
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 20, 8, generator=g)
    w = torch.rand(2, 20, generator=g) * 3e38
    w[1] = -w[1]
    out = bd.select(bd.tensor(x), bd.tensor(w), k=5, method="mmr", order="selection").cpu().numpy()
    for b in range(2):
        want = R.select_mmr(x[b].double().numpy(), w[b].double().numpy(), 5)
        np.testing.assert_array_equal(out[b], want)


# ---------------------------------------------------------------------------- messages (item 6)
def test_huge_radius_is_capped_not_crashed(backend_device):
    bd = backend_device
    bd.require("d2pruner")
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(16, 8, generator=g), torch.rand(16, generator=g)
    kw = dict(k=6, method="d2pruner", alpha=0.5, grid=(4, 4), order="selection")
    want = bd.select(bd.tensor(x), bd.tensor(w), radius=1000, **kw).cpu()
    for radius in (2**40, 2**63, 2**70):
        torch.testing.assert_close(bd.select(bd.tensor(x), bd.tensor(w), radius=radius, **kw).cpu(), want)


def test_huge_k_means_every_token(backend_device):
    bd = backend_device
    x, w = bd.tensor(torch.randn(2, 12, 4)), bd.tensor(torch.rand(2, 12))
    want = bd.select(x, w, k=12, lengths=bd.tensor(torch.tensor([12, 5])))
    for k in (2**63 - 1, 2**63, 2**64, 10**30):
        torch.testing.assert_close(bd.select(x, w, k=k, lengths=bd.tensor(torch.tensor([12, 5]))), want)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.longdouble, np.complex64])
def test_numpy_dtypes_are_named_as_numpy(dtype):
    x = np.ones((8, 4), dtype=dtype)
    with pytest.raises(TypeError, match=rf"features: expected a float16, float32 or float64 array, got dtype "
                                        rf"{np.dtype(dtype).name}") as info:
        mmrprune.select(x, None, k=3)
    assert "torch" not in str(info.value) and "bfloat16" not in str(info.value)
    with pytest.raises(TypeError, match=rf"importance: expected .* array, got dtype {np.dtype(dtype).name}"):
        mmrprune.select(np.ones((8, 4), np.float32), np.ones(8, dtype=dtype), k=3)


def test_big_endian_and_read_only_numpy_indices():
    g = np.random.default_rng(6)
    x, w = g.standard_normal((2, 16, 8)).astype(np.float32), g.random((2, 16)).astype(np.float32)
    want = mmrprune.select(x, w, k=3, lengths=np.array([3, 16]))
    ro = np.array([3, 16])
    ro.flags.writeable = False
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns about non-writable arrays it is given
        np.testing.assert_array_equal(mmrprune.select(x, w, k=3, lengths=ro), want)
        np.testing.assert_array_equal(mmrprune.select(x, w, k=3, lengths=np.array([3, 16], dtype=">i8")), want)
        np.testing.assert_array_equal(mmrprune.select(x, w, k=3, lengths=np.array([3, 16], dtype=">i4")), want)
        packed = x.reshape(32, 8)
        cu = np.array([0, 16, 32])
        flat, cu_k = mmrprune.select_varlen(packed, w.reshape(32), cu, k=3)
        for cu_other in (cu.astype(">i8"), cu.astype(">i4")):
            got = mmrprune.select_varlen(packed, w.reshape(32), cu_other, k=3)
            np.testing.assert_array_equal(got[0], flat)
            np.testing.assert_array_equal(got[1], cu_k)
    with pytest.raises(TypeError, match="lengths: expected an int32 or int64 array, got dtype uint8"):
        mmrprune.select(x, w, k=3, lengths=np.array([3, 16], dtype=np.uint8))


def test_sparse_nested_and_meta_tensors_are_named():
    import warnings
    x, w = torch.randn(16, 8), torch.rand(16)
    with pytest.raises(TypeError, match=r"features: expected a dense \(strided\) tensor, got layout torch.sparse_coo"):
        mmrprune.select(x.to_sparse(), w, k=3)
    with pytest.raises(TypeError, match=r"importance: expected a dense \(strided\) tensor, got layout torch.sparse_coo"):
        mmrprune.select(x, w.to_sparse(), k=3, method="topk")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own "nested tensors are a prototype" warning
        nested = torch.nested.nested_tensor([torch.randn(3, 4), torch.randn(5, 4)])
    with pytest.raises(TypeError, match="features: nested tensors are not supported"):
        mmrprune.select(nested, None, k=3)
    with pytest.raises(TypeError, match=r"lengths: expected a dense \(strided\) tensor"):
        mmrprune.select(torch.randn(2, 16, 8), None, k=3, lengths=torch.tensor([3, 16]).to_sparse())
    for check_finite in (True, False):
        with pytest.raises(ValueError, match="features: is on the meta device"):
            mmrprune.select(torch.empty(16, 8, device="meta"), None, k=3, check_finite=check_finite)


def test_huge_list_is_not_printed_whole():
    x = torch.randn(400, 64).tolist()
    with pytest.raises(TypeError, match=r"features: expected a torch.Tensor or numpy.ndarray, got list \[\[") as info:
        mmrprune.select(x, None, k=3)
    assert len(str(info.value)) < 300 and "400 items" in str(info.value)
    with pytest.raises(TypeError, match=r"lengths: expected a list of int64 values"):
        mmrprune.select(torch.randn(2, 16, 8), None, k=3, lengths=[2**70, 1])


# ---------------------------------------------------------------------------- workspace (item 5)
def test_dpp_workspace_past_the_limit_fails_up_front(backend_device, monkeypatch):
    """N = 100,000, D = 64, k = 25,000: dpp's N x k Cholesky rows are ~10 GB (float32); the call
    must fail before allocating, with the bytes and the way out."""
    from mmrprune import workspace
    monkeypatch.delenv(workspace.ENV_VAR, raising=False)
    bd = backend_device
    x = bd.tensor(torch.randn(100_000, 64))
    with pytest.raises(workspace.WorkspaceLimitError,
                       match=r"workspace: backend .* would need about .* GiB \(\d+ bytes\) .* 'dpp' .* "
                             r"MMRPRUNE_MAX_WORKSPACE") as info:
        bd.select(x, None, k=25_000, method="dpp")
    need = int(str(info.value).split("(")[1].split(" bytes")[0])
    assert need >= 100_000 * 25_000 * 4            # the Cholesky rows alone
    assert isinstance(info.value, MemoryError)


def test_workspace_limit_from_the_environment(monkeypatch):
    from mmrprune import workspace
    x, w = torch.randn(64, 16), torch.rand(64)
    monkeypatch.setenv(workspace.ENV_VAR, "1K")
    for backend in ("torch", "numpy"):
        with pytest.raises(workspace.WorkspaceLimitError, match=r"above the limit of 1.0 KiB \(1024 bytes\)"):
            mmrprune.select(x, w, k=8, method="dpp", backend=backend)
    monkeypatch.setenv(workspace.ENV_VAR, "unlimited")
    assert mmrprune.select(x, w, k=8, method="dpp", backend="torch").shape == (8,)
    monkeypatch.setenv(workspace.ENV_VAR, "16G")
    assert workspace.limit_bytes() == 16 << 30
    monkeypatch.setenv(workspace.ENV_VAR, "lots")
    with pytest.raises(ValueError, match="MMRPRUNE_MAX_WORKSPACE: expected a byte count"):
        mmrprune.select(x, w, k=8)
    monkeypatch.delenv(workspace.ENV_VAR)
    assert workspace.limit_bytes() == workspace.DEFAULT_LIMIT_BYTES


# The peak memory of a call, measured in a fresh process: VmHWM of /proc/self/status is the
# kernel's own high-water mark of the process's resident memory, reset to the current size by
# writing 5 to /proc/self/clear_refs just before the call, so the growth is exact to a page and
# blind to what other processes on a loaded machine do.  MALLOC_MMAP_THRESHOLD_ fixes glibc's
# mmap threshold at 128 KiB (it otherwise grows up to 32 MiB after large frees): every buffer
# above that is a mapping of its own, faulted in when written and unmapped when freed, so no
# buffer of the call hides in pages an earlier case left resident.  The tolerance covers what
# the estimate leaves out by design, per-call constants (Python objects, small tensors, a few
# pages of thread and fiber stacks: 8 MiB), against buffers of 16 to 128 MiB.
_PEAK_CHILD = r"""
import json, os, re, sys, torch, mmrprune
from mmrprune import workspace
from mmrprune.validation import validate
torch.set_num_threads(1)
def status(key):
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+) kB", f.read()).group(1)) << 10
def features(layout, b, n, d):
    g = torch.Generator().manual_seed(0)
    if layout == "expanded":    # one row repeated: the input holds D numbers, a copy all of them
        return torch.randn(1, 1, d, generator=g).expand(b, n, d)
    if layout == "strided":     # every other column of a wider tensor
        return torch.randn(b, n, 2 * d, generator=g)[..., ::2]
    return torch.randn(b, n, d, generator=g)
try:
    open("/proc/self/clear_refs", "w").write("5")
except OSError as exc:
    print(json.dumps({"unsupported": f"/proc/self/clear_refs: {exc}"}))
    sys.exit(0)
out = {}
for name, case in json.loads(sys.argv[1]).items():
    x = features(case["layout"], *case["shape"])
    lengths = torch.tensor(case["lengths"]) if "lengths" in case else None
    kw = dict(k=case["k"], method=case["method"], lengths=lengths)
    # warm-up: the process's first-use allocations (BLAS buffers, thread and fiber stacks); a
    # smaller warm-up left 4-8 MiB of them to the first large Gram
    sim = case.get("sim", "auto")
    mmrprune.select(x, None, backend=case["backend"], sim=sim, **kw)
    if case["backend"] == "cpu":
        from mmrprune.backends.cpu_backend import release_scratch
        release_scratch()       # the call's row scratch then counts, as in the estimate
    base = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    mmrprune.select(x, None, backend=case["backend"], sim=sim, **kw)
    grew = status("VmHWM") - base
    batch = validate(x, None, keep_ratio=None, lam=0.5, **kw).batch
    out[name] = {"grew": grew, "estimate": workspace.estimate_bytes(case["backend"], batch, sim)}
print(json.dumps(out))
"""
_LAYOUTS = ("contiguous", "expanded", "strided")
_PEAK_CASES = {
    # 64 MiB of float32 features: a copy of them dwarfs the 16 MiB of row scratch and the tolerance
    **{f"cpu-{lay}": dict(backend="cpu", method="mmr", layout=lay, shape=(4, 2048, 2048), k=4) for lay in _LAYOUTS},
    # images of 8 sizes in one call: the C++ scratch grows 7 times, once kept every outgrown block
    "cpu-growing-images": dict(backend="cpu", method="mmr", layout="contiguous", shape=(8, 2048, 2048), k=2,
                               lengths=[256 * (i + 1) for i in range(8)]),
    **{f"cuda_emu-row-{lay}": dict(backend="cuda_emu", method="mmr", layout=lay, shape=(4, 2048, 2048), k=4,
                                   sim="rows") for lay in _LAYOUTS},
    # left to its heuristic the backend picks Gram mode here: a 64 MiB Gram, once left out of the estimate
    **{f"cuda_emu-gram-{lay}": dict(backend="cuda_emu", method="mmr", layout=lay, shape=(1, 4096, 256), k=4)
       for lay in _LAYOUTS},
    # the prepare kernel ranks hybrid's pool and computes DivPrune's first score from the Gram
    # itself: no fp32 row copy, no Gram row blocks in the estimate any more
    **{f"cuda_emu-gram-{m}": dict(backend="cuda_emu", method=m, layout="contiguous", shape=(1, 4096, 256), k=4)
       for m in ("divprune", "hybrid")},
    # the DPP's Cholesky rows N x k (D > k: the DPP never runs out of rank, every row is written);
    # k = 60: the float64 reference takes ~2 s a call here
    **{f"{b}-dpp": dict(backend=b, method="dpp", layout="contiguous", shape=(1, 20000, 160), k=60)
       for b in ("cpu", "torch", "numpy")},
}


@pytest.fixture(scope="module")
def measured_peaks():
    """``{case: {"grew", "estimate"}}`` of every available case, from one child process."""
    from mmrprune import dispatch
    cases = {name: c for name, c in _PEAK_CASES.items() if dispatch.status(c["backend"])[0]}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072",
               PYTHONPATH=os.pathsep.join(p for p in (tested_package.package_parent(), os.environ.get("PYTHONPATH")) if p))
    res = subprocess.run([sys.executable, "-c", _PEAK_CHILD, json.dumps(cases)], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", sorted(_PEAK_CASES))
def test_workspace_estimate_covers_the_measured_peak(measured_peaks, case):
    """The estimate bounds the memory a call really takes (its peak resident-size growth, which
    includes the contiguous copy of expanded or strided features), and is not wildly above it."""
    from mmrprune import dispatch
    if "unsupported" in measured_peaks:
        pytest.skip(measured_peaks["unsupported"])
    backend = _PEAK_CASES[case]["backend"]
    if case not in measured_peaks:
        pytest.skip(f"backend {backend!r} not available: {dispatch.status(backend)[1]}")
    got = measured_peaks[case]
    assert got["grew"] <= got["estimate"] * 1.05 + (8 << 20), got
    assert got["estimate"] <= 2 * got["grew"] + (16 << 20), got


def test_hostile_fuzz_short():
    """A short run of the seeded fuzz the sanitizer job runs at length (.ci/sanitize.sh)."""
    from mmrprune import dispatch
    if not dispatch.status("cpu")[0]:
        pytest.skip("the cpu backend is not built: python setup.py build_ext --inplace")
    import hostile_fuzz
    counts = hostile_fuzz.run(seed=17, cases=60)
    assert sum(counts.values()) == 60
    assert counts.get("rejected", 0) < 30, counts   # most cases must run, not just be rejected


# ============================================================================ second pass: the newer surfaces
# ---------------------------------------------------------------------------- prune(return_stats=True)
def test_prune_returns_the_stats_too(backend_device):
    """``prune(..., return_stats=True)`` is ``(kept, indices, stats)``: the picks and stats of
    ``select(..., return_stats=True)``, the rows of a plain ``prune`` (it once crashed on the tuple)."""
    bd = backend_device
    g = torch.Generator().manual_seed(26)
    x, w = bd.tensor(torch.randn(2, 24, 8, generator=g)), bd.tensor(torch.rand(2, 24, generator=g))
    kept, idx, stats = mmrprune.prune(x, w, k=5, lengths=bd.tensor(torch.tensor([24, 3])), backend=bd.name,
                                      return_stats=True)
    want_idx, want_stats = bd.select(x, w, k=5, lengths=bd.tensor(torch.tensor([24, 3])), return_stats=True)
    plain_kept, plain_idx = mmrprune.prune(x, w, k=5, lengths=bd.tensor(torch.tensor([24, 3])), backend=bd.name)
    torch.testing.assert_close(idx, want_idx)
    torch.testing.assert_close(plain_idx, want_idx)
    torch.testing.assert_close(kept, plain_kept)
    assert stats.keys() == want_stats.keys()
    for name in stats:
        torch.testing.assert_close(stats[name], want_stats[name])


def test_prune_return_stats_numpy_and_single_image():
    g = np.random.default_rng(26)
    x, w = g.standard_normal((30, 8)).astype(np.float32), g.random(30).astype(np.float32)
    kept, idx, stats = mmrprune.prune(x, w, k=4, backend="numpy", return_stats=True)
    assert isinstance(kept, np.ndarray) and kept.shape == (4, 8) and idx.shape == (4,)
    np.testing.assert_array_equal(kept, x[idx])
    assert isinstance(stats["rounds"], np.ndarray) and stats["rounds"].shape == ()
    assert len(mmrprune.prune(x, w, k=4, backend="numpy", return_stats=False)) == 2
    with pytest.raises(TypeError, match=r"return_stats: expected a bool \(True or False\), got str 'yes'"):
        mmrprune.prune(x, w, k=4, return_stats="yes")


# ---------------------------------------------------------------------------- features that require grad
GRAD_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


class _SavedTensors:
    """Counts the tensors autograd saves for a backward pass while active: none may be saved
    when selection builds no graph."""

    def __init__(self):
        self.count = 0

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    def _pack(self, t):
        self.count += 1
        return t


def _grad_inputs(bd, shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = bd.tensor(torch.randn(*shape, generator=g), dtype).requires_grad_(True)
    w = bd.tensor(torch.rand(*shape[:-1], generator=g), dtype).requires_grad_(True)
    return x, w


def _check_untouched(x, before, version):
    assert x._version == version, "the user's tensor was written to"
    assert torch.equal(x.detach(), before) and x.grad is None


@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("method", METHODS)
def test_features_that_require_grad_are_read_detached(backend_device, method, dtype):
    """Selection is not differentiable: features (and importance) with ``requires_grad=True``
    give the picks of their detached values on every backend, build no autograd graph, and are
    not written to (the torch backend once raised on its out= ops)."""
    bd = backend_device
    bd.require(method)
    x, w = _grad_inputs(bd, (2, 20, 8), dtype, 27)
    before, version = x.detach().clone(), x._version
    params = {"alpha": 1.0} if method == "d2pruner" else {}
    kw = dict(k=5, method=method, lengths=bd.tensor(torch.tensor([20, 7])), order="selection", **params)
    want = bd.select(x.detach(), w.detach(), **kw)
    with _SavedTensors() as saved:
        got, stats = bd.select(x, w, return_stats=True, **kw)
    torch.testing.assert_close(got, want)
    assert saved.count == 0 and not got.requires_grad
    assert all(not v.requires_grad for v in stats.values())
    _check_untouched(x, before, version)


@pytest.mark.parametrize("method", ["mmr", "divprune", "dpp"])
def test_select_varlen_with_features_that_require_grad(backend_device, method):
    bd = backend_device
    bd.require(method)
    x, w = _grad_inputs(bd, (30, 8), torch.float32, 28)
    cu = bd.tensor(torch.tensor([0, 12, 30]))
    before, version = x.detach().clone(), x._version
    want = bd.select_varlen(x.detach(), w.detach(), cu, k=4, method=method)
    with _SavedTensors() as saved:
        got = bd.select_varlen(x, w, cu, k=4, method=method)
    assert saved.count == 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    _check_untouched(x, before, version)


def test_prune_gather_stays_differentiable():
    """The indices carry no graph, the gathered rows do: the gradient reaches exactly the kept rows."""
    g = torch.Generator().manual_seed(29)
    x, w = torch.randn(2, 16, 4, generator=g).requires_grad_(True), torch.rand(2, 16, generator=g)
    kept, idx = mmrprune.prune(x, w, k=3, backend="torch", lengths=torch.tensor([16, 2]))
    kept.sum().backward()
    want = torch.zeros(2, 16)
    for b in range(2):
        want[b, idx[b][idx[b] >= 0]] = 1.0
    torch.testing.assert_close(x.grad, want[..., None].expand(2, 16, 4))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this is the parent of the interpreter run")
def test_requires_grad_under_the_triton_interpreter():
    """The Triton backend runs on CPU tensors only under TRITON_INTERPRET=1, set before triton is
    imported: re-run the requires_grad tests of this file in such a process, for backend triton,
    in float32 (the path of every 16-bit dtype too) and float64 (scaled and converted first): the
    interpreter takes 2-4 s a case."""
    pytest.importorskip("triton")
    here = os.path.abspath(__file__)
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(p for p in (tested_package.package_parent(), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", here,
                           "-k", "require_grad and triton and (float32 or float64 or varlen)"],
                          cwd=os.path.dirname(here), env=env, capture_output=True, text=True, timeout=900)
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    passed = re.search(r"(\d+) passed", proc.stdout)
    # triton implements 6 of the 7 methods: 6 x 2 dtypes, and 3 varlen methods
    assert passed and int(passed.group(1)) == 6 * 2 + 3, report
    assert not re.search(r"\d+ (failed|error)", proc.stdout), report


# ---------------------------------------------------------------------------- MMRPRUNE_MAX_WORKSPACE's forms
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e999", "9" * 400, "9" * 5000, "0.5", "1e-5", "1e9", "0",
                                   "0M", "-1", "lots", "12 apples", "0x100", "\u0661\u0662", "9223372036854775808"])
def test_workspace_variable_rejects_what_is_no_byte_count(monkeypatch, value):
    """Infinity, exponents and numbers past int64 once raised a bare OverflowError; fractions of
    a byte were rounded to a limit of 0 B.  Each is a ValueError naming the variable and every
    accepted form, quoting at most 40 characters of the value."""
    from mmrprune import workspace
    monkeypatch.setenv(workspace.ENV_VAR, value)
    with pytest.raises(ValueError, match=r"^MMRPRUNE_MAX_WORKSPACE: expected a byte count of at least 1 byte "
                                         r"\(digits with an optional K, M, G or T suffix, .*\) or 'unlimited' "
                                         r"for no limit; got ") as info:
        mmrprune.select(torch.randn(8, 4), None, k=2)
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("value, want", [("1", 1), ("4096", 4096), ("512M", 512 << 20), (" 16 GiB ", 16 << 30),
                                         ("1.5G", 3 << 29), ("2kb", 2048), ("1T", 1 << 40),
                                         ("9223372036854775807", 2**63 - 1), ("unlimited", None),
                                         (" Unlimited ", None), ("", 4 << 30), ("  ", 4 << 30)])
def test_workspace_variable_accepted_forms(monkeypatch, value, want):
    from mmrprune import workspace
    monkeypatch.setenv(workspace.ENV_VAR, value)
    assert workspace.limit_bytes() == want
    if want is None or want >= 1 << 20:
        assert mmrprune.select(torch.randn(8, 4), None, k=2, backend="torch").shape == (2,)


# ---------------------------------------------------------------------------- select_varlen: stats, lengths, defaults
def test_select_varlen_returns_stats_like_select(backend_device):
    """``return_stats=True`` gives ``(indices, cu_k, stats)``, ``stats`` per image as select's for
    the same images padded (it once blamed the method for an unexpected parameter)."""
    bd = backend_device
    g = torch.Generator().manual_seed(30)
    padded, w = torch.randn(2, 20, 8, generator=g), torch.rand(2, 20, generator=g)
    lengths = torch.tensor([20, 9])
    packed = torch.cat([padded[0], padded[1, :9]])
    cu = torch.tensor([0, 20, 29])
    flat, cu_k, stats = bd.select_varlen(bd.tensor(packed), bd.tensor(torch.cat([w[0], w[1, :9]])), bd.tensor(cu),
                                         k=6, return_stats=True)
    want_flat, want_cu_k = bd.select_varlen(bd.tensor(packed), bd.tensor(torch.cat([w[0], w[1, :9]])),
                                            bd.tensor(cu), k=6)
    torch.testing.assert_close(flat, want_flat)
    torch.testing.assert_close(cu_k, want_cu_k)
    _, want_stats = bd.select(bd.tensor(padded), bd.tensor(w), k=6, lengths=bd.tensor(lengths), return_stats=True)
    assert stats.keys() == want_stats.keys()
    for name in stats:
        assert stats[name].shape == (2,)
        torch.testing.assert_close(stats[name], want_stats[name])


def test_select_varlen_return_stats_numpy():
    g = np.random.default_rng(30)
    x, w = g.standard_normal((29, 8)), g.random(29)
    flat, cu_k, stats = mmrprune.select_varlen(x, w, np.array([0, 20, 29]), k=6, backend="numpy", return_stats=True)
    assert isinstance(stats["rounds"], np.ndarray) and stats["rounds"].shape == (2,)
    assert isinstance(flat, np.ndarray) and cu_k.tolist() == [0, 6, 12]


def test_select_varlen_lengths_names_cu_seqlens():
    x = torch.randn(20, 4)
    with pytest.raises(TypeError, match=r"^lengths: select_varlen takes each image's length from cu_seqlens .* "
                                        r"lengths is for padded \[B, N, D\] batches in mmrprune.select$"):
        mmrprune.select_varlen(x, None, torch.tensor([0, 8, 20]), k=2, lengths=torch.tensor([8, 12]))


def test_select_varlen_importance_defaults_to_none():
    g = torch.Generator().manual_seed(31)
    x, cu = torch.randn(20, 4, generator=g), torch.tensor([0, 8, 20])
    want = mmrprune.select_varlen(x, None, cu, k=3, backend="torch")
    for got in (mmrprune.select_varlen(x, cu_seqlens=cu, k=3, backend="torch"),
                mmrprune.select_varlen(features=x, cu_seqlens=cu.numpy().tolist(), k=3, backend="torch")):
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
    # the offsets in importance's place: say so, rather than that importance is no float tensor
    for offsets in (cu, cu.int(), cu.numpy(), [0, 8, 20]):
        feats = x.numpy() if isinstance(offsets, np.ndarray) else x
        with pytest.raises(TypeError, match=r"cu_seqlens: .* got None \(the second positional argument is "
                                            r"importance: did you mean select_varlen\(features, None, cu_seqlens"):
            mmrprune.select_varlen(feats, offsets, k=3)
    with pytest.raises(TypeError, match=r"cu_seqlens: .* got None; for one image"):
        mmrprune.select_varlen(x, torch.rand(20), k=3)


# ---------------------------------------------------------------------------- on/off flags alike
FLAG_CALLS = {
    "select": lambda **kw: mmrprune.select(torch.randn(2, 10, 4), None, k=2, backend="torch", **kw),
    "select_varlen": lambda **kw: mmrprune.select_varlen(torch.randn(10, 4), None, [0, 4, 10], k=2,
                                                         backend="torch", **kw),
    "prune": lambda **kw: mmrprune.prune(torch.randn(10, 4), None, k=2, backend="torch", **kw),
}


@pytest.mark.parametrize("call", sorted(FLAG_CALLS))
@pytest.mark.parametrize("flag", ["check_finite", "return_stats"])
@pytest.mark.parametrize("value", ["yes", "", 1, 0, 1.0, None, torch.tensor(True), np.array(True), [True]],
                         ids=["str", "empty-str", "int-1", "int-0", "float", "None", "tensor", "ndarray", "list"])
def test_flags_take_bools_only(call, flag, value):
    """``check_finite`` and ``return_stats`` take the same values, True/False or a NumPy bool, and
    refuse the rest with the same message (``return_stats="yes"`` or ``1`` once passed, while
    ``check_finite=1`` raised)."""
    with pytest.raises(TypeError, match=rf"^{flag}: expected a bool \(True or False\), got "):
        FLAG_CALLS[call](**{flag: value})


@pytest.mark.parametrize("call", sorted(FLAG_CALLS))
@pytest.mark.parametrize("flag", ["check_finite", "return_stats"])
def test_flags_take_numpy_bools(call, flag):
    plain = {"select": torch.Tensor, "select_varlen": tuple, "prune": tuple}[call]
    for value in (np.True_, np.False_, True, False):
        out = FLAG_CALLS[call](**{flag: value})
        if flag == "return_stats" and value:
            assert isinstance(out, tuple) and isinstance(out[-1], dict)
        else:
            assert isinstance(out, plain) and not isinstance(out[-1], dict)


# ---------------------------------------------------------------------------- k: any integer scalar
@pytest.mark.parametrize("k", [torch.tensor(4), torch.tensor(4, dtype=torch.int32), torch.tensor(4, dtype=torch.uint8),
                               np.int64(4), np.int8(4), np.uint64(4), np.array(4), np.array(4, dtype=np.uint16)],
                         ids=["tensor-int64", "tensor-int32", "tensor-uint8", "np-int64", "np-int8", "np-uint64",
                              "ndarray-0d", "ndarray-0d-uint16"])
def test_k_accepts_integer_scalars(k):
    """A 0-d integer tensor is a count as much as ``np.int64(4)`` is (it was once refused)."""
    g = torch.Generator().manual_seed(32)
    x, w = torch.randn(2, 12, 4, generator=g), torch.rand(2, 12, generator=g)
    want = mmrprune.select(x, w, k=4, backend="torch")
    torch.testing.assert_close(mmrprune.select(x, w, k=k, backend="torch"), want)
    torch.testing.assert_close(mmrprune.prune(x, w, k=k, backend="torch")[1], want)
    flat, cu_k = mmrprune.select_varlen(x.reshape(24, 4), w.reshape(24), [0, 12, 24], k=k, backend="torch")
    assert cu_k.tolist() == [0, 4, 8]


@pytest.mark.parametrize("k, exc, message", [
    (torch.tensor(True), TypeError, r"got torch.Tensor\(shape=\(\), dtype=torch.bool"),
    (torch.tensor(4.0), TypeError, r"got torch.Tensor\(shape=\(\), dtype=torch.float32"),
    (torch.tensor([4]), TypeError, r"got torch.Tensor\(shape=\(1,\), .*; a tensor or array must be 0-d"),
    (torch.tensor([4, 5]), TypeError, r"got torch.Tensor\(shape=\(2,\), .*; a tensor or array must be 0-d"),
    (torch.empty((), dtype=torch.int64, device="meta"), TypeError, r"device=meta"),
    (np.array([4]), TypeError, r"got numpy.ndarray\(shape=\(1,\), .*; a tensor or array must be 0-d"),
    (np.array(4.0), TypeError, r"got numpy.ndarray\(shape=\(\), dtype=float64\)"),
    (np.float64(4.0), TypeError, r"got float64 np.float64\(4.0\)"),
    (np.bool_(True), TypeError, r"got bool np.True_"),
    (True, TypeError, r"got bool True"),
    ("4", TypeError, r"got str '4'"),
    (torch.tensor(0), ValueError, r"^k: expected an int >= 1, got 0$"),
    (np.int64(-2), ValueError, r"^k: expected an int >= 1, got -2$"),
], ids=["tensor-bool", "tensor-float", "tensor-1-element", "tensor-2-elements", "tensor-meta", "ndarray-1-element",
        "ndarray-0d-float", "np-float", "np-bool", "bool", "str", "tensor-0", "np-negative"])
def test_k_rejects_what_is_no_integer_scalar(k, exc, message):
    with pytest.raises(exc, match=message) as info:
        mmrprune.select(torch.randn(12, 4), None, k=k, backend="torch")
    assert str(info.value).startswith("k: expected an int >= 1")


# ---------------------------------------------------------------------------- keep_ratio and lam: any real scalar
REAL_SCALARS = [(torch.tensor, torch.float32), (torch.tensor, torch.float64), (torch.tensor, torch.float16),
                (torch.tensor, torch.bfloat16), (np.array, np.float64), (np.array, np.float32), (np.float32, None),
                (np.float16, None)]
REAL_IDS = ["tensor-float32", "tensor-float64", "tensor-float16", "tensor-bfloat16", "ndarray-0d-float64",
            "ndarray-0d-float32", "np-float32", "np-float16"]


def _real(make, dtype, value):
    return make(value) if dtype is None else make(value, dtype=dtype)


@pytest.mark.parametrize("make, dtype", REAL_SCALARS, ids=REAL_IDS)
def test_keep_ratio_and_lam_accept_real_scalars(make, dtype):
    """A 0-d floating tensor or array is a ratio as much as ``0.25`` is (both were refused while
    ``k`` took a 0-d integer tensor).  0.25 and 0.5 are exact in every float dtype."""
    g = torch.Generator().manual_seed(33)
    x, w = torch.randn(2, 12, 4, generator=g), torch.rand(2, 12, generator=g)
    want = mmrprune.select(x, w, keep_ratio=0.25, lam=0.5, backend="torch")
    ratio, lam = _real(make, dtype, 0.25), _real(make, dtype, 0.5)
    torch.testing.assert_close(mmrprune.select(x, w, keep_ratio=ratio, lam=lam, backend="torch"), want)
    torch.testing.assert_close(mmrprune.prune(x, w, keep_ratio=ratio, lam=lam, backend="torch")[1], want)
    flat, cu_k = mmrprune.select_varlen(x.reshape(24, 4), w.reshape(24), [0, 12, 24], keep_ratio=ratio, lam=lam,
                                        backend="torch")
    assert cu_k.tolist() == [0, 3, 6]


@pytest.mark.parametrize("name", ["keep_ratio", "lam"])
@pytest.mark.parametrize("value", [torch.tensor(1), np.array(1, dtype=np.uint8), np.int64(1)],
                         ids=["tensor-int", "ndarray-0d-uint8", "np-int"])
def test_keep_ratio_and_lam_accept_integer_scalars(name, value):
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(34))
    kw = {"keep_ratio": 1.0, "lam": 1.0}
    want = mmrprune.select(x, None, backend="torch", **kw)
    torch.testing.assert_close(mmrprune.select(x, None, backend="torch", **dict(kw, **{name: value})), want)


@pytest.mark.parametrize("name, expected", [("keep_ratio", "a float in (0, 1]"), ("lam", "a real number in [0, 1]")])
@pytest.mark.parametrize("value, exc, message", [
    (torch.tensor(True), TypeError, r"got torch.Tensor\(shape=\(\), dtype=torch.bool"),
    (np.array(True), TypeError, r"got numpy.ndarray\(shape=\(\), dtype=bool\)"),
    (np.bool_(True), TypeError, r"got bool np.True_"),
    (True, TypeError, r"got bool True"),
    (torch.tensor(0.5 + 0j), TypeError, r"dtype=torch.complex64"),
    (torch.tensor([0.5]), TypeError, r"got torch.Tensor\(shape=\(1,\), .*; a tensor or array must be 0-d"),
    (torch.tensor([0.5, 0.5]), TypeError, r"got torch.Tensor\(shape=\(2,\), .*; a tensor or array must be 0-d"),
    (np.array([0.5]), TypeError, r"got numpy.ndarray\(shape=\(1,\), .*; a tensor or array must be 0-d"),
    (torch.empty((), device="meta"), TypeError, r"device=meta"),
    ("0.5", TypeError, r"got str '0.5'"),
    (torch.tensor(float("nan")), ValueError, r"got nan$"),
    (np.array(1.5), ValueError, r"got 1.5$"),
    (torch.tensor(-1), ValueError, r"got -1.0$"),
], ids=["tensor-bool", "ndarray-bool", "np-bool", "bool", "tensor-complex", "tensor-1-element", "tensor-2-elements",
        "ndarray-1-element", "tensor-meta", "str", "tensor-nan", "ndarray-1.5", "tensor-negative"])
def test_keep_ratio_and_lam_reject_what_is_no_real_scalar_in_range(name, expected, value, exc, message):
    kw = {"keep_ratio": 0.5, "lam": 0.5, name: value}
    with pytest.raises(exc, match=message) as info:
        mmrprune.select(torch.randn(12, 4), None, backend="torch", **kw)
    prefix = f"{name}: expected {expected}" if exc is TypeError else f"{name}: expected a value in"
    assert str(info.value).startswith(prefix), str(info.value)
