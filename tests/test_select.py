"""Every method on every (backend, device) pair against the float64 reference.

* exact indices on inputs whose reference score gaps exceed the tolerance;
* the step certificate on the real DINOv2 tokens in float32/float16/bfloat16;
* batching, padding (``lengths``), varlen, ``order``, ``keep_ratio``, return
  types, :func:`mmrprune.prune`, and that inputs are never modified.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mmrprune
from mmrprune import reference as R

import certify as C

METHODS = R.METHODS
TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32,
                "float16": torch.float16, "bfloat16": torch.bfloat16}


def method_kwargs(method, n, grid=None, **over):
    """Method parameters for a test image of n tokens (d2pruner needs its grid)."""
    if method != "d2pruner":
        return {}
    if grid is None:
        grid = next((h, n // h) for h in range(int(np.sqrt(n)), 0, -1) if n % h == 0)
    return {"grid": grid, **over}


def ref_batch(x, w, ks, method, lam, params, lengths=None):
    """Reference selection order for each image of a [B, N, D] float64 array (-1 padded);
    image b is its first lengths[b] tokens."""
    k_max = max(ks) if len(ks) else 0
    out = np.full((len(ks), k_max), -1, dtype=np.int64)
    for b, k in enumerate(ks):
        if k:
            L = x.shape[1] if lengths is None else lengths[b]
            wb = None if w is None else w[b, :L]
            out[b, :k] = R.select_one(x[b, :L], wb, k, method, lam, **params)
    return out


def separated_case(method, batch, n, d, k, lam, params, dtype, min_gap=1e-3, clustered=False):
    """Random [B, N, D] tokens (values exactly representable in ``dtype``) and distinct
    importance, one seed per image chosen so that the reference margin is >= min_gap."""
    xs, ws = [], []
    seed = 0
    while len(xs) < batch:
        assert seed < 400, f"could not find well-separated inputs for {method}"
        gen = C.clustered_tokens if clustered else C.gaussian_tokens
        x = torch.from_numpy(gen(n, d, seed=seed)).to(dtype).to(torch.float64).numpy()
        w = torch.from_numpy(C.distinct_importance(n, seed=seed)).to(dtype).to(torch.float64).numpy()
        if C.reference_margin(x, w, k, method, lam, **params) >= min_gap:
            xs.append(x)
            ws.append(w)
        seed += 1
    return np.stack(xs), np.stack(ws)


# ----------------------------------------------------------------------------- certificate self-check
def test_certificate_rejects_wrong_picks(dinov2):
    x, w = dinov2["tokens"][0, :256], dinov2["cls_attention"][0, :256]
    good = R.select_one(x.astype(np.float64), w, 16, "mmr", 0.5)
    C.check_certificate(x, w, good, "mmr", 0.5, tol=0.0, k=16)
    swapped = good.copy()
    swapped[[3, 9]] = swapped[[9, 3]]
    with pytest.raises(AssertionError, match="step 3"):
        C.check_certificate(x, w, swapped, "mmr", 0.5, tol=1e-4, k=16)
    with pytest.raises(AssertionError, match="already picked"):
        C.check_certificate(x, w, np.r_[good[:5], good[2]], "mmr", 0.5, tol=1e-4)
    with pytest.raises(AssertionError, match="count"):
        C.check_certificate(x, w, good[:10], "mmr", 0.5, tol=1e-4, k=16)
    with pytest.raises(AssertionError, match="padding"):
        C.check_certificate(x, w, np.r_[good[:3], -1, good[3:5]], "mmr", 0.5, tol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_certificate_rejects_other_methods_picks(dinov2, method):
    """The reference's picks for one method do not certify as another (the check has teeth)."""
    x, w = dinov2["tokens"][1, :256].astype(np.float64), dinov2["cls_attention"][1, :256]
    params = method_kwargs(method, 256)
    other = {"mmr": "topk", "divprune": "mmr", "topk": "fps", "fps": "topk",
             "hybrid": "divprune", "dpp": "fps", "d2pruner": "fps"}[method]
    picks = R.select_one(x, w, 24, other, 0.5, **method_kwargs(other, 256))
    C.check_certificate(x, w, R.select_one(x, w, 24, method, 0.5, **params), method, 0.5, tol=0.0, **params)
    with pytest.raises(AssertionError, match="step"):
        C.check_certificate(x, w, picks, method, 0.5, tol=1e-4, **params)


# ----------------------------------------------------------------------------- exact on separated inputs
EXACT_CASES = [
    ("mmr", 0.5, {}), ("mmr", 0.2, {}), ("divprune", 0.5, {}), ("topk", 0.5, {}), ("fps", 0.5, {}),
    ("hybrid", 0.5, {}), ("hybrid", 0.25, {}), ("dpp", 0.5, {}),
    ("d2pruner", 0.5, {"tau": 0.3}), ("d2pruner", 0.5, {"alpha": 1.0, "tau": 0.2, "grid": None}),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("method,lam,over", EXACT_CASES,
                         ids=[f"{m}-lam{l}" + ("-" + "-".join(f"{a}{b}" for a, b in o.items()) if o else "")
                              for m, l, o in EXACT_CASES])
def test_exact_on_separated_inputs(backend_device, method, lam, over, dtype):
    backend_device.require(method)
    n, d, k, bsz = 48, 64, 12, 3
    params = {**method_kwargs(method, n, grid=(6, 8)), **over} if method == "d2pruner" else {}
    if params.get("grid", 1) is None:
        params.pop("grid")
    tdt = TORCH_DTYPES[dtype]
    x, w = separated_case(method, bsz, n, d, k, lam, params, tdt)
    want = ref_batch(x, w, [k] * bsz, method, lam, params)
    for b in range(bsz):  # the separation claim itself: the reference certifies with tol 0
        C.check_certificate(x[b], w[b], want[b], method, lam, tol=0.0, k=k, **params)
    got = backend_device.select(backend_device.tensor(x, tdt), backend_device.tensor(w, tdt), k=k, lam=lam,
                                method=method, order="selection", **params)
    assert got.dtype == torch.int64 and tuple(got.shape) == (bsz, k)
    np.testing.assert_array_equal(got.cpu().numpy(), want)


# ----------------------------------------------------------------------------- certificate on real tokens
REAL_CASES = [(m, k, lam) for m in METHODS for (k, lam) in [(64, 0.5), (256, 0.1)]
              if not (m in ("divprune", "topk", "fps", "dpp", "d2pruner") and lam != 0.5)]
REAL_CASES += [("divprune", 256, 0.5), ("dpp", 192, 0.5), ("d2pruner", 200, 0.5)]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("method,k,lam", REAL_CASES, ids=[f"{m}-k{k}-lam{l}" for m, k, l in REAL_CASES])
def test_certificate_on_real_tokens(backend_device, dinov2, method, k, lam, dtype):
    backend_device.require(method)
    images = [0, 5] if k <= 64 else [3]
    tdt = TORCH_DTYPES[dtype]
    feats = torch.from_numpy(dinov2["tokens"][images]).to(tdt)
    imp = torch.from_numpy(dinov2["cls_attention"][images])
    params = {"grid": (32, 32)} if method == "d2pruner" else {}
    got = backend_device.select(backend_device.tensor(feats), backend_device.tensor(imp), k=k, lam=lam,
                                method=method, order="selection", **params).cpu()
    assert tuple(got.shape) == (len(images), k)
    for b in range(len(images)):
        C.check_certificate(feats[b], imp[b], got[b].numpy(), method, lam, tol=C.tol_for(dtype), k=k, **params)


# ----------------------------------------------------------------------------- batching and padding
@pytest.mark.parametrize("method", METHODS)
def test_padded_lengths(backend_device, method):
    backend_device.require(method)
    n, d, k = 16, 8, 5
    x = C.clustered_tokens(n, d, batch=4, seed=3)
    w = C.distinct_importance(n, batch=4, seed=3)
    lengths = [16, 3, 0, 9]
    if method == "d2pruner":
        params = {"alpha": 1.0, "tau": 0.9}   # a grid cannot match ragged lengths
    else:
        params = {}
    # the padding rows are garbage (NaN would trip the finite check, so use huge values)
    xp = x.copy()
    wp = w.copy()
    for b, L in enumerate(lengths):
        xp[b, L:] = 1e3
        wp[b, L:] = 1e6
    got = backend_device.select(backend_device.tensor(xp, torch.float64), backend_device.tensor(wp, torch.float64),
                                k=k, method=method, order="selection",
                                lengths=backend_device.tensor(np.array(lengths)), **params).cpu().numpy()
    ks = [min(k, L) for L in lengths]
    want = ref_batch(x, w, ks, method, 0.5, params, lengths)
    assert got.shape == (4, k)  # padded input with k: static width min(k, N)
    np.testing.assert_array_equal(got[:, :want.shape[1]], want)
    np.testing.assert_array_equal(got[2], -1)
    assert (got[1, 3:] == -1).all()


@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_per_image(backend_device, method):
    backend_device.require(method)
    n, d, k = 36, 16, 7
    x = C.gaussian_tokens(n, d, batch=3, seed=11)
    w = C.distinct_importance(n, batch=3, seed=11)
    params = method_kwargs(method, n)
    batched = backend_device.select(backend_device.tensor(x), backend_device.tensor(w), k=k, method=method,
                                    order="selection", **params).cpu().numpy()
    for b in range(3):
        single = backend_device.select(backend_device.tensor(x[b]), backend_device.tensor(w[b]), k=k,
                                       method=method, order="selection", **params).cpu().numpy()
        assert single.shape == (k,)
        np.testing.assert_array_equal(batched[b], single)
        np.testing.assert_array_equal(single, R.select_one(x[b], w[b], k, method, 0.5, **params))


@pytest.mark.parametrize("order", ["position", "selection"])
@pytest.mark.parametrize("method", METHODS)
def test_varlen(backend_device, method, order):
    backend_device.require(method)
    d = 8
    seg = [10, 0, 15, 1]
    cu = np.concatenate([[0], np.cumsum(seg)]).astype(np.int32)
    t = int(cu[-1])
    x = C.clustered_tokens(t, d, seed=5)
    w = C.distinct_importance(t, seed=5)
    params = {"alpha": 1.0, "tau": 0.9} if method == "d2pruner" else {}
    k = 4
    idx, cu_k = backend_device.select_varlen(backend_device.tensor(x), backend_device.tensor(w),
                                             backend_device.tensor(cu), k=k, method=method, order=order, **params)
    assert isinstance(idx, torch.Tensor) and idx.dtype == torch.int64 and cu_k.dtype == torch.int64
    idx, cu_k = idx.cpu().numpy(), cu_k.cpu().numpy()
    ks = [min(k, L) for L in seg]
    np.testing.assert_array_equal(cu_k, np.concatenate([[0], np.cumsum(ks)]))
    assert idx.shape == (sum(ks),)
    for b in range(len(seg)):
        part = idx[cu_k[b]:cu_k[b + 1]]
        s, e = cu[b], cu[b + 1]
        if ks[b] == 0:
            assert part.size == 0
            continue
        want = R.select_one(x[s:e], w[s:e], ks[b], method, 0.5, **params) + s
        if order == "position":
            want = np.sort(want)
        np.testing.assert_array_equal(part, want)


def test_varlen_numpy_in_numpy_out(backend_device):
    if backend_device.device != "cpu":
        pytest.skip("numpy input lives on the CPU")
    x = C.gaussian_tokens(12, 4, seed=1)
    cu = np.array([0, 5, 12], dtype=np.int64)
    idx, cu_k = backend_device.select_varlen(x.astype(np.float32), None, cu, keep_ratio=0.5, method="divprune")
    assert isinstance(idx, np.ndarray) and isinstance(cu_k, np.ndarray)
    assert idx.dtype == np.int64 and cu_k.dtype == np.int64
    np.testing.assert_array_equal(cu_k, [0, 2, 6])  # 2.5 -> 2, 3.5 -> 4
    np.testing.assert_array_equal(idx[:2], np.sort(R.select_one(x[:5], None, 2, "divprune")))
    np.testing.assert_array_equal(idx[2:], np.sort(R.select_one(x[5:], None, 4, "divprune")) + 5)


@pytest.mark.parametrize("method", ["mmr", "dpp", "d2pruner"])
def test_order_position_is_sorted_selection(backend_device, method):
    backend_device.require(method)
    n = 25
    x = C.gaussian_tokens(n, 12, batch=2, seed=2)
    w = C.distinct_importance(n, batch=2, seed=2)
    params = method_kwargs(method, n)
    lengths = backend_device.tensor(np.array([25, 4]))
    kw = dict(k=6, method=method, lengths=lengths, **params) if method != "d2pruner" else \
        dict(k=6, method=method, alpha=1.0, tau=0.5, lengths=lengths)
    sel = backend_device.select(backend_device.tensor(x), backend_device.tensor(w), order="selection", **kw).cpu()
    pos = backend_device.select(backend_device.tensor(x), backend_device.tensor(w), order="position", **kw).cpu()
    default = backend_device.select(backend_device.tensor(x), backend_device.tensor(w), **kw).cpu()
    torch.testing.assert_close(pos, default, rtol=0, atol=0)
    assert pos.tolist()[1][4:] == [-1, -1]
    for row_s, row_p in zip(sel.tolist(), pos.tolist()):
        kept = sorted(i for i in row_s if i >= 0)
        assert row_p == kept + [-1] * (len(row_s) - len(kept))


@pytest.mark.parametrize("n,ratio,want", [(10, 0.25, 2), (6, 0.25, 2), (14, 0.25, 4), (2, 0.25, 1),
                                          (10, 1.0, 10), (7, 0.5, 4), (9, 0.5, 4), (1, 0.01, 1)],
                         ids=lambda v: str(v))
def test_keep_ratio_rounding(backend_device, n, ratio, want):
    x = backend_device.tensor(C.gaussian_tokens(n, 4, seed=n))
    w = backend_device.tensor(C.distinct_importance(n, seed=n))
    got = backend_device.select(x, w, keep_ratio=ratio, method="topk" if "topk" in backend_device.methods else "mmr")
    assert tuple(got.shape) == (want,)
    assert R.budget(n, keep_ratio=ratio) == want


def test_keep_ratio_with_lengths(backend_device):
    x = backend_device.tensor(C.gaussian_tokens(14, 4, batch=3, seed=0))
    lengths = backend_device.tensor(np.array([14, 6, 0]))
    got = backend_device.select(x, None, keep_ratio=0.25, lengths=lengths, method="mmr").cpu().numpy()
    assert got.shape == (3, 4)
    assert [(r >= 0).sum() for r in got] == [4, 2, 0]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_numpy_in_numpy_out(backend_device, dtype):
    if backend_device.device != "cpu":
        pytest.skip("numpy input lives on the CPU")
    x = C.gaussian_tokens(20, 6, batch=2, seed=4).astype(dtype)
    w = C.distinct_importance(20, batch=2, seed=4).astype(np.float32)
    got = backend_device.select(x, w, k=5)
    assert isinstance(got, np.ndarray) and got.dtype == np.int64 and got.shape == (2, 5)
    single = backend_device.select(x[0], w[0], k=5)
    assert isinstance(single, np.ndarray) and single.shape == (5,)
    np.testing.assert_array_equal(single, got[0])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_torch_in_torch_out(backend_device, dtype):
    x = backend_device.tensor(C.gaussian_tokens(20, 6, batch=2, seed=4), TORCH_DTYPES[dtype])
    w = backend_device.tensor(C.distinct_importance(20, batch=2, seed=4), torch.float32)
    got = backend_device.select(x, w, k=5)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.int64
    assert got.device.type == backend_device.device and tuple(got.shape) == (2, 5)


def test_prune_gathers_positional_order(backend_device):
    x = C.gaussian_tokens(12, 5, batch=2, seed=9).astype(np.float32)
    w = C.distinct_importance(12, batch=2, seed=9).astype(np.float32)
    lengths = np.array([12, 2])
    xt, wt = backend_device.tensor(x), backend_device.tensor(w)
    kept, idx = mmrprune.prune(xt, wt, k=4, lengths=backend_device.tensor(lengths), backend=backend_device.name)
    idx_c = idx.cpu().numpy()
    assert kept.shape == (2, 4, 5) and kept.dtype == xt.dtype
    want0 = np.sort(R.select_one(x[0], w[0], 4, "mmr"))
    np.testing.assert_array_equal(idx_c[0], want0)
    np.testing.assert_array_equal(kept[0].cpu().numpy(), x[0][want0])
    np.testing.assert_array_equal(idx_c[1, 2:], [-1, -1])
    np.testing.assert_array_equal(kept[1, :2].cpu().numpy(), x[1][np.sort(idx_c[1, :2])])
    assert (kept[1, 2:] == 0).all()
    if backend_device.device == "cpu":
        kept_np, idx_np = mmrprune.prune(x, w, k=4, lengths=lengths, backend=backend_device.name)
        assert isinstance(kept_np, np.ndarray) and kept_np.dtype == np.float32
        np.testing.assert_array_equal(idx_np, idx_c)
        np.testing.assert_array_equal(kept_np, kept.cpu().numpy())
    with pytest.raises(TypeError, match="order"):
        mmrprune.prune(xt, wt, k=4, order="selection", backend=backend_device.name)


@pytest.mark.parametrize("method", METHODS)
def test_inputs_unchanged(backend_device, method):
    backend_device.require(method)
    n = 16
    x = backend_device.tensor(C.clustered_tokens(n, 8, batch=2, seed=6), torch.float32)
    w = backend_device.tensor(C.distinct_importance(n, batch=2, seed=6), torch.float32)
    lengths = backend_device.tensor(np.array([16, 16]))
    x0, w0, l0 = x.clone(), w.clone(), lengths.clone()
    params = method_kwargs(method, n)
    backend_device.select(x, w, k=6, method=method, lengths=lengths, **params)
    backend_device.select(x, w, keep_ratio=0.3, method=method, order="selection", **params)
    mmrprune.prune(x, w, k=3, method=method, backend=backend_device.name, **params)
    cu = backend_device.tensor(np.array([0, 7, 16]))
    cu0 = cu.clone()
    xf, wf = x[0].contiguous(), w[0].contiguous()
    xf0, wf0 = xf.clone(), wf.clone()
    backend_device.select_varlen(xf, wf, cu, k=3, method=method,
                                 **({"alpha": 1.0} if method == "d2pruner" else {}))
    for a, b in [(x, x0), (w, w0), (lengths, l0), (cu, cu0), (xf, xf0), (wf, wf0)]:
        assert torch.equal(a, b)
    if backend_device.device == "cpu":
        xn, wn = x.numpy().copy(), w.numpy().copy()
        xn0, wn0 = xn.copy(), wn.copy()
        backend_device.select(xn, wn, k=6, method=method, **params)
        np.testing.assert_array_equal(xn, xn0)
        np.testing.assert_array_equal(wn, wn0)
