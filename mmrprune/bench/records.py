"""Benchmark records: the environment fields, JSON / CSV files and the terminal table.

A record is a flat ``dict`` (docs/contract.md, "Benchmark records").  Every record
carries :data:`REQUIRED_FIELDS`; speed records add ``images_per_s``,
``speedup_vs_torch`` and ``speedup_vs_anchor`` (``None`` where the baseline
was not run).
"""
from __future__ import annotations

import csv
import functools
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from typing import Iterable, Sequence

REQUIRED_FIELDS = ("device", "backend", "method", "batch", "tokens", "dim", "k", "lam", "dtype",
                   "median_ms", "p20_ms", "p80_ms", "us_per_step", "commit", "torch", "triton", "command")
SPEED_FIELDS = REQUIRED_FIELDS + ("images_per_s", "speedup_vs_torch", "speedup_vs_anchor")


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (or ``platform``), with the core count."""
    name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    return f"{name} ({os.cpu_count()} logical cores)"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model()


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    """``git rev-parse --short HEAD`` of the source tree of this package, or ``"unknown"``."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


@functools.lru_cache(maxsize=None)
def versions() -> dict:
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # triton is optional
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version}


def command_line(argv: Sequence[str] | None) -> str:
    """The full command that produced a record (``argv`` given to ``main``, else ``sys.argv``)."""
    if argv is None:
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "mmrprune-bench"
        if prog in ("__main__.py", "-c", "-m"):
            prog = "python -m mmrprune.bench"
        return " ".join([prog] + [shlex.quote(a) for a in sys.argv[1:]])
    return " ".join(["mmrprune-bench"] + [shlex.quote(a) for a in argv])


def environment(device: str, argv: Sequence[str] | None) -> dict:
    """The fields every record of one run shares."""
    return {"device": device_name(device), "commit": git_commit(), **versions(), "command": command_line(argv)}


FRESH_OUT = "bench-out"           # parent of the fresh output folders (git-ignored)
COMMITTED_OUT = "bench/results"   # the committed records, rewritten only with --update-committed


def output_paths(kind: str, out_dir, figure, update_committed: bool, committed_figure: str, figure_name: str,
                 error) -> tuple:
    """``(out_dir, figure)`` of a subcommand that writes records and a figure.

    By default a new folder ``bench-out/<kind>-<date>-<time>`` (the figure inside it), so no
    run overwrites an earlier one or the committed results; ``update_committed`` gives the
    committed paths (from the repository root only).  ``error(message)`` reports a usage error.
    """
    import time
    if update_committed:
        if out_dir or figure:
            error(f"--update-committed writes {COMMITTED_OUT}/ and {committed_figure} itself; "
                  "drop --out-dir and the figure path")
        if not os.path.isdir(COMMITTED_OUT) or not os.path.isdir(os.path.dirname(committed_figure)):
            error(f"--update-committed: run it from the repository root (no {COMMITTED_OUT}/ here)")
        return COMMITTED_OUT, committed_figure
    if out_dir is None:
        base = out_dir = os.path.join(FRESH_OUT, time.strftime(f"{kind}-%Y%m%d-%H%M%S"))
        n = 1
        while os.path.exists(out_dir):  # two runs within one second
            n += 1
            out_dir = f"{base}-{n}"
        os.makedirs(out_dir)
    return out_dir, figure or os.path.join(out_dir, figure_name)


def _parent(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)


def write_json(path: str, records: list) -> None:
    _parent(path)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
        f.write("\n")


def write_csv(path: str, records: list, fields: Sequence[str] = ()) -> None:
    """CSV with ``fields`` first, then every other key in first-seen order."""
    cols = list(fields)
    for r in records:
        cols += [key for key in r if key not in cols]
    _parent(path)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        for r in records:
            w.writerow({key: ("" if v is None else v) for key, v in r.items()})


def format_number(v) -> str:
    """A table cell or chart label: thousands separators, 2-3 significant digits, never e-notation."""
    if v is None:
        return "-"
    if isinstance(v, float):
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{v:,.0f}"
        if v == int(v) and a < 1000:
            return str(int(v))
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        return f"{v:.{2 - math.floor(math.log10(a))}f}"  # 3 significant digits, fixed point
    return str(v)


def format_table(rows: Iterable[dict], columns: Sequence[tuple]) -> str:
    """Aligned text table. ``columns`` = ``(header, key)``; numbers align right."""
    rows = list(rows)
    cells = [[format_number(r.get(key)) for _, key in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (h, _) in enumerate(columns)]
    numeric = [all(isinstance(r.get(key), (int, float)) or r.get(key) is None for r in rows) and rows != []
               for _, key in columns]

    def fmt(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    lines = [fmt([h for h, _ in columns]), "  ".join("-" * w for w in widths)]
    lines += [fmt(c) for c in cells]
    return "\n".join(lines)
