"""Per-round counts of the fused CUDA kernels, measured by running the real ``csrc/cuda`` kernels
in the CPU emulator (``backend="cuda_emu"``, csrc/emu/cuda_emu.h "Counters").

    from bench.emu_counts import count          # or: sys.path.insert(0, "bench"); import emu_counts
    count("mmr", n=576, d=4096, k=64)           # Gram mode, B = 1, bundled DINOv2 tokens
    python bench/emu_counts.py --method mmr --n 576 --d 4096 --k 64 [--sim rows] [--batch 2]
    python bench/emu_counts.py --record before|after [--out PATH | --update-committed]

What is counted (per block = per image, summed over the launch, then divided by the rounds
that image ran; the emulator's definitions are in cuda_emu.h "Counters"):

* ``rounds``: sequential rounds the kernel ran (maxsim: its own count, exact rounds of up to
  ``MAX_ROUND`` picks; dpp: one per pick), mean over the images;
* ``barriers_per_round``: block barriers (``__syncthreads``) per round;
* ``cluster_size``, ``cluster_barriers_per_round``: CTAs per image the launcher chose (the
  emulator reports an H100: compute capability 9, 132 SMs) and cluster barriers per round; with a
  cluster, every per-round figure is the largest over the image's CTAs (they run in parallel);
* ``shuffle_levels_per_round``: dependent warp-shuffle levels on the critical path per round (a
  level = a run of one warp's consecutive shuffles with the same lane pattern, e.g. the
  (score, index) pair of one butterfly step; per barrier interval the slowest warp counts);
* ``shuffle_ops_per_round``: the same path counting every shuffle instruction;
* ``ldg_trips_per_round``: per barrier interval, the most ``__ldg`` loads one thread issues,
  summed: an UPPER bound on dependent global-memory trips (independent loads the hardware
  overlaps count once each here); plain pointer reads (e.g. ``m``, ``imp`` in global scratch)
  are not counted;
* ``ldg_sites_per_round``: the same sum counting a thread's distinct ``__ldg`` call sites per
  interval (a site's loads in one interval as one trip): the dependent trips of kernels whose
  loads at one site are independent (cuda_emu.h "Counters" says when it under-counts);
* ``kernel_launches``: ``.cu`` kernel launches of the call (row mode: norms + prepare + greedy;
  Gram mode: prepare + greedy). The torch ops around them (the Gram bmm, the position sort) are
  not counted here.

Each per-round figure includes the launch's fixed part (initialisation, the first round of
one) spread over the rounds; ``totals`` has the raw sums.

Extrapolation: Gram mode's per-round barriers and shuffle levels do not depend on n or d (thread
per token, fixed merges), so small n measures them for every target; its ``ldg`` bound grows
with n / threads (tokens per thread) times the picks per round.  Row mode's shuffle levels grow
with n / warps (one warp-dot reduction per token and pick) and its ``ldg`` bound with
n * d / (warps * 32 * vector width): measure at two n and scale linearly.  ``rounds`` depends on
the data and on k / n: the bundled real tokens give the realistic figure (docs/rounds.md).

Tokens: image ``seed % 8`` of mmrprune/data/dinov2_vits14_448.npz (1024 tokens, D = 384), its
first ``n`` tokens (more than 1024: the next images appended), with its [CLS] attention as the
importance; for ``d != 384`` the tokens go through a seeded Gaussian projection to ``d`` dims
(it keeps inner products up to ~1/sqrt(d), so rounds stay close to the real tokens').  Batch
``b`` uses images ``seed .. seed + b - 1``.  fp32 features (the kernels' rounds and counts do
not depend on the dtype; row mode's vector width does, see above).  DPP counts add seeded noise
(5 % of the RMS) for full rank (``full_rank`` in ``count``): the projected tokens have rank 384.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

METHODS = ("mmr", "fps", "hybrid", "divprune", "dpp")
SIMS = ("gram", "rows")   # mmrprune.select's sim= ("auto" would hide which mode was counted)


def _tokens(n: int, d: int, seed: int, batch: int, full_rank: bool = False):
    from mmrprune.data import load_dinov2
    data = load_dinov2()
    toks, att = data["tokens"].astype(np.float32), data["cls_attention"].astype(np.float32)
    n_img, per, dim = toks.shape
    xs, ws = [], []
    for b in range(batch):
        first = seed + b
        reps = -(-n // per)
        idx = [(first + j) % n_img for j in range(reps)]
        xs.append(np.concatenate([toks[i] for i in idx])[:n])
        ws.append(np.concatenate([att[i] for i in idx])[:n])
    x, w = np.stack(xs), np.stack(ws)
    if d != dim:
        proj = np.random.default_rng(seed).standard_normal((dim, d)) / np.sqrt(d)
        x = (x @ proj).astype(np.float32)   # fp32: float64 input would take the torch fallback
    if full_rank:   # seeded noise at 5 % of the tokens' RMS: rank min(n, d) instead of 384
        rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
        x = (x + 0.05 * rms * np.random.default_rng(seed + 1).standard_normal(x.shape)).astype(np.float32)
    return x, w


def _read(path: str):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def count(method: str, n: int, d: int, k: int, sim: str = "gram", seed: int = 0, batch: int = 1,
          full_rank=None) -> dict:
    """Counts of one ``select(method, k)`` call on ``batch`` images of ``n`` tokens of ``d`` dims,
    run by the emulated CUDA kernels in similarity mode ``sim`` ("gram" or "rows").
    ``full_rank`` (default: for dpp) adds seeded noise so that the features have full rank: the
    bundled tokens have rank 384, after which DPP's gains vanish and its later steps skip the
    projection, cheaper than on an LLM's full-rank tokens."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if sim not in SIMS:
        raise ValueError(f"sim must be one of {tuple(SIMS)}, got {sim!r}")
    if not (n >= 1 and d >= 1 and 1 <= k <= n and batch >= 1):
        raise ValueError(f"need n, d, batch >= 1 and 1 <= k <= n, got n={n}, d={d}, k={k}, batch={batch}")
    import torch

    import mmrprune
    from mmrprune.backends import cuda_emu_backend as emu
    ok, why = emu.status()
    if not ok:
        raise RuntimeError(f"backend cuda_emu unavailable ({why}): run scripts/setup.sh with the CUDA headers")
    full_rank = method == "dpp" if full_rank is None else bool(full_rank)
    x, w = _tokens(n, d, seed, batch, full_rank)
    saved = {key: os.environ.get(key) for key in ("CUDA_EMU_COUNTS",)}   # the emulator's counts file
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "counts.jsonl")
        os.environ["CUDA_EMU_COUNTS"] = path
        try:
            lam = {"lam": 0.5} if method in ("mmr", "hybrid") else {}
            picks, stats = mmrprune.select(torch.from_numpy(x), None if method == "fps" else torch.from_numpy(w),
                                           k=k, method=method, backend="cuda_emu", order="selection",
                                           return_stats=True, sim=sim, **lam)
            launches = _read(path) if os.path.exists(path) else []
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    if not launches:
        raise RuntimeError("the emulator wrote no counts: the call took a torch fallback, or mmrprune._cuda_emu "
                           "is not built from this checkout (run scripts/setup.sh)")
    greedy = launches[-1]   # the greedy kernel is the call's last launch (row mode: norms first)
    rounds = stats["rounds"].tolist()
    csize = int(np.prod(greedy.get("cluster", [1, 1, 1])))
    if len(greedy["blocks"]) != batch * csize or len(rounds) != batch:
        raise RuntimeError(f"expected {batch} x {csize} blocks and {batch} round counts, got "
                           f"{len(greedy['blocks'])} and {len(rounds)}")
    # an image's CTAs run in parallel: its figure is the largest over its cluster (the critical path)
    blocks = [{key: max(blk.get(key, 0) for blk in greedy["blocks"][b * csize:(b + 1) * csize])
               for key in greedy["blocks"][0]} for b in range(batch)]

    def per_round(key):
        return float(np.mean([blk.get(key, 0) / max(r, 1) for blk, r in zip(blocks, rounds)]))

    return {
        "method": method, "n": n, "d": d, "k": k, "sim": sim, "seed": seed, "batch": batch,
        "rounds": float(np.mean(rounds)),
        "rounds_per_k": float(np.mean(rounds)) / k,
        "barriers_per_round": per_round("barriers"),
        "cluster_size": csize,
        "cluster_barriers_per_round": per_round("cluster_barriers"),
        "shuffle_levels_per_round": per_round("shfl_path"),
        "shuffle_ops_per_round": per_round("shfl_ops_path"),
        "ldg_trips_per_round": per_round("ldg_path"),
        "ldg_sites_per_round": per_round("ldg_site_path"),
        "kernel_launches": len(launches),
        "threads_per_block": int(np.prod(greedy["block"])),
        "dynamic_smem_bytes": int(greedy["smem"]),
        "totals": {key: [blk[key] for blk in blocks] for key in blocks[0]},
        "picks_ok": bool((picks >= 0).sum().item() == batch * k), "full_rank": full_rank,
    }


# The shapes the cost model quotes (issue targets (a), (b), (d); (c) extrapolates from (b), see above).
# (b) and (d) run the cluster kernel (N > 1024).  (d) is recorded at n = 8192 (8 CTAs, one token
# per thread, as (d)'s 16), because the bundled tokens are 8 x 1024 distinct ones: n = 16384 would repeat each
# token twice, and the ties change the rounds (0.71 rounds/k there against ~0.2 on distinct tokens).
RECORD = [
    ("a", "mmr", 576, 4096, 64, "gram"), ("a", "mmr", 576, 4096, 64, "rows"), ("a", "dpp", 576, 4096, 64, "gram"),
    ("b", "mmr", 2691, 3584, 673, "gram"), ("b", "divprune", 2691, 3584, 673, "gram"), ("b", "dpp", 2691, 3584, 673, "gram"),
    ("d", "mmr", 8192, 3584, 2048, "gram"),
]
COMMITTED = "bench/results/emu_counts.json"


def record(path: str, kernels: str) -> list:
    """Counts at the RECORD shapes, as flat records labelled ``kernels`` ("before"/"after"), written
    to ``path`` with the records of the other labels already there kept."""
    from mmrprune.bench.records import git_commit, write_json
    rows = []
    for target, method, n, d, k, sim in RECORD:
        rec = count(method, n, d, k, sim)
        rec.pop("totals")
        rows.append(dict(target=target, kernels=kernels, **rec, commit=git_commit(),
                         command=f"python bench/emu_counts.py --record {kernels}"))
        print(json.dumps(rows[-1]), flush=True)
    kept = []
    if os.path.exists(path):
        with open(path) as f:
            kept = [r for r in json.load(f) if r.get("kernels") != kernels]
    write_json(path, kept + rows)
    return rows


def main(argv=None) -> int:
    from mmrprune.bench.records import add_output_arguments, output_file
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="mmr", choices=METHODS)
    ap.add_argument("--n", type=int, default=576)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--sim", default="gram", choices=tuple(SIMS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--record", metavar="KERNELS", help="count the RECORD shapes and write them as records "
                    "labelled KERNELS (before/after) to --out (default: a new bench-out/ folder)")
    add_output_arguments(ap, "emu_counts", "the JSON records of --record", COMMITTED)
    a = ap.parse_args(argv)
    if a.record:
        out = output_file("emu_counts", a.out, a.update_committed, COMMITTED, ap.error)
        record(out, a.record)
        print(f"wrote {out}")
        return 0
    print(json.dumps(count(a.method, a.n, a.d, a.k, a.sim, a.seed, a.batch), indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
