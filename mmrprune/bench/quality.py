"""Selection quality on real tokens: importance retention vs Hopkins (IDPruner, Sec. 3).

Setup (IDPruner Sec. 3.1): each image's importance is uniform random noise
(seeded, several seeds), so importance and geometry are independent and the
two metrics pull against each other.  Every method keeps the same share of
tokens.  ``mmr`` is swept over ``lam`` (dense near 0), ``hybrid`` over its
pool (``c = round(k / lam)``), and ``topk``, ``fps``, ``divprune``, ``dpp``
are single points.  Each point is the mean over images and seeds of
:func:`mmrprune.metrics.importance_retention` (higher is better) and
:func:`mmrprune.metrics.hopkins` (lower is better: the kept set covers the
token space more evenly).

:func:`dominance` answers "does MMR's frontier dominate the naive hybrid's?":
for each hybrid point, is there an MMR point with retention >= and Hopkins <=
(weak Pareto dominance), plus the Hopkins gap to MMR's curve at the hybrid
point's retention (linear interpolation between MMR points; > 0 means MMR
reaches the same retention with a lower Hopkins).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from .. import dispatch
from ..api import select
from ..metrics import hopkins, importance_retention
from ..reference import LAM_METHODS, budget, hybrid_pool_size
from .defaults import HYBRID_LAMS, MMR_LAMS, SINGLE_METHODS

MASK_PHOTO_COUNT = 3   # photos in the token-mask figure: the run's first ones
MASK_METHODS = ("mmr", "divprune", "topk")


# --------------------------------------------------------------------------- Pareto helpers
def weakly_dominates(a: tuple, b: tuple) -> bool:
    """``a = (retention, hopkins)`` is at least as good as ``b`` in both (retention up, Hopkins down)."""
    return a[0] >= b[0] and a[1] <= b[1]


def pareto_front(points: Sequence[tuple]) -> list:
    """The points no other point strictly improves on (>= retention, <= Hopkins, one strictly),
    sorted by retention; exact duplicates are kept once."""
    pts = sorted(set((float(r), float(h)) for r, h in points))
    front = [p for p in pts
             if not any(weakly_dominates(q, p) and q != p for q in pts)]
    return front


def hopkins_on_curve(curve: Sequence[tuple], retention: float) -> Optional[float]:
    """Hopkins of ``curve``'s Pareto front at ``retention`` (linear interpolation); ``None``
    outside the front's retention range."""
    front = pareto_front(curve)
    if not front or retention < front[0][0] or retention > front[-1][0]:
        return None
    rs = np.array([p[0] for p in front])
    hs = np.array([p[1] for p in front])
    return float(np.interp(retention, rs, hs))


def dominance(challenger: Sequence[tuple], others: Sequence[tuple]) -> dict:
    """How ``challenger`` (e.g. MMR) compares to each point of ``others`` (e.g. hybrid).

    Returns ``dominated`` (per point: some challenger point is >= in retention and <= in
    Hopkins), ``fraction`` (share of ``others`` dominated), and ``gap`` (per point:
    other's Hopkins minus the challenger front's Hopkins at the same retention; > 0 means
    the challenger is better there, ``None`` outside its range).
    """
    dominated = [any(weakly_dominates(c, o) for c in challenger) for o in others]
    gaps = []
    for o in others:
        h = hopkins_on_curve(challenger, o[0])
        gaps.append(None if h is None else float(o[1] - h))
    return {"dominated": dominated, "fraction": (sum(dominated) / len(others)) if others else None,
            "gap": gaps}


# --------------------------------------------------------------------------- the run
@dataclass
class QualityConfig:
    images: int = 8
    tokens: Optional[int] = None       # subsample every (1024 // tokens)-th token when set
    seeds: Sequence[int] = (0, 1, 2)
    keep_ratio: float = 0.25
    mmr_lams: Sequence[float] = MMR_LAMS
    hybrid_lams: Sequence[float] = HYBRID_LAMS
    singles: Sequence[str] = SINGLE_METHODS
    backend: str = "auto"
    device: str = "cpu"
    extra: dict = field(default_factory=dict)


def load_tokens(images: int, tokens: Optional[int]):
    """``(features f16 [B, N, D], names)`` from the bundled DINOv2 fixture; ``tokens`` keeps an
    evenly strided subset of the 1024 patches (for quick runs)."""
    from ..data import load_dinov2
    d = load_dinov2()
    x = d["tokens"][:images]
    if tokens is not None and tokens < x.shape[1]:
        sel = np.linspace(0, x.shape[1] - 1, tokens).round().astype(np.int64)
        x = x[:, sel]
    return np.ascontiguousarray(x), [str(n) for n in d["names"][:images]]


def _points(cfg: QualityConfig):
    yield from (("mmr", lam) for lam in cfg.mmr_lams)
    yield from (("hybrid", lam) for lam in cfg.hybrid_lams)
    lam_of = {"topk": 1.0, "fps": 0.0}
    yield from ((m, lam_of.get(m)) for m in cfg.singles)


def run_quality(cfg: QualityConfig, env: dict, progress=None) -> list:
    """One record per (method, lam): means and seed-to-seed std of retention and Hopkins."""
    x_np, names = load_tokens(cfg.images, cfg.tokens)
    b, n, d = x_np.shape
    k = budget(n, keep_ratio=cfg.keep_ratio)
    x = torch.from_numpy(x_np).to(cfg.device)
    points = list(_points(cfg))
    per = {p: {"ret": [], "hop": [], "ms": []} for p in points}
    total = len(points) * len(cfg.seeds)
    done = 0
    for seed in cfg.seeds:
        w_np = np.random.default_rng(seed).uniform(size=(b, n)).astype(np.float32)
        w = torch.from_numpy(w_np).to(cfg.device)
        for method, lam in points:
            t0 = time.perf_counter()
            idx = select(x, w, k=k, lam=lam if method in LAM_METHODS else None, method=method, backend=cfg.backend)
            if x.is_cuda:
                torch.cuda.synchronize()
            per[(method, lam)]["ms"].append((time.perf_counter() - t0) * 1e3)
            idx = idx.cpu().numpy()
            per[(method, lam)]["ret"].append([importance_retention(w_np[i], idx[i]) for i in range(b)])
            per[(method, lam)]["hop"].append([hopkins(x_np[i], idx[i], seed=seed) for i in range(b)])
            done += 1
            if progress:
                progress(f"[{done}/{total}] seed {seed} {method} lam={lam}")
    device_type = "cuda" if cfg.device.startswith("cuda") else "cpu"
    records = []
    for method, lam in points:
        ret = np.array(per[(method, lam)]["ret"])   # [seeds, images]
        hop = np.array(per[(method, lam)]["hop"])
        ms = np.array(per[(method, lam)]["ms"])
        rec = dict(env)
        rec.update({
            "backend": dispatch.resolve(cfg.backend, device_type, method).name,
            "method": method, "batch": b, "tokens": n, "dim": d, "k": k, "lam": lam, "dtype": "float16",
            "median_ms": float(np.median(ms)), "p20_ms": float(np.percentile(ms, 20)),
            "p80_ms": float(np.percentile(ms, 80)), "us_per_step": float(np.median(ms)) * 1e3 / k,
            "pool": hybrid_pool_size(n, k, lam) if method == "hybrid" else None,
            "retention": float(ret.mean()), "retention_seed_std": float(ret.mean(axis=1).std()),
            "hopkins": float(hop.mean()), "hopkins_seed_std": float(hop.mean(axis=1).std()),
            "images": ",".join(names), "seeds": ",".join(str(s) for s in cfg.seeds),
            "keep_ratio": cfg.keep_ratio, "importance": "uniform random per image (seeded)",
            "features": "DINOv2 ViT-S/14 448px (mmrprune.data)",
        })
        rec.update(cfg.extra)
        records.append(rec)
    return records


def compare_mmr_hybrid(records: list) -> dict:
    """Dominance of MMR's points over hybrid's, over all hybrid points and over the interior
    ones (pool strictly between k and N, i.e. neither plain top-k nor plain FPS)."""
    mmr = [(r["retention"], r["hopkins"]) for r in records if r["method"] == "mmr"]
    hyb = [r for r in records if r["method"] == "hybrid"]
    res = dominance(mmr, [(r["retention"], r["hopkins"]) for r in hyb])
    inner = [i for i, r in enumerate(hyb) if r["k"] < r["pool"] < r["tokens"]]
    gaps = [g for g in res["gap"] if g is not None]
    inner_gaps = [res["gap"][i] for i in inner if res["gap"][i] is not None]
    return {
        "hybrid_points": len(hyb),
        "dominated": int(sum(res["dominated"])),
        "fraction_dominated": res["fraction"],
        "interior_points": len(inner),
        "interior_dominated": int(sum(res["dominated"][i] for i in inner)),
        "interior_fraction_dominated": (sum(res["dominated"][i] for i in inner) / len(inner)) if inner else None,
        "mean_hopkins_gap": float(np.mean(gaps)) if gaps else None,
        "interior_mean_hopkins_gap": float(np.mean(inner_gaps)) if inner_gaps else None,
        "singles_dominated_by_mmr": {r["method"]: any(weakly_dominates(m, (r["retention"], r["hopkins"]))
                                                      for m in mmr)
                                     for r in records if r["method"] not in ("mmr", "hybrid")},
        "per_point": [{"lam": r["lam"], "pool": r["pool"], "retention": r["retention"], "hopkins": r["hopkins"],
                       "dominated_by_mmr": d, "hopkins_gap_to_mmr": g}
                      for r, d, g in zip(hyb, res["dominated"], res["gap"])],
    }


QUALITY_COLUMNS = [("method", "method"), ("lam", "lam"), ("pool", "pool"), ("retention", "retention"),
                   ("+-seed", "retention_seed_std"), ("hopkins", "hopkins"), ("+-seed ", "hopkins_seed_std"),
                   ("ms/call", "median_ms"), ("backend", "backend")]


def format_quality(records: list, comparison: dict) -> str:
    from .records import format_table
    lines = [format_table(records, QUALITY_COLUMNS), ""]
    c = comparison
    if c["hybrid_points"]:
        lines.append(f"MMR vs hybrid: {c['dominated']}/{c['hybrid_points']} hybrid points are weakly dominated "
                     f"by an MMR point (>= retention and <= Hopkins); interior pools (k < c < N): "
                     f"{c['interior_dominated']}/{c['interior_points']}.")
        if c["mean_hopkins_gap"] is not None:
            lines.append(f"Hybrid Hopkins minus MMR-front Hopkins at equal retention: mean "
                         f"{c['mean_hopkins_gap']:+.4f} (interior {c['interior_mean_hopkins_gap']:+.4f}"
                         if c["interior_mean_hopkins_gap"] is not None else
                         f"Hybrid Hopkins minus MMR-front Hopkins at equal retention: mean "
                         f"{c['mean_hopkins_gap']:+.4f} (interior: none in range")
            lines[-1] += "); > 0 means MMR is better."
    if c.get("singles_dominated_by_mmr"):
        lines.append("Weakly dominated by an MMR point: " + ", ".join(
            f"{m} {'yes' if d else 'no'}" for m, d in c["singles_dominated_by_mmr"].items()) + ".")
    return "\n".join(lines)


# --------------------------------------------------------------------------- token masks
def token_masks(lam: float, keep_ratio: float, backend: str, device: str,
                images: Sequence[str], methods: Sequence[str] = MASK_METHODS) -> dict:
    """Kept-patch masks ``[len(images), len(methods), h, w]`` with ``cls_attention`` as importance."""
    from ..data import load_dinov2
    d = load_dinov2()
    names = [str(n) for n in d["names"]]
    rows = [names.index(n) for n in images]
    gh, gw = (int(v) for v in d["grid"])
    x = torch.from_numpy(d["tokens"][rows]).to(device)
    w = torch.from_numpy(d["cls_attention"][rows]).to(device)
    masks = np.zeros((len(rows), len(methods), gh, gw), dtype=bool)
    stats = {}
    for j, m in enumerate(methods):
        idx = select(x, w, keep_ratio=keep_ratio, lam=lam if m in LAM_METHODS else None, method=m,
                     backend=backend).cpu().numpy()
        for i in range(len(rows)):
            flat = np.zeros(gh * gw, dtype=bool)
            flat[idx[i][idx[i] >= 0]] = True
            masks[i, j] = flat.reshape(gh, gw)
            stats[(images[i], m)] = {
                "retention": importance_retention(d["cls_attention"][rows[i]], idx[i]),
                "hopkins": hopkins(d["tokens"][rows[i]], idx[i], seed=0)}
    return {"images": list(images), "methods": list(methods), "masks": masks,
            "thumbnails": d["thumbnails"][rows], "stats": stats, "lam": lam, "keep_ratio": keep_ratio}
