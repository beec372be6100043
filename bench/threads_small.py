"""Threads by problem size on the ``cpu`` backend: 1 thread, 2 threads always, 2 threads as
chosen by size (csrc/cpu/select.cpp, ``threads_for``), median and worst call, with the load
average around each measurement.  ``call`` is ``kernel`` (the C++ call alone, on prepared
rows: what the thread choice governs) or ``select`` (the public call, whose input checks and
preparation are torch ops on torch's own threads).

    python bench/threads_small.py --label quiet|loaded [--repeats 30] [--out PATH | --update-committed]

Writes a list of flat records (bench/results/README.md); ``mode`` is ``1`` / ``2-always`` /
``2-by-size``.  Run it once on a quiet machine and once beside other busy processes; each
record keeps the 1-minute load average before and after its measurement.  The file goes to
bench-out/threads_small-<date>-<time>/ unless --out is given; --update-committed (from the
repository root) rewrites bench/results/cpu_threads_small_<label>.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

import mmrprune
from mmrprune import ops
from mmrprune.bench.records import add_output_arguments, environment, output_file, write_json

ENV = "MMRPRUNE_CPU_WORK_PER_THREAD"
# (B, N, D, k): the small call, a sweep around the threshold, and the large B = 1 shape
SHAPES = [(2, 100, 64, 25), (2, 300, 64, 32), (2, 300, 128, 64), (1, 576, 128, 144), (2, 300, 384, 75),
          (1, 576, 384, 144), (2, 576, 384, 144), (8, 1024, 384, 256), (1, 2691, 3584, 673)]
MODES = (("1", 1, None), ("2-always", 2, "0"), ("2-by-size", 2, None))


def _calls(x, w, k):
    b, n, d = x.shape
    rows, imp = x.reshape(b * n, d).contiguous(), w.reshape(b * n).contiguous()
    starts, lengths = torch.arange(b) * n, torch.full((b,), n)
    ks = torch.full((b,), k)
    return {"kernel": lambda: torch.ops.mmrprune.cpu_select(rows, imp, None, starts, lengths, ks, k, "mmr", 0.5, 0.0, 1.0, 0.0, 0, 0),
            "select": lambda: mmrprune.select(x, w, k=k, method="mmr", backend="cpu")}


def _time(fn, repeats):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return np.array(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--label", required=True, choices=("quiet", "loaded"), help="the machine's state, kept in every record")
    add_output_arguments(p, "threads_small", "the JSON records", "bench/results/cpu_threads_small_<label>.json")
    args = p.parse_args(argv)
    out = output_file("threads_small", args.out, args.update_committed,
                      f"bench/results/cpu_threads_small_{args.label}.json", p.error)
    given = sys.argv[1:] if argv is None else list(argv)
    common = dict(environment("cpu", given), command=" ".join(["python bench/threads_small.py"] + given))
    records = []
    for b, n, d, k in SHAPES:
        rng = np.random.default_rng(0)
        x = torch.from_numpy(rng.standard_normal((b, n, d)).astype(np.float32))
        w = torch.from_numpy(rng.random((b, n)).astype(np.float32))
        repeats = max(5, args.repeats // 6) if n * d > 1e6 else args.repeats
        for (call, fn), (mode, threads, env) in [(c, m) for c in _calls(x, w, k).items() for m in MODES]:
            torch.set_num_threads(threads)
            if env is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = env
            load0 = os.getloadavg()[0]
            t = _time(fn, repeats)
            load1 = os.getloadavg()[0]
            rec = dict(common, backend="cpu", call=call, method="mmr", batch=b, tokens=n, dim=d, k=k, lam=0.5, dtype="float32",
                       mode=mode, threads=threads, median_ms=float(np.median(t)),
                       p20_ms=float(np.percentile(t, 20)), p80_ms=float(np.percentile(t, 80)),
                       max_ms=float(t.max()), repeats=repeats, us_per_step=float(np.median(t)) * 1e3 / k,
                       load_1min=[round(load0, 2), round(load1, 2)], label=args.label,
                       work=b * n * k * d)
            records.append(rec)
            print(f"{b}x{n}x{d} k={k:<4} {call:<6} {mode:<10} median {rec['median_ms']:8.3f} ms  max {rec['max_ms']:8.3f} ms"
                  f"  load {load0:.2f}-{load1:.2f}", flush=True)
        os.environ.pop(ENV, None)
    write_json(out, records)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
