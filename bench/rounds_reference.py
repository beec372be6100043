"""Rounds per pick of the exact round rule (float64 reference) on the bundled DINOv2 tokens.

    python bench/rounds_reference.py [--out PATH | --update-committed]

B = 8 images, N = 1024, keep 25% (k = 256): mmr (lam 0.5, [CLS] attention
importance) and fps, for round limits R = unlimited, 16, 8, 4.  Every run's picks
are checked against the one-at-a-time reference before its count is kept.  The records go
to a new folder bench-out/rounds_reference-<date>-<time>/ unless --out is given;
--update-committed (from the repository root) rewrites bench/results/rounds_reference.json.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mmrprune import reference as R  # noqa: E402
from mmrprune.bench.records import add_output_arguments, output_file, write_json  # noqa: E402
from mmrprune.data import load_dinov2  # noqa: E402

LIMITS = (None, 16, 8, 4)
COMMITTED = "bench/results/rounds_reference.json"


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments, ``out`` resolved to the file this run writes."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_output_arguments(ap, "rounds_reference", "the JSON records", COMMITTED)
    args = ap.parse_args(argv)
    args.out = output_file("rounds_reference", args.out, args.update_committed, COMMITTED, ap.error)
    return args


def main(argv=None):
    args = parse_args(argv)
    d = load_dinov2()
    x, w = d["tokens"].astype(np.float64), d["cls_attention"].astype(np.float64)
    k = R.budget(x.shape[1], keep_ratio=0.25)
    records = []
    print("| setting | " + " | ".join("R = " + ("unlimited" if r is None else str(r)) for r in LIMITS) + " |")
    for method, imp in (("mmr", w), ("fps", None)):
        cells = []
        for limit in LIMITS:
            rounds = []
            for b in range(x.shape[0]):
                wb = None if imp is None else imp[b]
                got, n_rounds = R.select_rounds(x[b], wb, k, method, 0.5, limit)
                if got.tolist() != R.select_one(x[b], wb, k, method, 0.5).tolist():
                    raise SystemExit(f"{method} R={limit} image {b}: round picks differ from the sequential ones")
                rounds.append(n_rounds)
            per_pick = sum(rounds) / (k * len(rounds))
            records.append({"method": method, "lam": 0.5 if method == "mmr" else 0.0,
                            "importance": "cls_attention" if imp is not None else None,
                            "max_round": limit, "k": k, "tokens": int(x.shape[1]), "rounds": rounds,
                            "rounds_per_k": round(per_pick, 4)})
            cells.append(f"{per_pick:.3f}")
        print(f"| {method} | " + " | ".join(cells) + " |")
    write_json(args.out, records)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
