"""The GPU session behind ``bench/gpu_session.sh`` (bench/README.md, "The GPU session").

Stages, in order of value, each under its own time limit inside one budget for the whole
command; after every stage the summary JSON and the log tarball are rewritten, so a kill
keeps what was done.  ``--dry-run`` runs the same stages on CPU (cuda_emu, Triton's
interpreter, tiny shapes).  Exit status: 0 every stage passed (or was skipped because the
machine cannot run it), 1 a stage failed or timed out, 2 a stage was not run (budget),
3 bad usage.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Optional

import common
import goals
from common import COMMIT_ENV, DRY_ENV, ROOT, SIMS, write_json

BUDGET_S = 480          # the whole command on the device: 8 of the lease's 15 minutes
DRY_BUDGET_S = 900      # CPU: only a runaway stage should hit it (the dry run takes 1-2 min)
RESERVE_S = 10          # kept back for the last summary and tarball
MIN_STAGE_S = 20        # a stage that would get less is not started
INTERRUPT_GRACE_S = 15  # after SIGINT at a stage's limit (pytest then writes its report), SIGKILL
SKIPPED_EXIT = 10       # a stage script's "this machine cannot run me" (sanitizer.py)
SMOKE_WORK_S = 75       # the smoke stops starting cases after this long on the GPU (its plan minus start-up)
OUT_FILES = ("summary.json", "session.log", "smoke.json", "targets.json", "prefill.json", "logs.tar.gz")
DRY_TESTS = "test_kernel_varlen_matches_padded or test_keep_ratio_with_lengths"


@dataclass(frozen=True)
class Stage:
    name: str
    plan_s: int      # expected seconds on an H100/H200
    limit_s: int     # the most it may take there (cut to what is left of the budget)
    basis: str       # where plan_s comes from: what was measured, what is a guess


STAGES = (
    Stage("build", 45, 180, "measured: the _cpu + sm_90 _cuda build took 16.5 s on 2 cores here "
                            "(nvcc 13.0, load 1.5); pip's editable install and the device's 16 cores: guess"),
    Stage("smoke", 85, 120, "guess: ~40 Triton JIT compiles (~1 s each: 24 cubins compiled in 23 s on 2 cores "
                            "here) + ~400 float64 certificates (~30 ms each, measured here); starts no case "
                            "after SMOKE_WORK_S = 75 s"),
    Stage("targets", 110, 150, "guess: 30 do_bench cases (>= 0.1 s each), anchor/torch loops on (b), "
                               "Triton compiles for each new shape"),
    Stage("prefill", 25, 60, "guess: 4 random 7B layers (1.9 GB bf16), two prompts, two selections"),
    Stage("tests_gram", 75, 150, "guess: 454 tests (count collected here) on 4 xdist workers, Triton compiles "
                                 "per shape class"),
    Stage("tests_row", 45, 120, "guess: the same tests, kernels compiled by then"),
    Stage("sanitizer", 60, 120, "guess: torch start-up under memcheck and racecheck, two tiny cases each"),
)
ALIASES = {"tests": ("tests_gram", "tests_row")}


# ----------------------------------------------------------------------------- pure helpers
def stage_timeout(stage: Stage, left_s: float) -> Optional[int]:
    """Seconds a stage may run when ``left_s`` remain of the budget, or None: do not start it."""
    t = min(stage.limit_s, int(left_s - RESERVE_S))
    return t if t >= MIN_STAGE_S else None


def select_stages(only: Optional[str]) -> list:
    """The stages to run, in canonical order: all, or the comma list ``only`` (aliases expanded)."""
    if not only:
        return list(STAGES)
    names = set()
    for name in (n.strip() for n in only.split(",") if n.strip()):
        names.update(ALIASES.get(name, (name,)))
    known = {s.name for s in STAGES}
    bad = sorted(names - known)
    if bad or not names:
        raise ValueError(f"--only: unknown stage(s) {bad or only!r}; choose from "
                         f"{', '.join([s.name for s in STAGES] + list(ALIASES))}")
    return [s for s in STAGES if s.name in names]


def plan_text(stages: list, budget_s: int, dry_run: bool) -> str:
    lines = ["GPU session plan" + (" (dry run on CPU: the stages and files of the GPU run; the plan is the "
                                   "GPU's)" if dry_run else ""),
             f"  the device lends 15 min per task: machine start (1-2 min), transfers, this command "
             f"(at most {budget_s} s = {budget_s / 60:.1f} min here), and a rerun of one stage",
             f"  {'stage':<11} {'plan':>6} {'limit':>6}  basis"]
    for s in stages:
        lines.append(f"  {s.name:<11} {s.plan_s:>5}s {s.limit_s:>5}s  {s.basis}")
    lines.append(f"  {'total':<11} {sum(s.plan_s for s in stages):>5}s  (each limit is cut to what is left "
                 f"of {budget_s} s; a stage given < {MIN_STAGE_S} s is not started)")
    return "\n".join(lines)


def junit_counts(path: str) -> dict:
    """``{"tests", "failures", "errors", "skipped", "failed": [first names]}`` of a pytest JUnit XML."""
    import xml.etree.ElementTree as ET
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["failed"] = failed[:10]
    return counts


def missing_files(stages: dict, present) -> list:
    """Files a session with these stage entries must have left in OUT but did not: the summary,
    the logs, and the result file of each stage that passed."""
    want = {"summary.json", "session.log", "logs.tar.gz"}
    want.update(f"{name}.json" for name, e in stages.items()
                if f"{name}.json" in OUT_FILES and e["status"] in ("passed", "partial"))
    return sorted(want - set(present))


def overall(stages: dict, missing: list = ()) -> tuple:
    """``(result, exit status)`` of the session from its stage entries and the missing files."""
    statuses = [s["status"] for s in stages.values()]
    if any(st in ("failed", "timeout") for st in statuses) or missing:
        return "failed", 1
    if "not_run" in statuses:
        return "incomplete", 2
    return "passed", 0


# ----------------------------------------------------------------------------- environment
COUNTS_FILE = os.path.join(ROOT, "bench", "results", "emu_counts.json")   # bench/emu_counts.py --record
COUNTED = ("barriers_per_round", "shuffle_levels_per_round", "ldg_trips_per_round", "kernel_launches")


def per_round(records: list, counts: list, cuda_backend: str) -> list:
    """The cuda backend's measured time per sequential round beside the emulator's counts of the
    kernels (bench/results/emu_counts.json, the newest generation) for the same target, method and
    batch 1 Gram mode: what the cost model's per-round estimate is checked against.
    ``us_per_round_call`` is the whole call's median over its rounds (an upper bound on the
    greedy kernel's round); ``us_per_round_no_gram`` takes the separately timed bf16 Gram bmm off
    first (approximate: the call's own Gram is fp32-output)."""
    gens = [c.get("kernels") for c in counts]
    newest = "after" if "after" in gens else (gens[-1] if gens else None)
    rows = []
    for r in records:
        if r.get("backend") != cuda_backend or not r.get("rounds_per_k") or not r.get("k") or \
                r.get("median_ms") is None:
            continue
        rounds = r["rounds_per_k"] * r["k"]
        row = {"target": r.get("target"), "method": r.get("method"), "batch": r.get("batch"), "k": r["k"],
               "rounds": round(rounds, 2), "median_ms": r["median_ms"],
               "us_per_round_call": round(1000.0 * r["median_ms"] / rounds, 3)}
        if r.get("gram_ms") is not None:
            row["us_per_round_no_gram"] = round(1000.0 * (r["median_ms"] - r["gram_ms"]) / rounds, 3)
        c = next((c for c in counts if c.get("kernels") == newest and c.get("target") == r.get("target")
                  and c.get("method") == r.get("method") and c.get("sim") == "gram"), None)
        if c is not None:
            row.update({key: c.get(key) for key in COUNTED}, counted_rounds=c.get("rounds"), counts_kernels=newest,
                       counts_commit=c.get("commit"))
        rows.append(row)
    return rows


def _cmd_output(cmd: list, timeout: float = 20.0) -> Optional[str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def _version(dist: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def gpu_facts() -> dict:
    fields = ("name", "driver_version", "memory.total", "compute_cap")
    q = _cmd_output(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"])
    if not q:
        return {"gpu": None}
    return dict(zip(("gpu", "driver", "gpu_memory", "compute_cap"), (v.strip() for v in q.splitlines()[0].split(","))))


def environment(commit_arg: Optional[str]) -> dict:
    sys.path.insert(0, os.path.join(ROOT, "csrc"))
    import build_flags
    nvcc = build_flags.find_nvcc()
    git = _cmd_output(["git", "rev-parse", "--short", "HEAD"])
    dirty = _cmd_output(["git", "status", "--porcelain", "--untracked-files=no"])
    env = {"python": platform.python_version(), "executable": sys.executable, "kernel": platform.release(),
           "cpus": os.cpu_count(),
           "nvcc": (_cmd_output([nvcc, "--version"]) or "?").splitlines()[-1] if nvcc else None,
           **{name: _version(name) for name in ("torch", "triton", "numpy", "transformers", "setuptools", "pytest",
                                                 "pytest-timeout", "pytest-xdist")},
           **gpu_facts()}
    if commit_arg:
        env["commit"], env["commit_source"] = commit_arg, "--commit (not checked: no .git on the device)"
        if git and not commit_arg.startswith(git) and not git.startswith(commit_arg):
            env["commit_source"] = f"--commit, but git says {git}"
    else:
        env["commit"], env["commit_source"] = git or "unknown", "git" if git else "no git: pass --commit"
    if git:
        env["dirty"] = bool(dirty)
    return env


# ----------------------------------------------------------------------------- running commands
class Runner:
    """Runs commands with their output streamed to a per-stage log and to ``session.log``."""

    def __init__(self, logs: str, session_log: str):
        self.logs, self.session_log = logs, session_log

    def run(self, stage: str, argv: list, env: dict, timeout_s: float) -> tuple:
        """``(exit status or None, timed_out, output)`` of one command; at the limit the whole
        process group gets SIGINT, then SIGKILL after INTERRUPT_GRACE_S."""
        captured = []
        with open(os.path.join(self.logs, f"{stage}.log"), "a", encoding="utf-8") as log, \
                open(self.session_log, "a", encoding="utf-8") as slog:
            header = f"$ {' '.join(argv)}\n"
            for f in (log, slog):
                f.write(header)
                f.flush()
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, errors="replace", start_new_session=True)

            def pump():
                for line in proc.stdout:
                    captured.append(line)
                    log.write(line)
                    slog.write(f"[{stage}] {line}")
                    log.flush()
                    slog.flush()
            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                self._signal(proc, signal.SIGINT)
                try:
                    proc.wait(timeout=INTERRUPT_GRACE_S)
                except subprocess.TimeoutExpired:
                    self._signal(proc, signal.SIGKILL)
                    proc.wait()
            reader.join(timeout=10)
        return proc.returncode, timed_out, "".join(captured)

    @staticmethod
    def _signal(proc, sig) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass


# ----------------------------------------------------------------------------- the session
class Session:
    def __init__(self, args):
        self.dry_run = args.dry_run
        self.budget_s = args.budget_s or (DRY_BUDGET_S if self.dry_run else BUDGET_S)
        default = os.path.join(ROOT, "bench-out", "gpu-session-dry" if self.dry_run else "gpu-session")
        self.out = os.path.abspath(args.out or os.environ.get("OUT") or default)
        os.makedirs(self.out, exist_ok=True)
        self.work = tempfile.mkdtemp(prefix="mmrprune-gpu-session-")
        self.logs = os.path.join(self.work, "logs")
        os.makedirs(self.logs)
        self.session_log = os.path.join(self.out, "session.log")
        self.runner = Runner(self.logs, self.session_log)
        self.start = time.monotonic()
        self.py = sys.executable
        self.target = common.Target(self.dry_run)
        self.commit_arg = args.commit
        self.summary = {}

    # ---------------------------------------------------------------- bookkeeping
    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def save(self) -> None:
        self.summary["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.summary["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.summary["files"] = sorted(f for f in os.listdir(self.out) if f in OUT_FILES)
        write_json(self.path("summary.json"), self.summary)
        with tarfile.open(self.path("logs.tar.gz") + ".tmp", "w:gz") as tar:
            tar.add(self.logs, arcname="logs")
        os.replace(self.path("logs.tar.gz") + ".tmp", self.path("logs.tar.gz"))

    def env(self, **extra) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
        if self.dry_run:
            env.update(DRY_ENV)
        if self.commit_arg:
            env[COMMIT_ENV] = self.commit_arg
        return env

    def script(self, name: str, *args) -> list:
        return [self.py, os.path.join(ROOT, "bench", "gpu", name), *args] + (["--dry-run"] if self.dry_run else [])

    def read_json(self, path: str):
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    # ---------------------------------------------------------------- stages
    def stage_build(self, timeout: float) -> tuple:
        sys.path.insert(0, os.path.join(ROOT, "csrc"))
        import build_flags
        if build_flags.find_nvcc() is None:
            if self.dry_run:
                return "skipped", {"reason": "nvcc not found: the CUDA build cannot be tried here"}
            return "failed", {"reason": "nvcc not found (PATH, CUDA_HOME, CUDA_PATH, /usr/local/cuda)"}
        cap = (self.summary["environment"].get("compute_cap") or "9.0").replace(".", "")
        flags = dict(MMRPRUNE_CUDA="1", MMRPRUNE_CUDA_ARCHS=cap, MMRPRUNE_CUDA_EMU="0",
                     MAX_JOBS=str(os.cpu_count() or 2))
        if self.dry_run:
            # the device's extension alone, by setup.py's own build, into a temporary folder: this
            # checkout's build and install stay as they are, and the C++ module, which CI's
            # scripts/setup.sh has just built, is not compiled twice (ptxas's report: build.log)
            argv = [self.py, "setup.py", "check_cuda", "--build-dir", os.path.join(self.work, "build"),
                    "--resource-usage"]
        else:              # offline, no build isolation: the image has setuptools, pybind11 and ninja
            argv = [self.py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
                    "--use-pep517", "-e", "."]
        t0 = time.monotonic()
        rc, timed_out, _ = self.runner.run("build", argv, self.env(**flags), timeout)
        detail = {"archs": cap, "command": " ".join(argv), "compile_s": round(time.monotonic() - t0, 1)}
        if timed_out or rc != 0:
            if not self.dry_run and self.left_s() > 2 * MIN_STAGE_S + RESERVE_S:
                # without the package installed nothing after this runs; without _cuda the Triton
                # halves of the later stages still do
                rc2, _, _ = self.runner.run("build", argv, self.env(**dict(flags, MMRPRUNE_CUDA="0")),
                                            max(MIN_STAGE_S, self.left_s() / 4))
                detail["fallback"] = ("installed without the CUDA extension (MMRPRUNE_CUDA=0) so that the "
                                      "Triton parts of the later stages run" if rc2 == 0 else
                                      f"the install without the CUDA extension failed too (exit {rc2})")
            return ("timeout" if timed_out else "failed"), detail
        if self.dry_run and not glob.glob(os.path.join(self.work, "build", "_cuda*.so")):
            return "failed", dict(detail, reason="the build finished but left no _cuda*.so")
        rc, timed_out, out = self.runner.run("build", [self.py, "-m", "mmrprune", "info", "--json"], self.env(),
                                             max(30.0, timeout - (time.monotonic() - t0)))
        info = None
        if rc == 0 and not timed_out:
            try:
                info = json.loads(out[out.index("{"):])
            except ValueError:
                info = None
        if info is None:
            return "failed", dict(detail, reason="python -m mmrprune info --json failed after the build")
        detail["backends"] = {name: b["available"] for name, b in info["backends"].items()}
        missing = [b for b in self.target.backends if not detail["backends"].get(b)]
        if missing:
            why = {b: info["backends"][b]["detail"] for b in missing}
            return "failed", dict(detail, reason=f"backends not available after the build: {why}")
        return "passed", detail

    def stage_smoke(self, timeout: float) -> tuple:
        out = self.path("smoke.json")
        budget = max(10, timeout - 30 if self.dry_run else min(SMOKE_WORK_S, timeout - 30))
        rc, timed_out, _ = self.runner.run("smoke", self.script("smoke.py", "--out", out, "--budget-s", str(budget)),
                                           self.env(), timeout)
        res = self.read_json(out) or {}
        detail = {key: res.get(key) for key in ("complete", "cases", "checks", "aborted", "seconds")}
        detail["failures"] = (res.get("failures") or [])[:3]
        if timed_out:
            return "timeout", detail
        if rc != 0:
            return "failed", detail
        return ("passed" if res.get("complete") else "partial"), detail

    def stage_records(self, name: str, timeout: float) -> tuple:
        out = self.path(f"{name}.json")
        rc, timed_out, _ = self.runner.run(name, self.script(f"{name}.py", "--out", out), self.env(), timeout)
        records = self.read_json(out) or []
        detail = {"records": len(records)}
        if timed_out:
            return "timeout", detail
        return ("passed" if rc == 0 else "failed"), detail

    def stage_tests(self, name: str, timeout: float) -> tuple:
        from gpu_tests import FILES
        sim = SIMS["gram" if name == "tests_gram" else "row"]
        xml = os.path.join(self.logs, f"{name}.xml")
        argv = [self.py, "-m", "pytest", *FILES, "-q", "-p", "no:cacheprovider", "-x", "-p", "gpu_tests",
                "--gpu-backends", ",".join(self.target.backends), "--gpu-device", self.target.device,
                "--gpu-sim", sim, f"--junitxml={xml}"]
        if importlib.util.find_spec("pytest_timeout"):
            argv += ["--timeout", "120"]
        if importlib.util.find_spec("xdist") and not self.dry_run:
            argv += ["-n", str(max(1, min(4, (os.cpu_count() or 2) // 4)))]
        if self.dry_run:
            argv += ["-k", DRY_TESTS]
        path = os.pathsep.join(p for p in (os.path.join(ROOT, "bench", "gpu"), os.environ.get("PYTHONPATH")) if p)
        rc, timed_out, _ = self.runner.run(name, argv, self.env(PYTHONPATH=path),
                                           timeout)
        detail = junit_counts(xml) if os.path.exists(xml) else {"reason": "no JUnit report"}
        if timed_out:
            return "timeout", detail
        return ("passed" if rc == 0 else "failed"), detail

    def stage_sanitizer(self, timeout: float) -> tuple:
        report = os.path.join(self.logs, "sanitizer.json")
        per_tool = str(max(10, (timeout - 10) // 2))
        argv = self.script("sanitizer.py", "run", "--out", report, "--tool-timeout-s", per_tool)
        rc, timed_out, _ = self.runner.run("sanitizer", argv, self.env(), timeout)
        res = self.read_json(report) or {}
        detail = {"status": res.get("status"), "reason": res.get("reason")}
        if timed_out:
            return "timeout", detail
        return {0: "passed", SKIPPED_EXIT: "skipped"}.get(rc, "failed"), detail

    # ---------------------------------------------------------------- main loop
    def run(self, stages: list) -> int:
        mode = "dry run (CPU)" if self.dry_run else "GPU"
        plan = plan_text(stages, self.budget_s, self.dry_run)
        print(plan, flush=True)
        with open(self.session_log, "w", encoding="utf-8") as f:   # exists even if no stage starts
            f.write(plan + "\n")
        print(f"results: {self.out} ({', '.join(OUT_FILES)}); logs: {self.logs}", flush=True)
        self.summary = {"session": "dry-run" if self.dry_run else "gpu", "command": " ".join(sys.argv),
                        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "budget_s": self.budget_s, "result": "running",
                        "plan": [{"stage": s.name, "plan_s": s.plan_s, "limit_s": s.limit_s, "basis": s.basis}
                                 for s in stages],
                        "environment": environment(self.commit_arg), "stages": {}}
        self.save()
        print(f"environment: {json.dumps(self.summary['environment'])}", flush=True)
        for i, stage in enumerate(stages, 1):
            timeout = stage_timeout(stage, self.left_s())
            entry = {"plan_s": stage.plan_s}
            if timeout is None:
                entry.update(status="not_run", seconds=0,
                             detail={"reason": f"{self.left_s():.0f} s left of the {self.budget_s} s budget"})
            else:
                print(f"==> [{i}/{len(stages)}] {stage.name} (limit {timeout} s, plan {stage.plan_s} s, {mode})",
                      flush=True)
                t0 = time.monotonic()
                try:
                    status, detail = self.run_stage(stage.name, timeout)
                except Exception as exc:  # a bug here must not cost the stages after it
                    status, detail = "failed", {"reason": f"session.py: {type(exc).__name__}: {exc}"}
                entry.update(status=status, seconds=round(time.monotonic() - t0, 1), limit_s=timeout, detail=detail)
            self.summary["stages"][stage.name] = entry
            self.summary["targets"] = self.targets()
            self.save()
            print(f"<== {stage.name}: {entry['status']} in {entry['seconds']} s (plan {stage.plan_s} s) "
                  f"{json.dumps(entry.get('detail', {}))[:600]}", flush=True)
            if entry["status"] in ("failed", "timeout"):
                self.print_tail(stage.name)
        self.save()
        missing = missing_files(self.summary["stages"], os.listdir(self.out))
        if missing:
            self.summary["missing_files"] = missing
        self.summary["result"], code = overall(self.summary["stages"], missing)
        self.save()
        self.print_final()
        shutil.rmtree(self.work, ignore_errors=True)
        return code

    def run_stage(self, name: str, timeout: float) -> tuple:
        if name == "build":
            return self.stage_build(timeout)
        if name == "smoke":
            return self.stage_smoke(timeout)
        if name in ("targets", "prefill"):
            return self.stage_records(name, timeout)
        if name.startswith("tests_"):
            return self.stage_tests(name, timeout)
        return self.stage_sanitizer(timeout)

    def targets(self) -> dict:
        records = (self.read_json(self.path("targets.json")) or []) + (self.read_json(self.path("prefill.json")) or [])
        rows = goals.evaluate(records, self.target.cuda_backend)
        counts = self.read_json(COUNTS_FILE) or []
        return {"tally": goals.tally(rows), "rows": rows,
                "per_round": per_round(records, counts, self.target.cuda_backend),
                "note": "dry run: tiny CPU shapes, the numbers mean nothing" if self.dry_run else ""}

    def print_tail(self, name: str, lines: int = 25) -> None:
        try:
            with open(os.path.join(self.logs, f"{name}.log"), encoding="utf-8", errors="replace") as f:
                tail = f.readlines()[-lines:]
        except OSError:
            return
        print(f"---- last {len(tail)} lines of {name}.log ----\n{''.join(tail)}----", flush=True)

    def print_final(self) -> None:
        print(f"\n{'stage':<11} {'status':<9} {'s':>6} {'plan':>5}", flush=True)
        for name, e in self.summary["stages"].items():
            print(f"{name:<11} {e['status']:<9} {e['seconds']:>6} {e['plan_s']:>5}")
        t = self.summary["targets"]
        print(f"targets: {t['tally']}{' (' + t['note'] + ')' if t['note'] else ''}")
        for row in [] if self.dry_run else t["rows"]:
            if row["ok"] is not None:
                print(f"  ({row['target']}) {row['what']}: {row['value']:.4g} {row['unit']} "
                      f"(limit {row['limit']:g}) {'ok' if row['ok'] else 'MISSED'}")
        for row in [] if self.dry_run else t.get("per_round", []):
            print(f"  ({row['target']}) {row['method']} B={row['batch']}: {row['rounds']} rounds, "
                  f"{row['us_per_round_call']} us/round (call), {row.get('us_per_round_no_gram')} us/round "
                  f"(less the bf16 Gram); counted per round: {row.get('barriers_per_round')} barriers, "
                  f"{row.get('shuffle_levels_per_round')} shuffle levels")
        print(f"result: {self.summary['result']} in {self.summary['elapsed_s']} s; files in {self.out}: "
              f"{', '.join(self.summary['files'])}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bash bench/gpu_session.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="on CPU: cuda_emu, Triton's interpreter, tiny shapes")
    p.add_argument("--out", help="results folder (default $OUT, else bench-out/gpu-session[-dry])")
    p.add_argument("--only", help="comma list of stages to run (tests = tests_gram,tests_row); build is "
                                  "added when the CUDA extension is not importable")
    p.add_argument("--budget-s", type=int, help=f"seconds for the whole command (default {BUDGET_S}; dry run "
                                               f"{DRY_BUDGET_S})")
    p.add_argument("--commit", help="the commit the working tree is at (the device's copy has no .git)")
    p.add_argument("--plan", action="store_true", help="print the plan and exit")
    args = p.parse_args(argv)
    try:
        stages = select_stages(args.only)
    except ValueError as exc:
        p.print_usage(sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return 3
    if args.plan:
        print(plan_text(stages, args.budget_s or (DRY_BUDGET_S if args.dry_run else BUDGET_S), args.dry_run))
        return 0
    if args.only and stages[0].name != "build" and not extension_ready(args.dry_run):
        stages.insert(0, STAGES[0])
    return Session(args).run(stages)


def extension_ready(dry_run: bool) -> bool:
    """True when the extension the stages need imports (so ``--only`` can leave the build out)."""
    module = "mmrprune._cuda_emu" if dry_run else "mmrprune._cuda"
    return subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True).returncode == 0


if __name__ == "__main__":
    sys.exit(main())
