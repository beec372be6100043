"""The GPU performance targets (a)-(f) and their evaluation from benchmark records.

bf16, lam 0.5, keep 25 % unless noted, median of ``triton.testing.do_bench``:

* (a) B=1, N=576, D=4096, k=64: <= 50 us, and >= 100x the anchor loop;
* (b) B=1, N=2691, D=3584: <= 0.5 ms, and >= 100x the anchor loop;
* (c) B=64 of (b): <= 1.3x the bf16 Gram matmul of the same batch;
* (d) B=1, N=16384, D=3584: <= 15 ms, with a workspace <= 2 GiB;
* (e) Triton within 1.5x of CUDA on (a) and (b);
* (f) selection time <= 2 % of the prefill time it saves (7B-shaped decoder, prompt of (b)).

No torch here: ``session.py`` evaluates the records without importing it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

GIB = 1 << 30
KEEP_RATIO, LAM, DTYPE = 0.25, 0.5, "bfloat16"


@dataclass(frozen=True)
class Case:
    name: str
    preset: str               # mmrprune.bench presets: the shape's N and D
    batch: int
    k: Optional[int]          # None: keep KEEP_RATIO
    methods: tuple
    baselines: tuple          # timed besides the two kernel backends
    dry_shape: tuple          # (batch, tokens, dim) of the CPU dry run


CASES = (
    Case("a", "llava", 1, 64, ("mmr", "divprune", "dpp"), ("torch", "anchor"), (1, 24, 32)),
    Case("b", "qwen1080p", 1, None, ("mmr", "divprune", "dpp"), ("torch", "anchor"), (1, 32, 32)),
    Case("c", "qwen1080p", 64, None, ("mmr", "divprune"), (), (3, 32, 32)),
    Case("d", "video", 1, None, ("mmr", "divprune"), (), (1, 48, 32)),
)
PREFILL_CASE = "b"            # (f) prunes the prompt of this case

LIMITS = {
    "a_median_us": 50.0, "a_vs_anchor": 100.0,
    "b_median_ms": 0.5, "b_vs_anchor": 100.0,
    "c_vs_gram": 1.3,
    "d_median_ms": 15.0, "d_workspace_bytes": 2 * GIB,
    "e_triton_vs_cuda": 1.5,
    "f_share_pct": 2.0,
}


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def evaluate(records: list, cuda_backend: str = "cuda") -> list:
    """One row per target check: ``{"target", "what", "value", "limit", "unit", "ok"}``;
    ``ok`` is None (and ``value`` None) where the records lack the measurement."""
    by = {(r.get("target"), r.get("backend"), r.get("method")): r for r in records}
    rows = []

    def add(target, what, value, limit, unit, higher_is_better=False):
        ok = None if value is None else (value >= limit if higher_is_better else value <= limit)
        rows.append({"target": target, "what": what, "value": value, "limit": limit, "unit": unit, "ok": ok})

    def get(target, backend, method, field):
        r = by.get((target, backend, method))
        return None if r is None else r.get(field)

    cases = {c.name: c for c in CASES}
    for name, unit, scale in (("a", "us", 1e3), ("b", "ms", 1.0)):
        limit = LIMITS[f"{name}_median_{unit}"]
        for m in cases[name].methods:
            ms = get(name, cuda_backend, m, "median_ms")
            add(name, f"{cuda_backend} {m} median", None if ms is None else ms * scale, limit, unit)
            if m in ("mmr", "divprune"):   # the anchor loop exists for these two
                add(name, f"{cuda_backend} {m} speed-up over the anchor loop",
                    get(name, cuda_backend, m, "speedup_vs_anchor"), LIMITS[f"{name}_vs_anchor"], "x", True)
    for m in cases["c"].methods:
        add("c", f"{cuda_backend} {m} / bf16 Gram matmul",
            _ratio(get("c", cuda_backend, m, "median_ms"), get("c", cuda_backend, m, "gram_ms")),
            LIMITS["c_vs_gram"], "x")
    for m in cases["d"].methods:
        add("d", f"{cuda_backend} {m} median", get("d", cuda_backend, m, "median_ms"), LIMITS["d_median_ms"], "ms")
        add("d", f"{cuda_backend} {m} peak memory allocated by the call",
            get("d", cuda_backend, m, "peak_alloc_bytes"), LIMITS["d_workspace_bytes"], "bytes")
    for name in ("a", "b"):
        for m in cases[name].methods:
            add("e", f"({name}) triton / {cuda_backend} {m}",
                _ratio(get(name, "triton", m, "median_ms"), get(name, cuda_backend, m, "median_ms")),
                LIMITS["e_triton_vs_cuda"], "x")
    for backend in (cuda_backend, "triton"):
        add("f", f"{backend} mmr selection / prefill time saved", get("f", backend, "mmr", "share_pct"),
            LIMITS["f_share_pct"], "%")
    return rows


def tally(rows: list) -> dict:
    """``{"met": n, "missed": n, "not_measured": n}`` of :func:`evaluate`'s rows."""
    return {"met": sum(r["ok"] is True for r in rows), "missed": sum(r["ok"] is False for r in rows),
            "not_measured": sum(r["ok"] is None for r in rows)}
