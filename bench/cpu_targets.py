"""CPU targets of the C++ backend: real DINOv2 tokens and one large random image.

    python bench/cpu_targets.py [--repeats 10] [--threads 2] [--out PATH | --update-committed]

Case 1: the 8 DINOv2 ViT-S/14 images (B=8 x N=1024 x D=384), k=256, lam=0.5, float32.
Case 2: B=1 x N=2691 x D=3584 clustered random tokens (a Qwen2-VL-sized image), keep 25%.
Each case times (1 warm-up, then the median of --repeats; numpy gets fewer):
  cpu     mmrprune.select(..., backend="cpu")      (the C++ extension)
  torch   mmrprune.select(..., backend="torch")
  anchor  mmrprune.baselines.anchor_mmr            (published-style per-image loop)
  bmm     one float32 torch.bmm computing the B N x N similarity matrices (normalised input)
  numpy   mmrprune.reference.select_mmr per image  (float64 ground truth)
Targets: cpu >= 3x faster than anchor, faster than the bmm alone, >= 3x faster than numpy.
Case 3 (``threads``): case 2's shape in bfloat16, the cpu backend with 1 and with 2
threads, calls interleaved (1, 2, 1, 2, ...) so both see the same machine load; the
picks must be identical.  Target: 2 threads >= 1.6x faster than 1 thread at B = 1.
Every record carries the load average (``os.getloadavg``) at the start of its case.
Records follow docs/contract.md, "Benchmark records".  They go to a new folder
bench-out/cpu_targets-<date>-<time>/ unless --out is given; --update-committed (from the
repository root) rewrites the committed bench/results/cpu_targets.json (with --only-threads:
cpu_threads_b1.json).
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mmrprune.bench.records import add_output_arguments, output_file, write_json  # noqa: E402

# torch loads after the arguments are parsed: --help and usage errors stay instant
COMMITTED = {False: "bench/results/cpu_targets.json", True: "bench/results/cpu_threads_b1.json"}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def triton_version():
    try:
        import triton
        return triton.__version__
    except Exception:
        return None


def timeit(fn, repeats: int, warmup: int = 1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times)), float(np.percentile(times, 20)), float(np.percentile(times, 80))


def clustered(n, d, seed=0, centres=16):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(d)
    cs = base + 0.6 * rng.standard_normal((centres, d))
    x = cs[rng.integers(0, centres, size=n)] + 0.05 * np.linalg.norm(base) / np.sqrt(d) * rng.standard_normal((n, d))
    return x.astype(np.float32)


def run_thread_scaling(name, x, w, k, lam, repeats, common, threads=(1, 2)):
    """The cpu backend at B = 1 with each thread count, calls interleaved; identical picks required."""
    import torch

    import mmrprune
    b, n, d = x.shape
    load = os.getloadavg()
    picks, times = {}, {t: [] for t in threads}
    for rep in range(repeats + 1):   # round 0 is the warm-up
        for t in threads:
            torch.set_num_threads(t)
            t0 = time.perf_counter()
            out = mmrprune.select(x, w, k=k, lam=lam, method="mmr", backend="cpu", order="selection")
            if rep:
                times[t].append((time.perf_counter() - t0) * 1e3)
            picks.setdefault(t, out)
            if not torch.equal(picks[t], out) or not torch.equal(picks[threads[0]], out):
                raise SystemExit(f"{name}: picks with {t} threads differ")
    records = []
    for t in threads:
        med, p20, p80 = float(np.median(times[t])), float(np.percentile(times[t], 20)), float(np.percentile(times[t], 80))
        records.append({**common, "threads": t, "case": name, "backend": "cpu", "method": "mmr", "batch": b,
                        "tokens": n, "dim": d, "k": k, "lam": lam, "dtype": str(x.dtype).replace("torch.", ""),
                        "median_ms": round(med, 3), "p20_ms": round(p20, 3), "p80_ms": round(p80, 3),
                        "us_per_step": round(med * 1e3 / k, 3), "repeats": repeats, "loadavg": list(load)})
        print(f"{name:>10} cpu {t} thread(s): median {med:9.2f} ms  (p20 {p20:.2f}, p80 {p80:.2f}, {repeats} runs)",
              flush=True)
    speedup = records[0]["median_ms"] / records[-1]["median_ms"]
    for r in records:
        r["speedup_vs_1_thread"] = round(records[0]["median_ms"] / r["median_ms"], 3)
    print(f"{name:>10} {threads[-1]} threads vs 1: {speedup:.2f}x (load average {load[0]:.1f}, identical picks)")
    return records


def run_case(name, x, w, k, lam, repeats, numpy_repeats, common):
    """x [B, N, D] float32, w [B, N] float32."""
    import torch

    import mmrprune
    from mmrprune import reference as R
    from mmrprune.baselines import anchor_mmr
    b, n, d = x.shape
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    x64, w64 = x.double().numpy(), w.double().numpy()
    cases = {
        "cpu": (lambda: mmrprune.select(x, w, k=k, lam=lam, method="mmr", backend="cpu"), repeats),
        "torch": (lambda: mmrprune.select(x, w, k=k, lam=lam, method="mmr", backend="torch"), repeats),
        "anchor": (lambda: anchor_mmr(x, w, k, lam), repeats),
        "bmm": (lambda: torch.bmm(xn, xn.transpose(1, 2)), repeats),
        "numpy": (lambda: [R.select_mmr(x64[i], w64[i], k, lam) for i in range(b)], numpy_repeats),
    }
    # sanity: the timed backends agree with the reference on this input's picks count
    assert mmrprune.select(x, w, k=k, lam=lam, backend="cpu").shape == (b, k)
    records = []
    for backend, (fn, reps) in cases.items():
        med, p20, p80 = timeit(fn, reps)
        records.append({**common, "case": name, "backend": backend, "method": "mmr" if backend != "bmm" else "bmm",
                        "batch": b, "tokens": n, "dim": d, "k": k, "lam": lam, "dtype": "float32",
                        "median_ms": round(med, 3), "p20_ms": round(p20, 3), "p80_ms": round(p80, 3),
                        "us_per_step": round(med * 1e3 / k, 3) if backend != "bmm" else None,
                        "repeats": reps})
        print(f"{name:>10} {backend:>7}: median {med:9.2f} ms  (p20 {p20:.2f}, p80 {p80:.2f}, {reps} runs)", flush=True)
    by = {r["backend"]: r["median_ms"] for r in records}
    print(f"{name:>10} cpu speed-up: {by['anchor'] / by['cpu']:.1f}x vs anchor, {by['bmm'] / by['cpu']:.2f}x vs bmm, "
          f"{by['numpy'] / by['cpu']:.1f}x vs numpy, {by['torch'] / by['cpu']:.1f}x vs torch")
    return records


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments, ``out`` resolved to the file this run writes."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--numpy-repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    add_output_arguments(ap, "cpu_targets", "the JSON records",
                         f"{COMMITTED[False]} ({COMMITTED[True]} with --only-threads)")
    ap.add_argument("--note", default="", help="free text stored in every record (e.g. 'shared machine, under load')")
    ap.add_argument("--only-threads", action="store_true", help="run case 3 (1 vs 2 threads at B = 1) alone")
    args = ap.parse_args(argv)
    args.out = output_file("cpu_targets", args.out, args.update_committed, COMMITTED[args.only_threads], ap.error)
    return args


def main(argv=None):
    args = parse_args(argv)
    import torch

    import mmrprune
    from mmrprune import reference as R
    torch.set_num_threads(args.threads)
    ok, detail = mmrprune.dispatch.status("cpu")
    if not ok:
        raise SystemExit(f"cpu backend not available: {detail}")
    common = {"device": cpu_model(), "commit": commit(), "torch": torch.__version__, "triton": triton_version(),
              "threads": args.threads, "cpu_backend": detail, "note": args.note,
              "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:]))}

    n2, d2 = 2691, 3584
    x2 = torch.from_numpy(clustered(n2, d2))[None].contiguous()
    w2 = torch.from_numpy(np.random.default_rng(1).random(n2).astype(np.float32))[None]
    k2 = R.budget(n2, keep_ratio=0.25)
    if args.only_threads:
        return _write(args.out, run_thread_scaling("threads", x2.to(torch.bfloat16), w2, k2, 0.5, args.repeats, common))

    from mmrprune.data import load_dinov2
    d = load_dinov2()
    x1 = torch.from_numpy(np.asarray(d["tokens"])).float().contiguous()
    w1 = torch.from_numpy(np.asarray(d["cls_attention"])).float().contiguous()
    records = run_case("dinov2", x1, w1, 256, 0.5, args.repeats, args.numpy_repeats, common)

    records += run_case("large", x2, w2, k2, 0.5, max(3, args.repeats // 3), max(1, args.numpy_repeats - 1), common)
    records += run_thread_scaling("threads", x2.to(torch.bfloat16), w2, k2, 0.5, args.repeats, common)
    torch.set_num_threads(args.threads)

    _write(args.out, records)


def _write(path, records):
    write_json(path, records)
    print(f"wrote {len(records)} records to {path}")


if __name__ == "__main__":
    main()
