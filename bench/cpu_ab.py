"""A/B of two builds of the C++ extension, in one process, calls interleaved.

    git worktree add /tmp/mmrprune-base <ref>
    (cd /tmp/mmrprune-base && python3 setup.py -q build_ext --inplace)
    python bench/cpu_ab.py --baseline /tmp/mmrprune-base [--repeats 9] [--out PATH | --update-committed]

"Is this change slower than before?" needs both builds timed under the same
machine load, which two separate runs on a shared machine do not give.  This
loads the baseline's ``mmrprune/_cpu*.so`` next to this tree's, and times
``mmrprune.select(..., backend="cpu")`` with ``mmrprune.ops._cpu`` pointing at
one build or the other (everything else, validation included, is this tree's),
alternating builds call by call.  Picks must be identical.

Cases (the CPU targets of bench/cpu_targets.py):
  dinov2  the 8 bundled DINOv2 images (B=8, N=1024, D=384, float32), k=256,
          mmr (lam 0.5, [CLS] attention) and divprune, at --threads threads;
  b1      B=1, N=2691, D=3584 clustered tokens in bfloat16, keep 25%, mmr, at 1
          and 2 threads.
Records follow docs/contract.md, "Benchmark records"; ``ratio_vs_baseline`` is
this build's median over the baseline's (below 1: faster).  They go to a new folder
bench-out/cpu_ab-<date>-<time>/ unless --out is given; --update-committed (from the
repository root) rewrites the committed bench/results/cpu_ab.json.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import subprocess
import sys
import time
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_targets import ROOT, _write, clustered, commit, cpu_model  # noqa: E402

from mmrprune.bench.records import add_output_arguments, output_file  # noqa: E402

# torch loads after the arguments are parsed: --help and usage errors stay instant
COMMITTED = "bench/results/cpu_ab.json"


def load_baseline(tree: str):
    """The baseline tree's built ``mmrprune._cpu``, loaded under another package name."""
    from mmrprune import ops
    found = glob.glob(os.path.join(tree, "mmrprune", "_cpu*.so"))
    if not found:
        raise SystemExit(f"--baseline {tree}: no mmrprune/_cpu*.so there; build it with "
                         "`python3 setup.py -q build_ext --inplace` in that tree")
    # Every call now goes through the op mmrprune::cpu_select, whose CPU kernel the module registers
    # when imported: a second build loaded here would replace this tree's kernel (or, built before
    # the op, register none), so swapping ops._cpu below would time one build twice.
    raise SystemExit("cpu_ab cannot compare two builds in one process since cpu_select is a native op "
                     "(both would register the same op's CPU kernel): time each tree with "
                     "`python3 bench/cpu_targets.py` in turn instead")
    pkg = types.ModuleType("mmrprune_baseline")
    pkg.__path__ = []
    sys.modules["mmrprune_baseline"] = pkg
    spec = importlib.util.spec_from_file_location("mmrprune_baseline._cpu", found[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if dict(mod.METHOD_CODES) != dict(ops._cpu.METHOD_CODES) or dict(mod.DTYPE_CODES) != dict(ops._cpu.DTYPE_CODES):
        raise SystemExit("the baseline's method/dtype codes differ from this tree's: not comparable this way")
    return mod


def tree_commit(tree: str) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def ab(builds: dict, call, threads: int, repeats: int) -> dict:
    """Median ms per build; builds alternate call by call; round 0 is the warm-up."""
    import torch

    from mmrprune import ops
    times = {name: [] for name in builds}
    first = None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rep in range(repeats + 1):
            for name, mod in builds.items():
                ops._cpu = mod
                t0 = time.perf_counter()
                out = call()
                dt = (time.perf_counter() - t0) * 1e3
                if rep:
                    times[name].append(dt)
                if first is None:
                    first = out
                elif not torch.equal(first, out):
                    raise SystemExit(f"build {name!r} picked differently")
    finally:
        ops._cpu = builds["this"]
        torch.set_num_threads(before)
    return {name: (float(np.median(v)), float(np.percentile(v, 20)), float(np.percentile(v, 80)))
            for name, v in times.items()}


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments, ``out`` resolved to the file this run writes."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="a source tree with a built mmrprune/_cpu*.so")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2, help="threads for the dinov2 case")
    add_output_arguments(ap, "cpu_ab", "the JSON records", COMMITTED)
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    args.out = output_file("cpu_ab", args.out, args.update_committed, COMMITTED, ap.error)
    return args


def main(argv=None):
    args = parse_args(argv)
    import torch

    import mmrprune
    from mmrprune import ops
    from mmrprune import reference as R
    if ops._cpu is None:
        raise SystemExit(f"this tree's mmrprune._cpu is not built: {ops.CPU_IMPORT_ERROR}")
    builds = {"this": ops._cpu, "baseline": load_baseline(args.baseline)}
    common = {"device": cpu_model(), "commit": commit(), "baseline_commit": tree_commit(args.baseline),
              "torch": torch.__version__, "note": args.note,
              "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:]))}

    from mmrprune.data import load_dinov2
    d = load_dinov2()
    x1 = torch.from_numpy(np.asarray(d["tokens"])).float().contiguous()
    w1 = torch.from_numpy(np.asarray(d["cls_attention"])).float().contiguous()
    n2, d2 = 2691, 3584
    x2 = torch.from_numpy(clustered(n2, d2))[None].contiguous().to(torch.bfloat16)
    w2 = torch.from_numpy(np.random.default_rng(1).random(n2).astype(np.float32))[None]
    k2 = R.budget(n2, keep_ratio=0.25)
    cases = [("dinov2", x1, w1, 256, "mmr", args.threads), ("dinov2", x1, w1, 256, "divprune", args.threads),
             ("b1", x2, w2, k2, "mmr", 1), ("b1", x2, w2, k2, "mmr", 2)]
    records = []
    for name, x, w, k, method, threads in cases:
        load = os.getloadavg()
        kw = {"lam": 0.5} if method == "mmr" else {}
        res = ab(builds, lambda: mmrprune.select(x, w, k=k, method=method, backend="cpu", order="selection", **kw),
                 threads, args.repeats)
        ratio = res["this"][0] / res["baseline"][0]
        b, n, dim = x.shape
        for build, (med, p20, p80) in res.items():
            records.append({**common, "case": name, "build": build, "backend": "cpu", "method": method,
                            "threads": threads, "batch": b, "tokens": n, "dim": dim, "k": k,
                            "dtype": str(x.dtype).replace("torch.", ""), "median_ms": round(med, 3),
                            "p20_ms": round(p20, 3), "p80_ms": round(p80, 3), "repeats": args.repeats,
                            "loadavg": list(load), "ratio_vs_baseline": round(ratio, 3)})
        print(f"{name:>7} {method:>8} {threads} thread(s): this {res['this'][0]:8.2f} ms, baseline "
              f"{res['baseline'][0]:8.2f} ms, this/baseline {ratio:.2f} (load {load[0]:.1f}, identical picks)",
              flush=True)
    _write(args.out, records)


if __name__ == "__main__":
    main()
