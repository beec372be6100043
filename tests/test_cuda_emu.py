"""Backend ``cuda_emu``: the CUDA kernels (csrc/cuda, unmodified) executed on CPU tensors.

What the GPU suite (test_cuda_backend.py, the ``target`` fixture) does not already cover:
the bundled real tokens for every fused method, dtype and similarity mode against the
reference; several thread schedules; ``check_finite=False`` in both modes; dynamic shared
memory above 48 KiB (the opt-in path, and its error past the device limit); misaligned rows
(the scalar-load path); the backend's registration.  Sanitizers and the mutation test:
test_cuda_emu_native.py.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

import tested_package
import torch

import certify
import mmrprune
from mmrprune import dispatch
from mmrprune import reference as R
from mmrprune.backends import cuda_backend as cb
from mmrprune.backends import cuda_emu_backend as emu

pytestmark = pytest.mark.skipif(not emu.status()[0], reason=f"backend cuda_emu unavailable: {emu.status()[1]}")

FUSED = ["mmr", "fps", "hybrid", "divprune", "dpp", "topk"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture(params=["rows", "gram"], ids=["row", "gram"])
def sim_mode(request):
    return request.param


def _select(x, w, method, **kw):
    return mmrprune.select(x, w, method=method, backend="cuda_emu", order="selection", **kw)


def _agrees_with_reference(x, w, picks, method, lam, k, dtype):
    """Exact reference indices when every reference step's margin exceeds the dtype's
    tolerance; otherwise (a near-tie the fp32 kernel may break either way) the certificate."""
    x64 = certify.to_f64(x)
    w64 = None if w is None else certify.to_f64(w)
    tol = certify.tol_for(dtype)
    if certify.reference_margin(x64, w64, k, method, lam) > tol:
        np.testing.assert_array_equal(picks, R.select_one(x64, w64, k, method, lam))
        return "exact"
    certify.check_certificate(x64, w64, picks, method, lam, tol=tol, k=k)
    return "certificate"


# ----------------------------------------------------------------------------- real tokens
# Two of the eight bundled DINOv2 images (1024 tokens x 384 each), k = 32: every fused method,
# dtype and similarity mode is 30 emulated launches.
REAL_IMAGES = [0, 5]
REAL_K = 32


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("method", FUSED)
def test_real_tokens_agree_with_reference(dinov2, sim_mode, method, dtype):
    feats = torch.from_numpy(dinov2["tokens"][REAL_IMAGES]).to(DTYPES[dtype])
    imp = torch.from_numpy(dinov2["cls_attention"][REAL_IMAGES])
    lam = 0.5
    got = _select(feats, imp, method, k=REAL_K, lam=lam, sim=sim_mode)
    assert tuple(got.shape) == (len(REAL_IMAGES), REAL_K)
    for b in range(len(REAL_IMAGES)):
        _agrees_with_reference(feats[b], imp[b], got[b].numpy(), method, lam, REAL_K, dtype)


# ----------------------------------------------------------------------------- thread schedules
@pytest.mark.parametrize("method", FUSED)
def test_thread_schedules_give_the_same_picks(sim_mode, monkeypatch, method):
    x = torch.from_numpy(certify.clustered_tokens(90, 40, batch=2, seed=8)).to(torch.bfloat16)
    w = torch.from_numpy(certify.distinct_importance(90, batch=2, seed=8)).float()
    lengths = torch.tensor([90, 37])
    picks = {}
    for sched in ("linear", "reverse", "random:7", "random:2024"):
        monkeypatch.setenv("CUDA_EMU_SCHED", sched)
        picks[sched] = _select(x, w, method, k=12, lengths=lengths, sim=sim_mode)
    for sched, p in picks.items():
        assert torch.equal(p, picks["linear"]), f"{sched}: {p.tolist()} vs linear {picks['linear'].tolist()}"
    for b, n in enumerate(lengths.tolist()):
        certify.check_certificate(x[b, :n], w[b, :n], picks["linear"][b].numpy(), method, 0.5,
                                  tol=certify.tol_for(x.dtype), k=12)


def test_an_unknown_schedule_is_refused():
    """The schedule setting is read by the emulator: a typo must not silently run 'linear'."""
    code = ("import torch, mmrprune; mmrprune.select(torch.randn(1, 8, 4), torch.rand(1, 8), k=2, "
            "backend='cuda_emu')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "CUDA_EMU_SCHED": "sideways"}, timeout=300)
    assert proc.returncode != 0 and "CUDA_EMU_SCHED=sideways" in proc.stderr


# ----------------------------------------------------------------------------- unchecked input
@pytest.mark.parametrize("method", FUSED)
def test_unchecked_non_finite_input_in_both_modes(sim_mode, method):
    torch.manual_seed(0)
    x, w = torch.randn(3, 40, 16), torch.rand(3, 40)
    x[0, 5] = math.nan
    x[1] = math.nan
    w[2, 3] = math.inf
    lengths = [40, 33, 40]
    out = _select(x, w, method, k=7, lengths=lengths, check_finite=False, sim=sim_mode)
    for row, n in zip(out.tolist(), lengths):
        assert all(0 <= i < n for i in row) and len(set(row)) == 7, row


# ----------------------------------------------------------------------------- shared memory, alignment
def test_dynamic_smem_above_48k_uses_the_opt_in(monkeypatch):
    """D = 13000 fp32: x̂_p is 52,000 bytes of dynamic shared memory, above the 48 KiB default,
    so the launcher must raise the kernel's limit (the emulator refuses the launch otherwise)."""
    x = torch.from_numpy(certify.gaussian_tokens(24, 13000, seed=2)).float()
    w = torch.from_numpy(certify.distinct_importance(24, seed=2)).float()
    assert emu._ext.smem_bytes(13000) > 48 * 1024
    for method in ("mmr", "dpp"):
        got = _select(x[None], w[None], method, k=5, sim="rows")[0].numpy()
        _agrees_with_reference(x, w, got, method, 0.5, 5, torch.float32)
    # past the device's opt-in limit the launcher says so (the emulated device reports CUDA_EMU_SMEM_OPTIN)
    monkeypatch.setenv("CUDA_EMU_SMEM_OPTIN", str(48 * 1024))
    with pytest.raises(RuntimeError, match="feature dim too large for the fused CUDA kernel"):
        _select(x[None], w[None], "mmr", k=5, sim="rows")


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("dim", [64, 70])
def test_misaligned_rows_take_the_scalar_path(dtype, dim, monkeypatch):
    """Features whose base address is not 16-byte aligned (a view at an odd offset) must give the
    same answer as the aligned copy; D = 70 is scalar either way (70 * 2 bytes % 16 != 0)."""
    n, k = 60, 10
    base = torch.from_numpy(certify.clustered_tokens(n, dim, seed=4)).to(DTYPES[dtype])
    storage = torch.empty(n * dim + 1, dtype=base.dtype)
    shifted = storage[1:].view(n, dim)
    shifted.copy_(base)
    assert shifted.data_ptr() % 16 != 0 and base.data_ptr() % 16 == 0
    w = torch.from_numpy(certify.distinct_importance(n, seed=4)).float()
    for method in ("mmr", "dpp"):
        a = _select(base[None], w[None], method, k=k, sim="rows")[0].numpy()
        b = _select(shifted[None], w[None], method, k=k, sim="rows")[0].numpy()
        for picks in (a, b):
            _agrees_with_reference(base, w, picks, method, 0.5, k, dtype)


# ----------------------------------------------------------------------------- registration
def test_registered_by_name_only():
    assert "cuda_emu" in dispatch.BACKENDS
    assert all("cuda_emu" not in order for order in dispatch.AUTO_ORDER.values())
    assert dispatch.resolve("auto", "cpu", "mmr").name != "cuda_emu"
    assert dispatch.resolve("cuda_emu", "cpu", "dpp").name == "cuda_emu"
    with pytest.raises(RuntimeError, match="runs on \\['cpu'\\] tensors"):
        dispatch.resolve("cuda_emu", "cuda", "mmr")


def test_info_lists_it_and_says_what_it_is_for():
    report = mmrprune.info()
    entry = report["backends"]["cuda_emu"]
    assert entry["available"] and "CPU tensors" in entry["detail"] and "tests" in entry["detail"]
    from mmrprune.info import format_info
    assert any(line.split()[:2] == ["cuda_emu", "yes"] for line in format_info(report).splitlines())


def test_unbuilt_module_reports_why(monkeypatch):
    monkeypatch.setattr(emu.KERNELS, "ext", None)
    monkeypatch.setattr(emu.KERNELS, "import_error", "ImportError: no module")
    ok, why = emu.status()
    assert not ok and "mmrprune._cuda_emu not built" in why
    with pytest.raises(RuntimeError, match="backend 'cuda_emu' is not available"):
        emu.select(_tiny_batch())


def test_float64_takes_the_cuda_backends_torch_fallback():
    x = torch.randn(2, 30, 8, dtype=torch.float64)
    w = torch.rand(2, 30, dtype=torch.float64)
    for method in ("mmr", "topk"):
        assert torch.equal(_select(x, w, method, k=6), mmrprune.select(x, w, method=method, k=6, backend="torch",
                                                                       order="selection"))


def test_topk_is_one_prepare_kernel_and_reports_no_rounds():
    """topk on the kernel path: one launch (the prepare kernel's ranking), and no ``rounds`` in
    the stats, as on the torch backend (the API reports rounds where a backend counts them; a
    ranking has none)."""
    x, w = torch.randn(2, 30, 8), torch.rand(2, 30)
    before = emu.KERNELS.ext.launches()
    out, stats = mmrprune.select(x, w, k=6, method="topk", backend="cuda_emu", return_stats=True)
    assert emu.KERNELS.ext.launches() - before == 1
    want, want_stats = mmrprune.select(x, w, k=6, method="topk", backend="torch", return_stats=True)
    assert torch.equal(out, want) and stats == want_stats == {}


def test_topk_op_clamps_budgets_and_refuses_a_similarity_source():
    """The op itself: budgets past an image's length or k_max give -1 there, never a write past
    the output; topk takes no Gram; the prepare op alone refuses topk (it writes picks)."""
    w = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2, 0.3])
    rows = torch.randn(6, 4)
    starts, lengths = torch.tensor([0, 4]), torch.tensor([4, 2])
    ks = torch.tensor([9, 1])
    out, rounds = torch.ops.mmrprune.fused_greedy(rows, None, None, None, starts, lengths, ks, 3, 0.0, False,
                                                  weights=w, score_kind="topk")
    assert out.tolist() == [[1, 3, 2], [1, -1, -1]] and rounds.tolist() == [1, 1]   # local indices
    with pytest.raises(ValueError, match="'topk' ranks the importance only"):
        torch.ops.mmrprune.fused_greedy(rows, None, None, None, starts, lengths, ks, 3, 0.0, False,
                                        gram=torch.zeros(2, 4, 4), weights=w, score_kind="topk")
    with pytest.raises(ValueError, match="call mmrprune::fused_greedy"):
        torch.ops.mmrprune._fused_prepare(rows, starts, lengths, None, w, "topk", 0, False, ks)


def _tiny_batch():
    from mmrprune.validation import validate
    return validate(torch.randn(1, 8, 4), torch.rand(1, 8), k=2, keep_ratio=None, lam=0.5, method="mmr",
                    lengths=None, method_params={}).batch


def test_emulator_build_needs_all_three_cuda_headers(tmp_path, monkeypatch):
    """setup.py builds mmrprune._cuda_emu exactly when build_flags finds the CUDA headers."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc"))
    try:
        import build_flags
    finally:
        sys.path.pop(0)
    inc = tmp_path / "include"
    inc.mkdir()
    (inc / "cuda_runtime.h").write_text("")
    (inc / "cuda_fp16.h").write_text("")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert build_flags.cuda_include_dir() is None          # cuda_bf16.h missing: unavailable
    (inc / "cuda_bf16.h").write_text("")
    assert build_flags.cuda_include_dir() == str(inc)


# ----------------------------------------------------------------------------- aborts under pytest
@pytest.mark.parametrize("capture", ["fd", "no"])
def test_abort_reason_reaches_the_pytest_report(tmp_path, capture):
    """An emulator abort kills the pytest process in the middle of a test, while pytest holds fd 2
    in a temporary file: the emulator's reason must still reach pytest's output (conftest.py hands
    it the runner's stderr), once, with capture on and off.  The abort here is an unknown
    CUDA_EMU_SCHED, which goes through the same fail() as a divergent barrier or a deadlock."""
    test = tmp_path / "test_emu_abort.py"
    test.write_text("import os, torch, mmrprune\n"
                    "def test_abort():\n"
                    "    os.environ['CUDA_EMU_SCHED'] = 'no-such-order'\n"
                    "    mmrprune.select(torch.randn(16, 8), None, k=2, backend='cuda_emu')\n")
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (tested_package.package_parent(), here,
                                                                  os.environ.get("PYTHONPATH")) if p))
    env.pop("CUDA_EMU_SCHED", None)
    # -p conftest loads this suite's conftest.py (whose pytest_configure is under test) as a plugin
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                           f"--capture={capture}", str(test)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Fatal Python error: Aborted" in out, out[-3000:]
    assert out.count("cuda_emu: CUDA_EMU_SCHED=no-such-order: use linear, reverse or random:SEED") == 1, out[-3000:]


@pytest.mark.parametrize("sim", ["gram", "rows"])
def test_emu_counts_reports_the_kernels_rounds_and_counters(sim):
    """bench/emu_counts.count (the cost model's source of per-round counts) runs the kernels:
    its rounds are the kernel's own, and every round has at least the block barrier of its
    candidate reduction and one shuffle level of a warp merge."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    try:
        import emu_counts
    finally:
        sys.path.pop(0)
    got = emu_counts.count("mmr", n=96, d=48, k=24, sim=sim, batch=2)
    x, w = emu_counts._tokens(96, 48, 0, 2)
    for b in range(2):
        _, rounds = R.select_rounds(x[b].astype(np.float64), w[b].astype(np.float64), 24, "mmr", 0.5,
                                    int(emu.KERNELS.ext.MAX_ROUND))
        assert got["totals"]["barriers"][b] >= rounds
    assert got["picks_ok"] and 1 <= got["rounds"] < 24
    assert got["kernel_launches"] == (2 if sim == "gram" else 3)   # (norms +) prepare + greedy
    assert got["barriers_per_round"] >= 1 and got["shuffle_levels_per_round"] >= 1
    dpp = emu_counts.count("dpp", n=64, d=32, k=8, sim=sim)
    assert dpp["rounds"] == 8   # one pick per step


# ----------------------------------------------------------------------------- several SMs per image
def test_long_image_runs_the_cluster_kernel_with_the_one_block_picks(dinov2, monkeypatch, tmp_path):
    """B = 1, N = 4200 > 1024 threads, Gram mode: the launcher's choice on an H100-class device (compute capability 9, 132 SMs) is a cluster of 5 CTAs; on
    compute capability 8 one block.  Same picks and rounds, and the reference agrees (exact where
    margins are clear, else the certificate)."""
    import json
    n, k = 4200, 64
    toks = np.concatenate([dinov2["tokens"][i] for i in range(5)])[:n]
    att = np.concatenate([dinov2["cls_attention"][i] for i in range(5)])[:n]
    x, w = torch.from_numpy(toks)[None].float(), torch.from_numpy(att)[None].float()
    got = {}
    for cc in ("9", "8"):
        counts = tmp_path / f"counts{cc}.jsonl"
        monkeypatch.setenv("CUDA_EMU_CC_MAJOR", cc)
        monkeypatch.setenv("CUDA_EMU_COUNTS", str(counts))
        picks, stats = _select(x, w, "mmr", k=k, lam=0.5, sim="gram", return_stats=True)
        launch = [json.loads(line) for line in counts.read_text().splitlines()][-1]
        got[cc] = (picks.numpy(), stats["rounds"].numpy(), launch["cluster"])
    assert got["9"][2] == [5, 1, 1] and got["8"][2] == [1, 1, 1]
    np.testing.assert_array_equal(got["9"][0], got["8"][0])
    np.testing.assert_array_equal(got["9"][1], got["8"][1])
    _agrees_with_reference(x[0], w[0], got["9"][0][0], "mmr", 0.5, k, torch.float32)


def test_dpp_long_image_runs_the_cluster_kernel_with_the_one_block_picks(dinov2, monkeypatch, tmp_path):
    """Gram-mode DPP, B = 1, N = 600 (one CTA per 256 tokens): on an H100-class device (compute
    capability 9) the launcher runs a cluster of 3 CTAs, on compute capability 8 one block; the
    same picks, and the reference agrees (exact where margins are clear, else the certificate)."""
    import json
    n, k = 600, 150
    x = torch.from_numpy(dinov2["tokens"][2][:n])[None].float()
    w = torch.from_numpy(dinov2["cls_attention"][2][:n])[None].float()
    got = {}
    for cc in ("9", "8"):
        counts = tmp_path / f"counts{cc}.jsonl"
        monkeypatch.setenv("CUDA_EMU_CC_MAJOR", cc)
        monkeypatch.setenv("CUDA_EMU_COUNTS", str(counts))
        picks = _select(x, w, "dpp", k=k, sim="gram")
        launch = [json.loads(line) for line in counts.read_text().splitlines()][-1]
        got[cc] = (picks.numpy(), launch["cluster"])
    assert got["9"][1] == [3, 1, 1] and got["8"][1] == [1, 1, 1]
    np.testing.assert_array_equal(got["9"][0], got["8"][0])
    _agrees_with_reference(x[0], w[0], got["9"][0][0], "dpp", 0.5, k, torch.float32)


@pytest.mark.parametrize("method", ["mmr", "dpp"])
def test_cluster_hook_forces_the_launch_shape(method, monkeypatch, tmp_path):
    """The op's cluster argument (cuda_backend._CLUSTER, the GPU session's one-block A/B): 1 runs
    one block where the launcher would take a cluster, 4 runs 4 CTAs where it would take one
    block, and an A100-class device (no clusters) keeps one block; the picks (and maxsim rounds)
    are the same every way."""
    import json
    from mmrprune.backends import cuda_backend as cb
    x = torch.from_numpy(certify.clustered_tokens(600 if method == "dpp" else 300, 24, seed=6)).float()[None]
    w = torch.from_numpy(certify.distinct_importance(x.shape[1], seed=6)).float()[None]
    got = {}
    for cc, force in (("9", 0), ("9", 1), ("9", 4), ("8", 4)):
        counts = tmp_path / f"c{cc}{force}.jsonl"
        monkeypatch.setenv("CUDA_EMU_CC_MAJOR", cc)
        monkeypatch.setenv("CUDA_EMU_COUNTS", str(counts))
        monkeypatch.setattr(cb, "_CLUSTER", force)
        picks, stats = _select(x, w, method, k=40, sim="gram", return_stats=True)
        launch = [json.loads(line) for line in counts.read_text().splitlines()][-1]
        got[(cc, force)] = (picks.numpy(), stats["rounds"].numpy(), launch["cluster"][0])
    default = 3 if method == "dpp" else 1     # 600 tokens: 3 CTAs of 256 for DPP; 300 <= 1024 for maxsim
    assert [got[key][2] for key in sorted(got)] == [1, default, 1, 4], {key: v[2] for key, v in got.items()}
    for key in got:
        np.testing.assert_array_equal(got[key][0], got[("9", 1)][0], err_msg=str(key))
        np.testing.assert_array_equal(got[key][1], got[("9", 1)][1], err_msg=str(key))
