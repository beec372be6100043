"""compute-sanitizer stage of the GPU session: memcheck and racecheck on two tiny cases.

    python3 bench/gpu/sanitizer.py run --out sanitizer.json [--dry-run]   # the stage
    python3 bench/gpu/sanitizer.py cases [--dry-run]                     # what runs under the tool

``cases``: the cuda backend on one tiny padded + packed batch per similarity mode (row
mode in float16 with D = 70, the scalar-load path; Gram mode in bfloat16 with D = 64),
every kernel method, each image's picks checked by the step certificate; prints
:data:`DONE` last.  ``run``: ``compute-sanitizer --tool memcheck`` then ``--tool racecheck``
on ``cases``, instrumenting only this package's kernels (namespace ``mmrprune_cuda``).
Each run is classified by :func:`classify`: ``passed``; ``errors`` (the tool found
something in our kernels: exit 1); ``unavailable`` (the tool cannot run on this machine,
e.g. "Device not supported" under gVisor: exit 10, and racecheck is not tried); or
``failed`` (anything else, e.g. the cases crashed: exit 1).  Without compute-sanitizer
the cases run without it and the stage exits 10.  ``--dry-run``: the cases run on
``cuda_emu`` (under the tool too, where one is found).
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import common  # first: sys.path, --dry-run's env
from common import MODES, TARGET, kernel_methods, tuning, write_json

DONE = "SANITIZER CASES DONE"
ERROR_EXITCODE = 3
TOOLS = ("memcheck", "racecheck")
KERNEL_FILTER = "kns=mmrprune_cuda"      # the namespace of every kernel in csrc/cuda
EXIT_SKIPPED = 10
# what compute-sanitizer prints when it cannot run on the machine (not a finding about our code)
UNAVAILABLE = ("Device not supported", "device is not supported", "Unable to find injection library",
               "Target application terminated before first instrumented API call",
               "Unsupported device", "not supported on this platform")


def classify(rc: int, output: str) -> tuple:
    """``(status, reason)`` of one compute-sanitizer run of :func:`cases` (see the module docstring)."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    summary = next((ln for ln in reversed(lines) if re.search(r"(ERROR|RACECHECK) SUMMARY:", ln)), "")
    found = re.search(r"SUMMARY: (\d+) (error|hazard)", summary)
    if rc == ERROR_EXITCODE or (found and int(found.group(1)) > 0):
        return "errors", summary or f"exit status {rc} (the tool's error exit code)"
    if rc == 0 and DONE in output:
        return "passed", summary or "no summary line"
    marker = next((ln for ln in lines if any(m.lower() in ln.lower() for m in UNAVAILABLE)), None)
    if marker is not None:
        return "unavailable", marker
    if DONE not in output:
        return "failed", f"the cases did not finish (exit status {rc}); last line: {lines[-1] if lines else ''}"
    return "failed", f"exit status {rc} after the cases finished; {summary}"


# ----------------------------------------------------------------------------- cases
def cases() -> int:
    import torch

    import certify as C
    import mmrprune
    dev, backend = TARGET.device, TARGET.cuda_backend
    shapes = {"row": (torch.float16, 70), "gram": (torch.bfloat16, 64)}
    n, k = TARGET.size(600, 20), TARGET.size(24, 4)
    lengths = [n, n // 2 + 1, 1]
    for mode in MODES:
        tune = tuning(mode, backend)
        dtype, dim = shapes[mode]
        g = torch.Generator().manual_seed(len(mode))
        x = torch.randn(len(lengths), n, dim, generator=g).to(dtype)
        w = torch.rand(len(lengths), n, generator=g)
        cu = torch.tensor([0, *itertools.accumulate(lengths)], device=dev)
        packed = torch.cat([x[b, :m] for b, m in enumerate(lengths)])
        packed_w = torch.cat([w[b, :m] for b, m in enumerate(lengths)])
        for method in kernel_methods(backend):
            out = mmrprune.select(x.to(dev), w.to(dev), k=k, method=method, lengths=torch.tensor(lengths, device=dev),
                                  backend=backend, order="selection", **tune).cpu()
            flat, cu_k = mmrprune.select_varlen(packed.to(dev), packed_w.to(dev), cu, k=k, method=method,
                                                backend=backend, order="selection", **tune)
            flat, cu_k = flat.cpu(), cu_k.cpu()
            for b, m in enumerate(lengths):
                C.check_certificate(x[b, :m], w[b, :m], out[b], method=method, lam=0.5, tol=C.tol_for(dtype),
                                    k=min(k, m))
                assert torch.equal(flat[cu_k[b]:cu_k[b + 1]] - int(cu[b]), out[b, :min(k, m)]), (mode, method, b)
            print(f"[sanitizer] case {mode} {method}: ok", flush=True)
    print(DONE, flush=True)
    return 0


# ----------------------------------------------------------------------------- the stage
def run_group(cmd: list, timeout_s: float) -> tuple:
    """``(rc, output, timed_out)``; on timeout the tool and the program it runs are killed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, out, False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return proc.returncode, out, True


def find_sanitizer():
    """compute-sanitizer on PATH, else in the CUDA toolkit of nvcc (``bin/`` or ``compute-sanitizer/``)."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    sys.path.insert(0, os.path.join(common.ROOT, "csrc"))
    import build_flags
    home = build_flags.cuda_home(build_flags.find_nvcc())
    for rel in ("bin", "compute-sanitizer"):
        path = os.path.join(home or "/usr/local/cuda", rel, "compute-sanitizer")
        if os.path.exists(path):
            return path
    return None


def run(out_path: str, tool_timeout_s: float) -> int:
    exe = find_sanitizer()
    me = [sys.executable, os.path.abspath(__file__), "cases"] + (["--dry-run"] if TARGET.dry_run else [])
    report = {"target": TARGET.name, "compute_sanitizer": exe, "kernel_filter": KERNEL_FILTER, "runs": []}
    if exe is None:
        why = "compute-sanitizer not found (PATH, the CUDA toolkit of nvcc, /usr/local/cuda)"
        t0 = time.perf_counter()
        proc = subprocess.run(me, capture_output=True, text=True)
        print(proc.stdout + proc.stderr, flush=True)
        report["runs"].append({"tool": None, "rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
                               "status": "passed" if proc.returncode == 0 and DONE in proc.stdout else "failed"})
        report["status"], report["reason"] = "skipped", f"{why}: the cases ran without the sanitizer"
        write_json(out_path, report)
        print(f"[sanitizer] skipped: {report['reason']} ({report['runs'][0]['status']})", flush=True)
        return EXIT_SKIPPED if report["runs"][0]["status"] == "passed" else 1
    status = "passed"
    for tool in TOOLS:
        # API errors torch meets and handles itself are not findings about our kernels
        cmd = [exe, "--tool", tool, "--error-exitcode", str(ERROR_EXITCODE), "--kernel-name", KERNEL_FILTER,
               "--report-api-errors", "no", "--print-limit", "20", *me]
        t0 = time.perf_counter()
        print(f"[sanitizer] {' '.join(cmd)}", flush=True)
        rc, output, timed_out = run_group(cmd, tool_timeout_s)
        result, reason = ("failed", f"timed out after {tool_timeout_s:g} s") if timed_out else classify(rc, output)
        print(output[-6000:], flush=True)
        report["runs"].append({"tool": tool, "rc": rc, "seconds": round(time.perf_counter() - t0, 1),
                               "status": result, "reason": reason})
        print(f"[sanitizer] {tool}: {result} ({reason})", flush=True)
        write_json(out_path, report)
        if result == "unavailable":   # the machine, not our code: racecheck would say the same
            status = "skipped"
            break
        if result != "passed":
            status = "failed"
    report["status"] = status
    report["reason"] = "; ".join(f"{r['tool']}: {r['status']} ({r['reason']})" for r in report["runs"])
    write_json(out_path, report)
    return {"passed": 0, "skipped": EXIT_SKIPPED}.get(status, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="the stage: each tool on the cases")
    r.add_argument("--out", required=True, help="JSON report")
    r.add_argument("--tool-timeout-s", type=float, default=45.0, help="limit of one tool's run (default 45)")
    r.add_argument("--dry-run", action="store_true")
    c = sub.add_parser("cases", help="the tiny cases (what runs under the tool)")
    c.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    if args.command == "cases":
        return cases()
    return run(args.out, args.tool_timeout_s)


if __name__ == "__main__":
    raise SystemExit(main())
