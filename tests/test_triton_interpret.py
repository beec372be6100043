"""The Triton kernels under the interpreter (``TRITON_INTERPRET=1``, CPU tensors) against the reference.

``TRITON_INTERPRET`` must be set before Triton decorates the kernels, and the
rest of the suite imports Triton normally, so :func:`test_interpreter_suite`
re-runs this very file in a subprocess with ``TRITON_INTERPRET=1``,
``MMRPRUNE_INTERPRET_INNER=1`` and ``-o python_functions=inner_*``: there the
``inner_*`` functions are the tests (the parent process does not collect them)
and the parent asserts that all of them passed and none was skipped.  Shapes are tiny (N <= 48, k <= 8, B <= 3): the
interpreter runs each kernel step in NumPy.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

import tested_package
import torch

import certify as C
from mmrprune import reference as ref

INNER = os.environ.get("MMRPRUNE_INTERPRET_INNER") == "1"
METHODS = ("mmr", "topk", "fps", "hybrid", "divprune", "dpp")
GRAM_MODES = ("rows", "gram")   # select's sim=: similarity rows on demand / from the precomputed Gram

inner = pytest.mark.skipif(not INNER, reason="runs in the TRITON_INTERPRET=1 subprocess of test_interpreter_suite")


# ----------------------------------------------------------------------------- parent
def test_interpreter_suite():
    pytest.importorskip("triton")
    here = os.path.abspath(__file__)
    # the subprocess runs in tests/: put the mmrprune under test first, not another installed one
    path = os.pathsep.join(p for p in (tested_package.package_parent(), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, TRITON_INTERPRET="1", MMRPRUNE_INTERPRET_INNER="1", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-o", "python_functions=inner_*", here],
                          cwd=os.path.dirname(here), env=env, capture_output=True, text=True, timeout=1800)
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 20, report
    assert not re.search(r"\d+ (skipped|failed|error)", proc.stdout), report


# ----------------------------------------------------------------------------- helpers (subprocess)
@pytest.fixture(params=GRAM_MODES, ids=["ondemand", "gram"])
def gram_mode(request):
    return request.param


def _expected(x, w, k, method, lam=0.5, n=None):
    """Reference selection order of one image (valid rows ``x[:n]``), in float64."""
    x = C.to_f64(x)
    w = C.to_f64(w)
    n = x.shape[0] if n is None else n
    kb = min(k, n)
    return ref.select_one(x[:n], None if w is None else w[:n], kb, method, lam).tolist()


def _triton_select(x, w, **kw):
    import mmrprune
    from mmrprune import dispatch
    ok, why = dispatch.status("triton")
    assert ok, why
    return mmrprune.select(x, w, backend="triton", order="selection", **kw)


def _rows(out):
    return [[int(v) for v in row if v >= 0] for row in out.tolist()]


# ----------------------------------------------------------------------------- tests (subprocess)
@inner
def inner_backend_runs_on_cpu_when_interpreting():
    from mmrprune import dispatch
    ok, why = dispatch.status("triton")
    assert ok and "interpreter" in why, why
    backend, _ = dispatch.load("triton")
    assert "cpu" in backend.device_types


@inner
@pytest.mark.parametrize("method", METHODS)
def inner_padded_batch_matches_reference(method, gram_mode):
    """B = 3 with lengths (N, 0, partial): exact reference order per image, nothing from padding."""
    n, d, k = 40, 24, 7
    x = torch.from_numpy(C.clustered_tokens(n, d, batch=3, seed=3)).to(torch.float32)
    w = torch.from_numpy(C.distinct_importance(n, batch=3, seed=3)).to(torch.float32)
    lengths = torch.tensor([n, 0, 23])
    lam = 0.3 if method in ("mmr", "hybrid") else 0.5
    out = _triton_select(x, w, k=k, method=method, lam=lam, lengths=lengths, sim=gram_mode)
    assert out.shape == (3, k) and out.dtype == torch.int64
    got = _rows(out)
    for b in range(3):
        nb = int(lengths[b])
        exp = _expected(x[b], w[b], k, method, lam, n=nb) if nb else []
        assert got[b] == exp, (b, got[b], exp)
    assert (out[1] == -1).all()
    assert x.isfinite().all()   # the input was not written to (it would hold NaN/garbage otherwise)


@inner
@pytest.mark.parametrize("method", METHODS)
def inner_duplicate_tokens_tie_to_lowest_index(method, gram_mode):
    """Exact duplicates with tied importance: every tie must go to the lowest index.

    Six groups of three copies of a scaled one-hot vector (scales are powers of
    two), so every similarity is exactly 0 or 1 and every score tie is exact in
    float32 as in the float64 reference: the order is decided by the tie rule.
    """
    rng = np.random.default_rng(11)
    group = rng.permutation(np.repeat(np.arange(6), 3))
    x = np.zeros((18, 16))
    x[np.arange(18), group] = 2.0 ** rng.integers(-2, 3, size=18)
    w = rng.integers(1, 5, size=18).astype(np.float64)          # values 1..4: many ties
    x_t, w_t = torch.from_numpy(x).float(), torch.from_numpy(w).float()
    # DPP: once every group with positive quality is picked, the remaining gains are
    # rounding noise of a (numerically) zero; stay below that point.
    positive_groups = len(set(group[w > w.min()].tolist()))
    k = min(5, positive_groups) if method == "dpp" else 8
    for lam in ((0.5, 0.0, 1.0) if method in ("mmr", "hybrid") else (0.5,)):
        out = _triton_select(x_t, w_t, k=k, method=method, lam=lam, sim=gram_mode)
        assert out.tolist() == _expected(x_t, w_t, k, method, lam), (lam, out.tolist())


@inner
@pytest.mark.parametrize("method", ("mmr", "fps", "dpp"))
def inner_constant_importance_and_zero_vector(method, gram_mode):
    """``importance=None`` (Imp = 0, q = 1) and an all-zero token (sim 0, DPP gain 0)."""
    x = torch.from_numpy(C.gaussian_tokens(17, 12, seed=5)).float()
    x[4] = 0.0
    out = _triton_select(x, None, k=8, method=method, sim=gram_mode)
    if method == "dpp":
        # every initial gain is q^2 ||x̂||^2 = 1: the reference's first pick is decided by
        # float64 rounding noise, so only the certificate applies
        C.check_certificate(x, None, out.numpy(), method, tol=1e-4, k=8)
        assert 4 not in out.tolist()   # the zero vector has gain 0 and is never needed
    else:
        assert out.tolist() == _expected(x, None, 8, method)


@inner
def inner_dpp_exhausted_rank_fills_in_index_order(gram_mode):
    """Rank 3 features, k = 7: after 3 picks every gain is < DPP_EPS; the rest come in index order."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((12, 3)) @ rng.standard_normal((3, 20))
    w = rng.random(12)
    x_t, w_t = torch.from_numpy(x).float(), torch.from_numpy(w).float()
    out = _triton_select(x_t, w_t, k=7, method="dpp", sim=gram_mode)
    assert out.tolist() == _expected(x_t, w_t, 7, "dpp")


@inner
@pytest.mark.parametrize("method", METHODS)
def inner_varlen_matches_reference(method, gram_mode):
    """Packed segments (lengths 9, 0, 26, 1) through ``select_varlen``."""
    import mmrprune
    lens = [9, 0, 26, 1]
    cu = np.concatenate([[0], np.cumsum(lens)])
    x = torch.from_numpy(C.clustered_tokens(int(cu[-1]), 20, seed=8)).float()
    w = torch.from_numpy(C.distinct_importance(int(cu[-1]), seed=8)).float()
    flat, cu_k = mmrprune.select_varlen(x, w, torch.from_numpy(cu), k=6, method=method,
                                        order="selection", backend="triton", sim=gram_mode)
    for b, nb in enumerate(lens):
        got = (flat[cu_k[b]:cu_k[b + 1]] - int(cu[b])).tolist()
        s, e = int(cu[b]), int(cu[b + 1])
        exp = _expected(x[s:e], w[s:e], 6, method) if nb else []
        assert got == exp, (b, got, exp)


@inner
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("method", ("mmr", "divprune", "dpp"))
def inner_half_precision_certificate(method, dtype, gram_mode):
    """fp16 / bf16 rows: every step is an argmax within the spec's 4e-3 of the float64 replay."""
    x = torch.from_numpy(C.clustered_tokens(48, 32, batch=2, seed=4)).to(dtype)
    w = torch.from_numpy(C.distinct_importance(48, batch=2, seed=4)).to(dtype)
    out = _triton_select(x, w, k=8, method=method, sim=gram_mode)
    for b in range(2):
        C.check_certificate(x[b], w[b], out[b].numpy(), method, 0.5, tol=C.tol_for(dtype), k=8)


@inner
def inner_keep_ratio_and_position_order():
    import mmrprune
    x = torch.from_numpy(C.gaussian_tokens(30, 8, batch=2, seed=9)).float()
    w = torch.from_numpy(C.distinct_importance(30, batch=2, seed=9)).float()
    lengths = torch.tensor([30, 13])
    got = mmrprune.select(x, w, keep_ratio=0.25, lengths=lengths, backend="triton")
    want = mmrprune.select(x, w, keep_ratio=0.25, lengths=lengths, backend="numpy")
    assert torch.equal(got, torch.as_tensor(want))


@inner
def inner_float64_features_beyond_float32_range():
    """float64 rows far past float32's range (accepted: below float64's norm limit) pick what
    the unscaled rows pick; converting them straight to float32 gave inf and garbage."""
    import mmrprune
    g = torch.Generator().manual_seed(11)
    x, w = torch.randn(2, 24, 8, generator=g, dtype=torch.float64), torch.rand(2, 24, generator=g, dtype=torch.float64)
    for method in ("mmr", "dpp", "divprune"):
        want = mmrprune.select(x, w, k=6, method=method, backend="triton", order="selection")
        got = mmrprune.select(x * 2.0**300, w, k=6, method=method, backend="triton", order="selection")
        torch.testing.assert_close(got, want)


@inner
@pytest.mark.parametrize("seed", range(0, 120, 8))
def inner_rounds_equal_one_pick_per_step_on_fuzz_problems(seed):
    """``test_fuzz``'s hostile problems (duplicates, ties, zero vectors, padding): the round
    kernel (``ROUND = 8``) gives the one-pick-per-step kernel's picks (``ROUND = 1``), one
    round per pick at ``ROUND = 1``, and passes the float32 step certificate (as in
    ``test_fuzz``: float32 and float64 may break near-ties differently)."""
    from test_fuzz import _problem
    x, w, lengths, method, lam, k = _problem(seed)
    if method == "d2pruner":
        method = "mmr"
    xt, wt = torch.from_numpy(x).float(), None if w is None else torch.from_numpy(w).float()
    runs = {}
    for r in (1, 8):
        runs[r] = _triton_select(xt, wt, k=k, method=method, lam=lam, lengths=torch.from_numpy(lengths),
                                 return_stats=True, sim=GRAM_MODES[seed % 2], max_round=r)
    (one, one_stats), (rnd, rnd_stats) = runs[1], runs[8]
    assert torch.equal(one, rnd), (method, lam, one.tolist(), rnd.tolist())
    ks = torch.from_numpy(np.minimum(lengths, k))
    assert torch.equal(one_stats["rounds"], ks)
    assert (rnd_stats["rounds"] <= ks).all() and (rnd_stats["rounds"] >= (ks > 0).long()).all()
    for b in range(x.shape[0]):
        n = int(lengths[b])
        C.check_certificate(x[b, :n], None if w is None else w[b, :n], rnd[b].numpy(), method=method, lam=lam,
                            tol=1e-4, k=min(k, n))


@inner
@pytest.mark.parametrize("method", ("mmr", "fps"))
def inner_rounds_on_real_tokens(method, gram_mode):
    """DINOv2 image 0 (first 128 tokens, k = 32): the kernel's picks equal the reference's,
    it counts the rounds the float64 round rule needs, and they are far fewer than picks."""
    from mmrprune.data import load_dinov2
    d = load_dinov2()
    x = torch.from_numpy(d["tokens"][0, :128].astype(np.float32))
    w = torch.from_numpy(d["cls_attention"][0, :128]) if method == "mmr" else None
    out, stats = _triton_select(x, w, k=32, method=method, lam=0.5, return_stats=True, sim=gram_mode)
    want, rounds = ref.select_rounds(C.to_f64(x), C.to_f64(w), 32, method, 0.5, 8)
    assert out.tolist() == want.tolist()
    assert int(stats["rounds"]) == rounds and rounds < 32 * 0.5, (int(stats["rounds"]), rounds)
