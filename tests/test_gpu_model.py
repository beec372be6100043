"""bench/gpu_model.py: it runs, its records have the schema, and its counts are the emulator's
and the host path's own (not figures typed into the model)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

M = pytest.importorskip("gpu_model")

FIELDS = {"target", "kernels", "method", "lower_us", "upper_us", "goal_us", "verdict", "measured_us", "model_error"}
COUNTED = {"rounds", "rounds_per_k", "dependent_trips_per_round", "shuffle_levels_per_round", "barriers_per_round",
           "hbm_bytes", "l2_bytes", "launches_per_call", "host_syncs_per_call", "counts_source"}


def _need_emulator():
    from mmrprune.backends import cuda_emu_backend as emu
    ok, why = emu.status()
    if not ok:
        pytest.skip(f"cuda_emu unavailable: {why}")


@pytest.fixture(scope="module")
def records():
    _need_emulator()
    return M.build()


def test_runs_and_writes_the_table(tmp_path):
    _need_emulator()
    out = tmp_path / "gpu_model.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_model.py"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| target | kernels |" in proc.stdout and "ESTIMATES" in proc.stdout
    assert json.loads(out.read_text())


def test_schema(records):
    for r in records:
        assert FIELDS <= set(r), sorted(FIELDS - set(r))
        assert r["target"] in "abcdef" and r["kernels"] in ("before", "after", "any")
        assert 0 < r["lower_us"] <= r["upper_us"] and r["goal_us"] > 0
        assert r["measured_us"] is None or r["measured_us"] > 0
        if r["kernels"] != "any":
            assert COUNTED <= set(r), (r["target"], sorted(COUNTED - set(r)))
            lo, hi = r["rounds"]
            assert 0 < lo <= hi <= r["k"]
    for gen in ("before", "after"):
        assert {r["target"] for r in records if r["kernels"] == gen} == set("abcdef"), gen
    dpp = [r for r in records if r["method"] == "dpp" and r["kernels"] == "any"]
    assert len(dpp) == 1 and dpp[0]["steps"] == M.budget(2691, None)
    # the Gram-mode DPP kernels at (a) and (b), both generations: one pick per round
    steps = {(r["kernels"], r["target"]): r["rounds"] for r in records if r["method"] == "dpp" and r["kernels"] != "any"}
    assert steps == {(g, t): [M.budget(*M.TARGETS[t][1:4:2])] * 2 for g in ("before", "after") for t in "ab"}
    assert dpp[0]["cholesky_bytes"] == 4 * 2691 * dpp[0]["steps"] * (dpp[0]["steps"] - 1) // 2


def test_uses_the_emulators_counts(records):
    """The before kernels' per-round barriers / shuffle levels / trips and the op's launches are
    the emulator's records, and changing those records changes the model (no hand figure)."""
    emu = {(r["kernels"], r["target"], r["method"], r["sim"]): r for r in M.load_emu_records()}
    for r in records:
        if r["kernels"] == "before" and r["backend"] == "cuda" and r["target"] in ("a", "b"):
            e = emu[("before", r["target"], r["method"], "gram")]
            assert r["shuffle_levels_per_round"] == e["shuffle_levels_per_round"]
            assert r["barriers_per_round"] == e["barriers_per_round"]
            assert r["dependent_trips_per_round"] == [e["ldg_trips_per_round"]] * 2
            assert r["rounds"][0] == pytest.approx(e["rounds"] if r["method"] == "mmr" else r["k"], abs=0.05)
            assert "emulator" in r["counts_source"]


def test_follows_changed_counts(monkeypatch):
    _need_emulator()
    real = M.load_emu_records()
    doctored = [dict(r, shuffle_levels_per_round=r["shuffle_levels_per_round"] + 1000.0, kernel_launches=7)
                for r in real]
    monkeypatch.setattr(M, "load_emu_records", lambda path=M.EMU_RECORDS: doctored)
    host = M.count_host("cuda")
    monkeypatch.setattr(M, "count_host", lambda backend, **kw: dict(host, aten_launching_ops=100, host_syncs=3))
    recs = {(r["target"], r["kernels"], r["backend"], r["method"]): r for r in M.build()}
    for method, before_host in (("mmr", "cuda"), ("dpp", "cuda_dpp")):
        a = recs[("a", "before", "cuda", method)]
        assert a["shuffle_levels_per_round"] >= 1000
        # the before kernels' host path is gone: its launches are the committed count, not today's
        assert a["launches_per_call"] == M.HOST_BEFORE[before_host]["aten_launching_ops"] + 7
        after = recs[("a", "after", "cuda", method)]
        assert after["shuffle_levels_per_round"] >= 1000
        assert after["launches_per_call"] == 107 and after["host_syncs_per_call"] == 3


def test_host_counts_follow_the_host_code():
    """The TorchDispatchMode counter sees the host path's ops: a cuda_emu call launches at least
    the Gram and the norms, and the Triton path records its kernel launches."""
    _need_emulator()
    cuda = M.count_host("cuda")
    assert cuda["custom_ops"] == 1 and cuda["aten_launching_ops"] >= 2 and "bmm" in cuda["ops"]
    tri = M.count_host("triton")
    assert tri["op_kernel_launches"] >= 3      # norms, Gram, greedy


@pytest.mark.parametrize("method", ["mmr", "fps", "divprune"])
def test_host_count_is_the_budget_count(method):
    """The model's host term for the after kernels is the count tests/test_host_path.py holds to
    its launch budget: the same call counted by that test's own code gives the same launches and
    syncs, so the model and the budget cannot drift apart."""
    _need_emulator()
    import test_host_path as H

    import mmrprune
    b, n, d, k = 2, 64, 32, 8
    model = M.count_host("cuda", method=method, batch=b, n=n, d=d, k=k)
    x, w = H._inputs(b, n, d)
    ops, launches, kernels, syncs = H._count(lambda: mmrprune.select(
        x, None if method == "fps" else w, k=k, method=method, backend="cuda_emu", check_finite=False))
    assert (model["aten_launching_ops"], model["op_kernel_launches"], model["host_syncs"]) == \
        (launches, kernels, syncs), (model["ops"], dict(ops))
    assert launches + kernels <= H.LAUNCH_BUDGET


def test_records_charge_the_counted_launches(records):
    """The after records' launches per call are the host count plus the emulator's kernels (the
    count the budget test checks), and the before records' the committed count of 7ab7d9d."""
    emu = {(r["kernels"], r["target"], r["method"], r["sim"]): r for r in M.load_emu_records()}
    host = {b: M.count_host(b) for b in ("cuda", "triton")}
    host["cuda_dpp"] = M.count_host("cuda", method="dpp")
    assert host["cuda"]["op_kernel_launches"] == emu[("after", "a", "mmr", "gram")]["kernel_launches"]
    assert host["cuda_dpp"]["op_kernel_launches"] == emu[("after", "a", "dpp", "gram")]["kernel_launches"]
    for r in records:
        if r["kernels"] not in ("before", "after") or r["target"] not in ("a", "b"):
            continue
        h = host if r["kernels"] == "after" else M.HOST_BEFORE
        if r["backend"] == "cuda":
            hc = h["cuda_dpp" if r["method"] == "dpp" else "cuda"]
            want = hc["aten_launching_ops"] + emu[(r["kernels"], r["target"], r["method"], "gram")]["kernel_launches"]
        else:
            want = h["triton"]["aten_launching_ops"] + h["triton"]["op_kernel_launches"]
        assert r["launches_per_call"] == want, (r["target"], r["kernels"], r["backend"])
        assert r["host_syncs_per_call"] == h[r["backend"]]["host_syncs"]
