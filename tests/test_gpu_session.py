"""The host side of the GPU session (bench/gpu_session.sh, bench/gpu/): time plan, stage
selection, summary and exit status, output files, the sanitizer's verdicts, the test
selection plugin, the target evaluation, and the Triton interpreter check.  The stages
themselves run end to end in CI through ``.ci/gpu_dryrun.sh`` (the CPU dry run)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench", "gpu"))

import goals  # noqa: E402
import gpu_tests  # noqa: E402
import sanitizer  # noqa: E402
import session  # noqa: E402


# ----------------------------------------------------------------------------- plan and budget
def test_plan_fits_the_budget_and_every_limit_can_start():
    assert sum(s.plan_s for s in session.STAGES) <= session.BUDGET_S
    assert len({s.name for s in session.STAGES}) == len(session.STAGES)
    for s in session.STAGES:
        assert session.MIN_STAGE_S <= s.plan_s <= s.limit_s, s
        assert s.basis.startswith(("measured", "guess")), s
    text = session.plan_text(session.STAGES, session.BUDGET_S, dry_run=False)
    assert all(s.name in text for s in session.STAGES) and str(session.BUDGET_S) in text


def test_stage_timeout_is_cut_to_what_is_left():
    stage = session.Stage("x", 30, 150, "guess")
    assert session.stage_timeout(stage, 1000) == 150
    assert session.stage_timeout(stage, 100) == 100 - session.RESERVE_S
    assert session.stage_timeout(stage, session.MIN_STAGE_S + session.RESERVE_S) == session.MIN_STAGE_S
    assert session.stage_timeout(stage, session.MIN_STAGE_S + session.RESERVE_S - 1) is None


def test_only_selects_stages_in_canonical_order():
    assert [s.name for s in session.select_stages(None)] == [s.name for s in session.STAGES]
    assert [s.name for s in session.select_stages("sanitizer,tests")] == ["tests_gram", "tests_row", "sanitizer"]
    for bad in ("bench", "", " , "):
        if bad.strip(" ,"):
            with pytest.raises(ValueError, match="unknown stage"):
                session.select_stages(bad)
    assert session.main(["--only", "nonsense"]) == 3


def test_out_files_fit_what_the_device_returns():
    # at most 8 files, names of letters, digits, '.', '_' and '-' (the device tool's limits)
    assert len(session.OUT_FILES) <= 8
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in session.OUT_FILES)


def test_overall_result_and_exit_status():
    def st(*statuses):
        return {f"s{i}": {"status": s} for i, s in enumerate(statuses)}
    assert session.overall(st("passed", "skipped", "partial")) == ("passed", 0)
    assert session.overall(st("passed", "not_run")) == ("incomplete", 2)
    assert session.overall(st("timeout", "not_run")) == ("failed", 1)
    assert session.overall(st("failed")) == ("failed", 1)
    assert session.overall(st("passed"), ["smoke.json"]) == ("failed", 1)


def test_missing_files_are_those_of_stages_that_passed():
    stages = {"smoke": {"status": "passed"}, "targets": {"status": "failed"}, "tests_gram": {"status": "passed"}}
    assert session.missing_files(stages, ["summary.json", "session.log", "logs.tar.gz"]) == ["smoke.json"]
    assert session.missing_files(stages, session.OUT_FILES) == []


def test_session_records_each_stage_and_fails_on_a_failed_stage(tmp_path, monkeypatch):
    """The main loop with stand-in stages: every stage gets an entry, the summary and the
    tarball are written, a failure sets the exit status, a stage that no longer fits the
    budget is marked not_run."""
    results = {"build": ("passed", {}), "smoke": ("failed", {"reason": "injected"})}
    monkeypatch.setattr(session.Session, "run_stage",
                        lambda self, name, timeout: results.get(name, ("passed", {"timeout": timeout})))
    args = types.SimpleNamespace(dry_run=True, budget_s=10_000, out=str(tmp_path), commit="abc1234")
    code = session.Session(args).run(list(session.STAGES))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert code == 1 and summary["result"] == "failed"
    assert [n for n in summary["stages"]] == [s.name for s in session.STAGES]
    assert summary["stages"]["smoke"] == dict(summary["stages"]["smoke"], status="failed",
                                              detail={"reason": "injected"})
    assert summary["environment"]["commit"] == "abc1234"
    assert {"summary.json", "logs.tar.gz"} <= set(os.listdir(tmp_path))
    # a budget too small for anything: nothing starts, the session is incomplete, not failed
    args.budget_s = session.MIN_STAGE_S
    assert session.Session(args).run(list(session.STAGES[2:4])) == 2


def test_runner_interrupts_then_kills_a_stage_past_its_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(session, "INTERRUPT_GRACE_S", 1)
    runner = session.Runner(str(tmp_path), str(tmp_path / "session.log"))
    stubborn = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('up', flush=True); " \
               "time.sleep(60)"
    rc, timed_out, out = runner.run("slow", [sys.executable, "-c", stubborn], dict(os.environ), 2)
    assert timed_out and rc is not None and rc != 0 and "up" in out
    assert "[slow] up" in (tmp_path / "session.log").read_text()
    rc, timed_out, out = runner.run("fast", [sys.executable, "-c", "print('done')"], dict(os.environ), 30)
    assert (rc, timed_out, out.strip()) == (0, False, "done")


def test_junit_counts(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(textwrap.dedent("""\
        <testsuites><testsuite name="pytest" tests="3" failures="1" errors="0" skipped="1">
        <testcase classname="tests.test_a" name="test_ok"/>
        <testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>
        <testcase classname="tests.test_a" name="test_skip"><skipped/></testcase>
        </testsuite></testsuites>"""))
    assert session.junit_counts(str(xml)) == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1,
                                              "failed": ["tests.test_a::test_bad"]}


# ----------------------------------------------------------------------------- sanitizer verdicts
SUMMARY_OK = "========= ERROR SUMMARY: 0 errors\n"


@pytest.mark.parametrize("rc, output, want", [
    (0, f"[sanitizer] case row mmr: ok\n{sanitizer.DONE}\n{SUMMARY_OK}", "passed"),
    (0, f"{sanitizer.DONE}\n========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n", "passed"),
    (sanitizer.ERROR_EXITCODE, "========= Invalid __global__ read of size 4 bytes\n"
                               f"{sanitizer.DONE}\n========= ERROR SUMMARY: 1 error\n", "errors"),
    (0, f"{sanitizer.DONE}\n========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)\n", "errors"),
    # what gVisor gave (KINDS.md): the tool refuses the device, the program then dies at its first allocation
    (1, "========= COMPUTE-SANITIZER\n========= Error: Device not supported\nRuntimeError: CUDA error: "
        "unknown error\n========= Target application returned an error\n" + SUMMARY_OK, "unavailable"),
    (1, "Traceback (most recent call last):\nAssertionError: step 3\n" + SUMMARY_OK, "failed"),
    (0, SUMMARY_OK, "failed"),
])
def test_sanitizer_classification(rc, output, want):
    assert sanitizer.classify(rc, output)[0] == want


def test_sanitizer_stage_runs_the_cases_under_the_tool(tmp_path, monkeypatch):
    """The stage's tool path with a stand-in compute-sanitizer (a script that runs the program
    and prints a summary): both tools run, on cuda_emu, and the report says passed; a tool
    that refuses the device makes the stage 'skipped' after the first tool."""
    fake = tmp_path / "compute-sanitizer"
    fake.write_text("#!/usr/bin/env bash\n"
                    "while [[ $1 == --* ]]; do shift 2; done\n"      # every option takes a value
                    "\"$@\"; rc=$?\n"
                    "echo '========= ERROR SUMMARY: 0 errors'\nexit $rc\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    report = tmp_path / "san.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "gpu", "sanitizer.py"), "run", "--out", str(report),
           "--dry-run"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    got = json.loads(report.read_text())
    if got["runs"] and got["runs"][0].get("reason", "").startswith("the cases did not finish"):
        pytest.skip(f"the cases need cuda_emu: {proc.stdout[-500:]}")
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert [r["tool"] for r in got["runs"]] == list(sanitizer.TOOLS) and got["status"] == "passed"
    fake.write_text("#!/usr/bin/env bash\necho '========= Error: Device not supported'\nexit 1\n")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    got = json.loads(report.read_text())
    assert proc.returncode == sanitizer.EXIT_SKIPPED and got["status"] == "skipped"
    assert [r["tool"] for r in got["runs"]] == ["memcheck"]


# ----------------------------------------------------------------------------- GPU test selection
def _item(params=None, reasons=()):
    marks = [types.SimpleNamespace(kwargs={"reason": r}) for r in reasons]
    return types.SimpleNamespace(callspec=types.SimpleNamespace(params=params or {}),
                                 iter_markers=lambda name: iter(marks if name == "skipif" else []))


def test_gpu_test_plugin_keeps_only_the_device_backends():
    keep = gpu_tests.keep
    gpu = (["cuda", "triton"], "cuda")
    assert keep(_item({"backend_device": ("cuda", "cuda"), "method": "mmr"}), *gpu)
    assert keep(_item({"backend_device": ("triton", "cuda")}), *gpu)
    assert not keep(_item({"backend_device": ("torch", "cuda")}), *gpu)
    assert not keep(_item({"backend_device": ("cpu", "cpu")}), *gpu)
    assert keep(_item({"target": "cuda", "dtype": "x"}), *gpu)
    assert not keep(_item({"target": "cuda_emu"}), *gpu)
    assert keep(_item({"mode": "0"}, ["needs a CUDA GPU: torch.cuda.is_available() is False"]), *gpu)
    assert not keep(_item({}, ["checks the no-GPU error path"]), *gpu)
    assert not keep(_item(), *gpu)
    dry = (["cuda_emu", "triton"], "cpu")
    assert keep(_item({"backend_device": ("cuda_emu", "cpu")}), *dry) and keep(_item({"target": "cuda_emu"}), *dry)


def test_gpu_test_files_hold_every_gpu_test():
    """A test file that parametrises over backends/devices or has GPU-only tests must be in
    gpu_tests.FILES, or the GPU session would never run it."""
    pattern = re.compile(r'\bbackend_device\b|def test_\w+\(target\b|reason="needs a CUDA')
    found = set()
    for name in sorted(os.listdir(os.path.join(ROOT, "tests"))):
        if name.startswith("test_") and name.endswith(".py") and name != os.path.basename(__file__):
            with open(os.path.join(ROOT, "tests", name), encoding="utf-8") as f:
                if pattern.search(f.read()):
                    found.add(f"tests/{name}")
    assert found == set(gpu_tests.FILES), (sorted(found - set(gpu_tests.FILES)), sorted(set(gpu_tests.FILES) - found))


def test_similarity_modes_are_select_arguments():
    """The session forces a similarity source through select's sim= (scripts: common.tuning;
    test stages: gpu_tests' --gpu-sim default), never through the environment."""
    import common
    import gpu_tests
    from mmrprune.backends import SIMS
    assert set(common.SIMS) == set(common.MODES) and set(common.SIMS.values()) <= set(SIMS)
    assert common.tuning("gram", "cuda") == {"sim": "gram", "max_round": None}
    with pytest.raises(ValueError, match="similarity mode"):
        common.tuning("auto", "cuda")
    echo = gpu_tests._with_sim(lambda *a, **kw: kw, "rows")
    assert echo(1, k=2) == {"k": 2, "sim": "rows"} and echo(1, sim="gram") == {"sim": "gram"}


# ----------------------------------------------------------------------------- target evaluation
def _rec(target, backend, method, **fields):
    return {"target": target, "backend": backend, "method": method, **fields}


def test_goals_evaluate_checks_each_target():
    records = [
        _rec("a", "cuda", "mmr", median_ms=0.040, speedup_vs_anchor=150.0),
        _rec("a", "triton", "mmr", median_ms=0.070),
        _rec("b", "cuda", "mmr", median_ms=0.6, speedup_vs_anchor=90.0),
        _rec("c", "cuda", "mmr", median_ms=12.0, gram_ms=10.0),
        _rec("d", "cuda", "mmr", median_ms=14.0, peak_alloc_bytes=3 * goals.GIB),
        _rec("f", "cuda", "mmr", share_pct=1.5),
    ]
    rows = {(r["target"], r["what"]): r for r in goals.evaluate(records)}
    assert rows[("a", "cuda mmr median")]["value"] == pytest.approx(40.0) and rows[("a", "cuda mmr median")]["ok"]
    assert rows[("a", "cuda mmr speed-up over the anchor loop")]["ok"] is True
    assert rows[("b", "cuda mmr median")]["ok"] is False
    assert rows[("b", "cuda mmr speed-up over the anchor loop")]["ok"] is False
    assert rows[("c", "cuda mmr / bf16 Gram matmul")]["value"] == pytest.approx(1.2)
    assert rows[("d", "cuda mmr median")]["ok"] is True
    assert rows[("d", "cuda mmr peak memory allocated by the call")]["ok"] is False
    assert rows[("e", "(a) triton / cuda mmr")]["value"] == pytest.approx(1.75)
    assert rows[("e", "(a) triton / cuda mmr")]["ok"] is False
    assert rows[("f", "cuda mmr selection / prefill time saved")]["ok"] is True
    assert rows[("a", "cuda divprune median")]["ok"] is None          # not measured
    assert goals.tally(list(rows.values()))["not_measured"] > 0
    assert all(r["ok"] is None for r in goals.evaluate([]))


# ----------------------------------------------------------------------------- the device's Triton
def test_triton_interpreter_works_or_says_why():
    """Under TRITON_INTERPRET=1 the triton backend either runs a selection or is unavailable
    with a reason naming the Triton and NumPy versions (Triton 3.6's interpreter with NumPy
    >= 2.4: .ci/triton36.sh runs this with 3.6); never available-then-crashing."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""\
        import torch, mmrprune
        from mmrprune import dispatch
        ok, why = dispatch.status("triton")
        print("STATUS", ok, why)
        if ok:
            x = torch.randn(1, 12, 8)
            print("PICKS", mmrprune.select(x, torch.rand(1, 12), k=3, backend="triton").tolist())
        """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-3000:]
    status = next(line for line in proc.stdout.splitlines() if line.startswith("STATUS"))
    if status.startswith("STATUS True"):
        assert "PICKS" in proc.stdout
    else:
        import numpy
        import triton
        assert "interpreter" in status and f"Triton {triton.__version__}" in status, status
        assert f"NumPy {numpy.__version__}" in status, status


def test_per_round_puts_measured_time_beside_the_emulator_counts():
    counts = [dict(kernels="before", target="a", method="mmr", sim="gram", barriers_per_round=2.0,
                   shuffle_levels_per_round=80.0, ldg_trips_per_round=9.7, kernel_launches=1, rounds=21.0),
              dict(kernels="after", target="a", method="mmr", sim="gram", barriers_per_round=2.0,
                   shuffle_levels_per_round=31.2, ldg_trips_per_round=3.7, kernel_launches=1, rounds=21.0,
                   commit="abc"),
              dict(kernels="after", target="a", method="mmr", sim="rows", shuffle_levels_per_round=269.0)]
    records = [dict(backend="cuda", target="a", method="mmr", batch=1, k=64, rounds_per_k=0.328125,
                    median_ms=0.042, gram_ms=0.01),
               dict(backend="triton", target="a", method="mmr", batch=1, k=64, rounds_per_k=0.3, median_ms=0.05),
               dict(backend="cuda", target="a", method="dpp", batch=1, k=64, rounds_per_k=None, median_ms=0.3),
               dict(backend="cuda", target="b", method="mmr", batch=1, k=673, rounds_per_k=0.15, median_ms=0.3)]
    rows = session.per_round(records, counts, "cuda")
    assert [(r["target"], r["method"]) for r in rows] == [("a", "mmr"), ("b", "mmr")]
    a = rows[0]
    assert a["rounds"] == 21.0 and a["us_per_round_call"] == 2.0 and a["us_per_round_no_gram"] == 1.524
    assert a["shuffle_levels_per_round"] == 31.2 and a["counts_kernels"] == "after"   # the newest generation
    assert "shuffle_levels_per_round" not in rows[1]   # no counts for (b) in this list


def test_committed_counts_cover_the_targets_the_session_times():
    with open(session.COUNTS_FILE) as f:
        counts = json.load(f)
    kinds = {(c["kernels"], c["target"], c["method"], c["sim"]) for c in counts}
    for gen in ("before", "after"):
        assert {(gen, "a", "mmr", "gram"), (gen, "b", "mmr", "gram"), (gen, "b", "divprune", "gram")} <= kinds
    assert all(c["picks_ok"] for c in counts)
