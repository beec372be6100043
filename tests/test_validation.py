"""Bad input (docs/contract.md, "Bad input"): the right exception type, with a message naming the argument."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mmrprune
from mmrprune.backends import BUILD_HINTS
from mmrprune import dispatch
from mmrprune import reference as R

X = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(0))
W = torch.rand(2, 8, generator=torch.Generator().manual_seed(1))


def sel(features=X, importance=W, **kw):
    kw.setdefault("k", 3)
    kw.setdefault("backend", "torch")
    return mmrprune.select(features, importance, **kw)


def varlen(cu, features=None, importance=None, **kw):
    f = X.reshape(-1, 4) if features is None else features
    kw.setdefault("k", 2)
    kw.setdefault("backend", "torch")
    return mmrprune.select_varlen(f, importance, cu, **kw)


def no_k(**kw):
    return {"k": None, **kw}


CASES = [
    # id, exception, message fragment, call
    ("features-1d", ValueError, "features", lambda: sel(torch.randn(8), None)),
    ("features-4d", ValueError, "features", lambda: sel(torch.randn(1, 2, 8, 4), None)),
    ("features-n0", ValueError, "features", lambda: sel(torch.randn(0, 4), None)),
    ("features-batched-n0", ValueError, "features", lambda: sel(torch.randn(2, 0, 4), None)),
    ("features-d0", ValueError, "features", lambda: sel(torch.randn(3, 0), None)),
    ("features-int", TypeError, "features", lambda: sel(torch.ones(8, 4, dtype=torch.int64), None)),
    ("features-bool-numpy", TypeError, "features", lambda: sel(np.ones((8, 4), dtype=bool), None)),
    ("features-list", TypeError, "features", lambda: sel([[1.0, 2.0]], None)),
    ("importance-int", TypeError, "importance", lambda: sel(importance=torch.ones(2, 8, dtype=torch.int32))),
    ("importance-shape", ValueError, "importance", lambda: sel(importance=torch.rand(2, 7))),
    ("importance-ndim", ValueError, "importance", lambda: sel(importance=torch.rand(16))),
    ("importance-numpy-mix", TypeError, "importance", lambda: sel(importance=W.numpy())),
    ("importance-torch-mix", TypeError, "importance", lambda: sel(X.numpy(), W)),
    ("importance-meta-device", ValueError, "importance", lambda: sel(importance=torch.empty(2, 8, device="meta"))),
    ("k-0", ValueError, "k", lambda: sel(k=0)),
    ("k-negative", ValueError, "k", lambda: sel(k=-3)),
    ("k-float", TypeError, "k", lambda: sel(k=2.0)),
    ("k-bool", TypeError, "k", lambda: sel(k=True)),
    ("k-and-ratio", ValueError, "keep_ratio", lambda: sel(k=2, keep_ratio=0.5)),
    ("neither-k-nor-ratio", ValueError, "keep_ratio", lambda: sel(**no_k())),
    ("ratio-0", ValueError, "keep_ratio", lambda: sel(**no_k(keep_ratio=0.0))),
    ("ratio-1.5", ValueError, "keep_ratio", lambda: sel(**no_k(keep_ratio=1.5))),
    ("ratio-negative", ValueError, "keep_ratio", lambda: sel(**no_k(keep_ratio=-0.2))),
    ("ratio-nan", ValueError, "keep_ratio", lambda: sel(**no_k(keep_ratio=math.nan))),
    ("ratio-str", TypeError, "keep_ratio", lambda: sel(**no_k(keep_ratio="0.5"))),
    ("lam-negative", ValueError, "lam", lambda: sel(lam=-0.1)),
    ("lam-above-1", ValueError, "lam", lambda: sel(lam=1.1)),
    ("lam-nan", ValueError, "lam", lambda: sel(lam=math.nan)),
    ("lam-str", TypeError, "lam", lambda: sel(lam="0.5")),
    ("lengths-above-n", ValueError, "lengths", lambda: sel(lengths=torch.tensor([8, 9]))),
    ("lengths-negative", ValueError, "lengths", lambda: sel(lengths=torch.tensor([-1, 3]))),
    ("lengths-wrong-count", ValueError, "lengths", lambda: sel(lengths=torch.tensor([8, 8, 8]))),
    ("lengths-float", TypeError, "lengths", lambda: sel(lengths=torch.tensor([8.0, 3.0]))),
    ("lengths-2d", ValueError, "lengths", lambda: sel(lengths=torch.tensor([[8, 3]]))),
    ("lengths-single-image", ValueError, "lengths", lambda: sel(X[0], W[0], lengths=torch.tensor([8]))),
    ("cu-not-monotone", ValueError, "cu_seqlens", lambda: varlen(torch.tensor([0, 10, 6, 16]))),
    ("cu-not-from-0", ValueError, "cu_seqlens", lambda: varlen(torch.tensor([1, 8, 16]))),
    ("cu-not-to-T", ValueError, "cu_seqlens", lambda: varlen(torch.tensor([0, 8, 15]))),
    ("cu-past-T", ValueError, "cu_seqlens", lambda: varlen(torch.tensor([0, 8, 17]))),
    ("cu-too-short", ValueError, "cu_seqlens", lambda: varlen(torch.tensor([0]))),
    ("cu-float", TypeError, "cu_seqlens", lambda: varlen(torch.tensor([0.0, 16.0]))),
    ("varlen-3d-features", ValueError, "features", lambda: varlen(torch.tensor([0, 8]), features=X)),
    ("method-unknown", ValueError, "method", lambda: sel(method="random")),
    ("method-none", ValueError, "method", lambda: sel(method=None)),
    ("backend-unknown", ValueError, "backend", lambda: sel(backend="jax")),
    ("order-unknown", ValueError, "order", lambda: sel(order="sorted")),
    ("features-nan", ValueError, "features", lambda: sel(X.clone().index_put_((torch.tensor([1]),), torch.tensor(math.nan)))),
    ("features-inf", ValueError, "features", lambda: sel(torch.where(X > 1.5, math.inf, X))),
    ("importance-nan", ValueError, "importance", lambda: sel(importance=torch.where(W > 0.5, math.nan, W))),
    ("importance-neg-inf", ValueError, "importance", lambda: sel(importance=torch.where(W > 0.5, -math.inf, W))),
    ("features-nan-numpy", ValueError, "features", lambda: sel(np.full((8, 4), np.nan, dtype=np.float32), None)),
    ("params-unknown-mmr", TypeError, "alpha", lambda: sel(method="mmr", alpha=0.5)),
    ("params-unknown-d2pruner", TypeError, "sigma", lambda: sel(method="d2pruner", grid=(2, 4), sigma=1.0)),
    ("d2pruner-no-grid", ValueError, "grid", lambda: sel(method="d2pruner")),
    ("d2pruner-grid-mismatch", ValueError, "grid", lambda: sel(method="d2pruner", grid=(3, 3))),
    ("d2pruner-grid-bad", ValueError, "grid", lambda: sel(method="d2pruner", grid=(0, 8))),
    ("d2pruner-alpha-range", ValueError, "alpha", lambda: sel(method="d2pruner", alpha=1.5)),
    ("d2pruner-pivot-range", ValueError, "pivot_ratio", lambda: sel(method="d2pruner", alpha=1.0, pivot_ratio=-0.1)),
    ("d2pruner-radius", ValueError, "radius", lambda: sel(method="d2pruner", grid=(2, 4), radius=-1)),
    ("d2pruner-tau-nan", ValueError, "tau", lambda: sel(method="d2pruner", grid=(2, 4), tau=math.nan)),
    ("check-finite-not-bool", TypeError, "check_finite", lambda: sel(check_finite="no")),
]


@pytest.mark.parametrize("exc,fragment,call", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(exc, fragment, call):
    with pytest.raises(exc) as info:
        call()
    assert fragment in str(info.value), f"message does not name {fragment!r}: {info.value}"


def test_messages_say_what_was_received():
    with pytest.raises(ValueError, match=r"1\.1"):
        sel(lam=1.1)
    with pytest.raises(ValueError, match=r"\(8,\)|\[8\]|8"):
        sel(torch.randn(8), None)
    with pytest.raises(TypeError, match="int64"):
        sel(torch.ones(8, 4, dtype=torch.int64), None)


def test_inputs_not_modified_by_rejected_call():
    x = X.clone()
    x[0, 0, 0] = math.nan
    x0 = x.clone()
    with pytest.raises(ValueError):
        sel(x)
    assert torch.equal(torch.isnan(x), torch.isnan(x0)) and torch.equal(x.nan_to_num(), x0.nan_to_num())


def test_unavailable_backend_is_runtime_error_with_how_to():
    missing = [name for name in dispatch.BACKENDS if not dispatch.status(name)[0]]
    if not missing:
        pytest.skip("every backend is available on this machine")
    for name in missing:
        with pytest.raises(RuntimeError) as info:
            mmrprune.select(X, W, k=3, backend=name)
        msg = str(info.value)
        assert name in msg and "not available" in msg
        hint = dispatch.how_to_get(name, dispatch.status(name)[1])
        if hint:
            assert hint in msg


def test_built_cuda_extension_without_a_gpu_gives_one_hint_not_rebuild(monkeypatch):
    """An extension that is built but has no GPU must not also be told to rebuild."""
    from mmrprune.backends import Backend
    built = Backend(name="cuda", methods=("mmr",), device_types=("cuda",), select=None,
                    status=lambda: (False, "torch.cuda is not available; the extension is built: run on a machine with a CUDA GPU"))
    monkeypatch.setattr(dispatch, "load", lambda name: (built, "") if name == "cuda" else (None, "no"))
    with pytest.raises(RuntimeError) as info:
        dispatch.resolve("cuda", "cpu", "mmr")
    msg = str(info.value)
    assert "run on a machine with a CUDA GPU" in msg and "rebuild" not in msg and BUILD_HINTS["cuda"] not in msg
    # a missing module still gets the build hint
    monkeypatch.setattr(dispatch, "load", lambda name: (None, dispatch.NOT_INSTALLED))
    with pytest.raises(RuntimeError, match="to get it, rebuild"):
        dispatch.resolve("cuda", "cpu", "mmr")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_backend_on_cpu_machine():
    with pytest.raises(RuntimeError, match="cuda") as info:
        mmrprune.select(X, W, k=3, backend="cuda")
    assert "build" in str(info.value) or "run on" in str(info.value) or "MMRPRUNE_CUDA" in str(info.value)


def test_backend_cannot_take_device():
    """A backend asked for by name that does not take this device type is a RuntimeError."""
    for name in dispatch.BACKENDS:
        ok, _ = dispatch.status(name)
        backend, _ = dispatch.load(name)
        if ok and "cpu" not in backend.device_types:
            with pytest.raises(RuntimeError, match=name):
                mmrprune.select(X, W, k=3, backend=name)


def test_check_finite_false_skips_the_check():
    x = X.clone()
    x[1, 2, 3] = math.nan
    w = W.clone()
    w[0, 1] = math.inf
    # CPU input is always checked (the check costs no device sync there)...
    with pytest.raises(ValueError, match="features"):
        mmrprune.select(x, W, k=3, backend="torch")
    # ...and check_finite=False must not crash or hang, whatever it returns for undefined input
    for backend in ("torch", "numpy"):
        try:
            out = mmrprune.select(x, w, k=3, backend=backend, check_finite=False)
        except ValueError as exc:   # CPU input may still be checked: then it names the argument
            assert "features" in str(exc) or "importance" in str(exc)
        else:
            assert out.shape == (2, 3) and out.dtype == torch.int64
    # finite input with check_finite=False gives the normal answer
    np.testing.assert_array_equal(mmrprune.select(X, W, k=3, backend="torch", check_finite=False),
                                  mmrprune.select(X, W, k=3, backend="torch"))


def test_cu_seqlens_int32_and_lists_are_accepted():
    idx, cu_k = varlen(torch.tensor([0, 5, 16], dtype=torch.int32))
    assert cu_k.tolist() == [0, 2, 4] and idx.shape == (4,)
    idx2, _ = varlen([0, 5, 16])
    assert torch.equal(idx, idx2)


def test_lengths_int32_numpy_and_list():
    a = sel(lengths=torch.tensor([8, 3], dtype=torch.int32))
    b = sel(lengths=[8, 3])
    c = sel(X.numpy(), W.numpy(), lengths=np.array([8, 3], dtype=np.int32))
    assert torch.equal(a, b)
    np.testing.assert_array_equal(c, a.numpy())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_mismatch_and_unchecked_call():
    xc, wc = X.cuda(), W.cuda()
    with pytest.raises(ValueError, match="importance"):
        mmrprune.select(xc, W, k=3)
    with pytest.raises(ValueError, match="lengths"):
        mmrprune.select(xc, wc, k=3, lengths=torch.tensor([8, 9], device="cuda"))
    with pytest.raises(ValueError, match="features"):
        mmrprune.select(torch.full_like(xc, math.nan), wc, k=3)
    out = mmrprune.select(torch.full_like(xc, math.nan), wc, k=3, check_finite=False)
    torch.cuda.synchronize()
    assert out.shape == (2, 3) and out.device.type == "cuda"


@pytest.mark.parametrize("method", R.METHODS)
def test_unchecked_non_finite_input_gives_in_range_distinct_picks(method):
    """check_finite=False skips the NaN/Inf scan (also on CPU); undefined input must still
    give k distinct in-range, non-padding picks per image, never a crash or hang."""
    torch.manual_seed(0)
    x, w = torch.randn(3, 40, 16), torch.rand(3, 40)
    x[0, 5] = math.nan
    x[1] = math.nan
    w[2, 3] = math.inf
    lengths = [40, 33, 40]
    params = {"alpha": 1.0} if method == "d2pruner" else {}
    for name in dispatch.BACKENDS:
        ok, _ = dispatch.status(name)
        backend, _ = dispatch.load(name)
        if not ok or "cpu" not in backend.device_types or method not in backend.methods:
            continue
        out = mmrprune.select(x, w, k=7, method=method, backend=name, lengths=lengths,
                              check_finite=False, order="selection", **params)
        assert out.shape == (3, 7) and out.dtype == torch.int64
        for row, n in zip(out.tolist(), lengths):
            assert all(0 <= i < n for i in row) and len(set(row)) == 7, (name, row)


def test_lam_given_to_a_method_that_ignores_it_warns():
    import warnings
    x, w = np.random.default_rng(0).random((12, 4)), np.random.default_rng(1).random(12)
    with pytest.warns(UserWarning, match=r"lam=0.3 is ignored by method='divprune': only mmr and hybrid use lam"):
        a = mmrprune.select(x, w, k=4, method="divprune", lam=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no lam, or a method that uses it: silent
        assert np.array_equal(mmrprune.select(x, w, k=4, method="divprune"), a)
        mmrprune.select(x, w, k=4, method="mmr", lam=0.3)
        mmrprune.select_varlen(x, w, np.array([0, 5, 12]), k=2, method="hybrid", lam=0.5)
    with pytest.warns(UserWarning, match="ignored by method='topk'"):
        mmrprune.select_varlen(x, w, np.array([0, 5, 12]), k=2, method="topk", lam=0.5)


# ----------------------------------------------------------------------------- kernel tuning: sim=, max_round=
TUNED = ("cuda", "cuda_emu", "triton")      # the backends with kernel variants to choose from


@pytest.mark.parametrize("entry", ["select", "select_varlen", "prune", "workspace_bytes"])
def test_tuning_values_are_checked_naming_the_allowed_ones(entry):
    call = {"select": lambda **kw: sel(**kw),
            "select_varlen": lambda **kw: varlen(torch.tensor([0, 8, 16]), **kw),
            "prune": lambda **kw: mmrprune.prune(X, W, k=3, backend="torch", **kw),
            "workspace_bytes": lambda **kw: mmrprune.workspace_bytes(X, W, k=3, backend="torch", **kw)}[entry]
    for bad in ("row", "GRAM", "1", None, 1):
        with pytest.raises(ValueError, match=r"sim: expected one of \['auto', 'gram', 'rows'\]"):
            call(sim=bad)
    for bad in (0, 9, -1, 2.0, True, "4"):
        with pytest.raises(ValueError, match=r"max_round: expected None \(the kernel's default, 8\) or an int in "
                                             r"\[1, 8\]"):
            call(max_round=bad)
    with pytest.raises(TypeError, match=r"did you mean max_round="):
        call(max_rounds=2)


@pytest.mark.parametrize("backend", ["cpu", "torch", "numpy"])
def test_tuning_is_accepted_and_ignored_by_backends_without_kernel_variants(backend):
    if not dispatch.status(backend)[0]:
        pytest.skip(f"backend {backend} unavailable")
    assert dispatch.loaded(backend).options == ()
    plain = sel(backend=backend, k=5, method="mmr")
    for sim in ("rows", "gram"):
        for r in (1, 8):
            assert torch.equal(sel(backend=backend, k=5, method="mmr", sim=sim, max_round=r), plain)


def test_kernel_backends_take_both_tuning_keywords():
    from mmrprune.backends import TUNING, cuda_backend, cuda_emu_backend, triton_backend
    for module in (cuda_backend, cuda_emu_backend, triton_backend):
        assert module.BACKEND.options == TUNING, module.__name__
    assert set(TUNED) == {m.BACKEND.name for m in (cuda_backend, cuda_emu_backend, triton_backend)}


# The environment variables that chose kernel variants before sim= and max_round= existed.
OLD_TUNING_VARS = {"MMRPRUNE_" + name: value for name, value in
                   (("CUDA_GRAM", "0"), ("CUDA_ROUND", "1"), ("TRITON_GRAM", "0"), ("TRITON_ROUND", "1"))}


def test_old_tuning_variables_change_nothing(monkeypatch):
    """Each value would have changed the call when read: row mode (a smaller workspace than the
    Gram the heuristic picks here) and one pick per round (rounds == k)."""
    from mmrprune.backends import triton_backend
    x = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(3))
    meta = x.to("meta")   # sized as on a GPU, with no GPU here
    tuned = [b for b in TUNED if b != "triton" or triton_backend._kernels is not None]
    sizes = {}
    for backend in tuned:
        sizes[backend] = mmrprune.workspace_bytes(meta, None, k=16, backend=backend)
        assert sizes[backend] > mmrprune.workspace_bytes(meta, None, k=16, backend=backend, sim="rows"), backend
    emu = dispatch.status("cuda_emu")[0]
    if emu:
        picks, stats = mmrprune.select(x, None, k=16, method="fps", backend="cuda_emu", return_stats=True)
        assert (stats["rounds"] < 16).all()
    for name, value in OLD_TUNING_VARS.items():
        monkeypatch.setenv(name, value)
    for backend in tuned:
        assert mmrprune.workspace_bytes(meta, None, k=16, backend=backend) == sizes[backend], backend
    if emu:
        again, again_stats = mmrprune.select(x, None, k=16, method="fps", backend="cuda_emu", return_stats=True)
        assert torch.equal(again, picks) and torch.equal(again_stats["rounds"], stats["rounds"])


def test_no_source_reads_the_old_tuning_variables():
    import pathlib
    root = pathlib.Path(mmrprune.__file__).resolve().parent.parent
    found = []
    for folder, patterns in (("mmrprune", ("*.py",)), ("csrc", ("*.cu", "*.h", "*.cpp", "*.py")), ("bench", ("*.py",))):
        for pattern in patterns:
            for path in (root / folder).rglob(pattern):
                text = path.read_text(errors="replace")
                found += [f"{path.relative_to(root)}: {name}" for name in OLD_TUNING_VARS if name in text]
    assert not found, found
