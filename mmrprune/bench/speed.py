"""Speed sweep: backends x methods x shapes x dtypes, timed in one process.

* CPU: ``warmup`` untimed calls, then up to ``repeats`` calls timed with
  ``time.perf_counter`` (at least ``min(3, repeats)``; a case stops early once
  it has spent ``max_seconds``), median and p20/p80.
* CUDA: ``triton.testing.do_bench`` (CUDA events, warm-up, L2 flush before
  every call, p50/p20/p80), with ``rep`` sized so that at least ``repeats``
  calls are timed.  Without triton, a CUDA-event loop of the same shape.
* Both rotate through several copies of the inputs (:func:`_n_buffers`) so a
  call never finds its inputs already in cache from the previous one.

``anchor`` (:mod:`mmrprune.baselines`, mmr and divprune only) and ``torch``
run as ordinary cases, so every record can carry its speedup over both.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .. import dispatch
from ..reference import D2PRUNER_DEFAULTS, LAM_METHODS, budget
from .defaults import DINOV2_IMAGES, DTYPE_NAMES, PRESET_GRIDS, PRESETS
from .records import format_number
from .token_file import read_token_file

# --------------------------------------------------------------------------- shapes
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
ANCHOR_METHODS = ("mmr", "divprune")
DEFAULT_BACKENDS = {"cpu": ("cpu", "torch", "numpy", "anchor"), "cuda": ("cuda", "triton", "torch", "anchor")}

# Peak dense bf16 tensor-core TFLOP/s by device name (vendor datasheets); unknown -> omitted.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),   # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("H200", 989.0),
    ("A100", 312.0),
)


def peak_bf16_tflops(name: str) -> Optional[float]:
    if "NVL" in name:  # NVL parts run at other clocks; not in the table
        return None
    for key, peak in PEAK_BF16_TFLOPS:
        if key in name:
            return peak
    return None


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    tokens: int
    dim: int
    source: str  # "random", "dinov2" or "file"
    path: Optional[str] = None   # source "file": the user's .npz (see token_file.py)
    grid: Optional[tuple] = None  # (rows, cols) of the patch grid, when the preset knows it

    def label(self) -> str:
        return f"{self.name} B={self.batch} N={self.tokens} D={self.dim}"


def make_shapes(presets, batch=None, tokens=None, dim=None) -> list:
    """Shapes of a sweep. ``--batch/--tokens/--dim`` override every preset's value;
    ``tokens`` and ``dim`` without a preset give one random shape ``custom``."""
    shapes = []
    for p in presets:
        if p not in PRESETS:
            raise ValueError(f"unknown preset {p!r}; choose from {sorted(PRESETS)}")
        b0, n0, d0, source, _ = PRESETS[p]
        b, n, d = batch or b0, tokens or n0, dim or d0
        if source == "dinov2" and (b > DINOV2_IMAGES or n > n0 or d > d0):
            raise ValueError(f"preset dinov2 has {DINOV2_IMAGES} images x {n0} tokens x {d0} dims; "
                             f"got batch={b}, tokens={n}, dim={d}")
        grid = PRESET_GRIDS.get(p) if n == n0 else None  # --tokens breaks the preset's grid
        shapes.append(Shape(p, b, n, d, source, grid=grid))
    if not presets:
        if not (tokens and dim):
            raise ValueError("give --preset, or both --tokens and --dim")
        shapes.append(Shape("custom", batch or 1, tokens, dim, "random"))
    for s in shapes:
        if min(s.batch, s.tokens, s.dim) < 1:
            raise ValueError(f"shape {s.label()}: batch, tokens and dim must be >= 1")
    return shapes


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0):
    """``(features [B, N, D] dtype, importance [B, N] float32)`` on ``device``; importance is
    ``None`` for a ``--data`` file without one."""
    if shape.source == "file":
        tokens = read_token_file(shape.path)
        x = torch.from_numpy(np.ascontiguousarray(tokens.features))
        w = tokens.importance
        w = None if w is None else torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).to(device)
        return x.to(device=device, dtype=dtype).contiguous(), w
    if shape.source == "dinov2":
        from ..data import load_dinov2
        d = load_dinov2()
        x = torch.from_numpy(np.ascontiguousarray(d["tokens"][:shape.batch, :shape.tokens, :shape.dim]))
        w = torch.from_numpy(np.ascontiguousarray(d["cls_attention"][:shape.batch, :shape.tokens]))
    else:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(shape.batch, shape.tokens, shape.dim, generator=g)
        w = torch.rand(shape.batch, shape.tokens, generator=g)
    return x.to(device=device, dtype=dtype).contiguous(), w.to(device=device, dtype=torch.float32).contiguous()


def _n_buffers(nbytes: int, device: str) -> int:
    """Input copies to rotate through: enough to outgrow the caches, at most 8 and at most
    a quarter of free device memory."""
    target = (256 << 20) if device.startswith("cuda") else (64 << 20)
    n = min(8, max(2, math.ceil(target / max(nbytes, 1))))
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        n = max(1, min(n, int(free // 4 // max(nbytes, 1))))
    return n


# --------------------------------------------------------------------------- runners
def make_runner(backend: str, method: str, k: int, lam: float, device_type: str,
                check_finite: bool = True, params: Optional[dict] = None,
                lengths=None) -> tuple[Optional[Callable], str]:
    """``(fn(x, w), "")`` or ``(None, why this case cannot run)``.  ``fn`` returns the
    indices, or ``(indices, stats)`` from :func:`mmrprune.select` (``return_stats=True``);
    ``params`` are the method's own (d2pruner's ``grid``, ``alpha``, ...)."""
    params = dict(params or {})
    if method in LAM_METHODS:
        params["lam"] = lam
    if backend == "anchor":
        if method not in ANCHOR_METHODS:
            return None, f"the anchor baseline exists for {', '.join(ANCHOR_METHODS)} only"
        if lengths is not None:
            return None, "the anchor baseline takes no lengths (padded images)"
        from ..baselines import anchor_divprune, anchor_mmr
        if method == "mmr":
            return (lambda x, w: anchor_mmr(x, w, k, lam)), ""
        return (lambda x, w: anchor_divprune(x, k)), ""
    try:
        dispatch.resolve(backend, device_type, method)
    except (RuntimeError, ValueError) as exc:
        return None, str(exc)
    from ..api import select

    def run(x, w):
        return select(x, w, k=k, method=method, backend=backend, order="selection",
                      check_finite=check_finite, lengths=lengths, return_stats=True, **params)
    return run, ""


def _mean_rounds(result) -> Optional[float]:
    """Mean rounds per image a backend reported (``None`` where it does not count)."""
    if not isinstance(result, tuple) or "rounds" not in result[1]:
        return None
    return float(result[1]["rounds"].double().mean())


# --------------------------------------------------------------------------- timers
def _percentiles(times_ms) -> tuple[float, float, float]:
    a = np.asarray(times_ms, dtype=np.float64)
    return float(np.median(a)), float(np.percentile(a, 20)), float(np.percentile(a, 80))


def time_cpu(fn: Callable[[], object], repeats: int, warmup: int = 1, max_seconds: float = 3.0) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    floor = min(3, repeats)
    while len(times) < repeats:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= floor and time.perf_counter() - start > max_seconds:
            break
    med, p20, p80 = _percentiles(times)
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "repeats": len(times), "timer": "perf_counter"}


def time_cuda(fn: Callable[[], object], repeats: int, device: str) -> dict:
    torch.cuda.synchronize(device)
    fn()  # compile / autotune / first-touch outside the estimate
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    estimate = max(start.elapsed_time(end), 1e-3)
    try:
        from triton.testing import do_bench
    except Exception:
        do_bench = None
    if do_bench is not None:
        rep = max(100.0, estimate * repeats)
        med, p20, p80 = do_bench(fn, warmup=max(25.0, estimate), rep=rep, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": float(med), "p20_ms": float(p20), "p80_ms": float(p80),
                "repeats": max(1, int(rep / estimate)), "timer": "triton.testing.do_bench"}
    n = max(repeats, int(100.0 / estimate))
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device)
    for _ in range(max(1, int(25.0 / estimate))):
        fn()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for s, e in pairs:
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    med, p20, p80 = _percentiles([s.elapsed_time(e) for s, e in pairs])
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "repeats": n, "timer": "cuda events"}


def _rotating(fn2, inputs):
    state = [0]

    def call():
        i = state[0]
        state[0] = (i + 1) % len(inputs)
        return fn2(*inputs[i])
    return call


def gram_stats(shape: Shape, device: str, repeats: int, device_label: str) -> dict:
    """Time of the bf16 batched Gram ``x̂ x̂^T`` of this shape and its TFLOP/s (CUDA only)."""
    x, _ = make_inputs(shape, torch.bfloat16, device)
    xn = x / torch.linalg.vector_norm(x.float(), dim=-1, keepdim=True).clamp_min(1e-12).to(x.dtype)
    copies = [(xn.clone(),) for _ in range(_n_buffers(xn.numel() * 2, device))]
    t = time_cuda(_rotating(lambda a: torch.bmm(a, a.transpose(1, 2)), copies), repeats, device)
    tflops = 2.0 * shape.batch * shape.tokens ** 2 * shape.dim / (t["median_ms"] * 1e-3) / 1e12
    out = {"gram_ms": t["median_ms"], "gram_tflops": tflops}
    peak = peak_bf16_tflops(device_label)
    if peak is not None:
        out["gram_peak_tflops"] = peak
        out["gram_pct_of_peak"] = 100.0 * tflops / peak
    return out


# --------------------------------------------------------------------------- sweep
@dataclass
class Config:
    shapes: list
    methods: list
    backends: list
    dtypes: list
    device: str = "cpu"
    k: Optional[int] = None
    keep_ratio: float = 0.25
    lam: float = 0.5
    repeats: int = 10
    warmup: int = 1
    max_seconds: float = 3.0
    check_finite: bool = True
    seed: int = 0
    d2pruner: Optional[dict] = None  # pivot_ratio / alpha / tau / radius / grid given on the command line

    def method_params(self, method: str, shape: Shape) -> tuple[Optional[dict], str]:
        """``(select's method parameters, "")`` for this method and shape, or ``(None, why not)``."""
        if method != "d2pruner":
            return {}, ""
        params = {name: v for name, v in (self.d2pruner or {}).items() if v is not None}
        params.setdefault("grid", shape.grid)
        alpha = params.get("alpha", D2PRUNER_DEFAULTS["alpha"])
        if params["grid"] is None:
            if alpha < 1.0:
                return None, (f"d2pruner's spatial term (alpha={alpha:g} < 1) needs the patch grid of {shape.name} "
                              f"(N={shape.tokens}): give --grid ROWSxCOLS, or --alpha 1")
            del params["grid"]
        return params, ""


def _progress(quiet: bool, msg: str, end: str = "\n") -> None:
    if not quiet:
        print(msg, file=sys.stderr, end=end, flush=True)


def run_sweep(cfg: Config, env: dict, quiet: bool = False) -> tuple[list, list]:
    """``(records, skipped)``; ``skipped`` holds ``"backend method shape: reason"`` lines."""
    device_type = "cuda" if cfg.device.startswith("cuda") else "cpu"
    records, skipped = [], []
    unavailable = {}
    for b in cfg.backends:
        if b != "anchor":
            ok, detail = dispatch.status(b)
            if not ok:
                hint = dispatch.how_to_get(b, detail)
                unavailable[b] = detail + (f" (to get it, {hint})" if hint else "")
    for b, why in unavailable.items():
        skipped.append(f"{b}: {why}")
    backends = [b for b in cfg.backends if b not in unavailable]
    cases = [(s, dt, m, b) for s in cfg.shapes for dt in cfg.dtypes for m in cfg.methods for b in backends]
    gram_cache = {}
    for i, (shape, dt, method, backend) in enumerate(cases, 1):
        k = budget(shape.tokens, k=cfg.k, keep_ratio=None if cfg.k else cfg.keep_ratio)
        tag = f"[{i:>{len(str(len(cases)))}}/{len(cases)}] {backend:<7} {method:<9} {shape.label()} k={k} {dt}"
        lengths = None
        if shape.source == "file":
            lengths = read_token_file(shape.path).lengths
            lengths = None if lengths is None else torch.from_numpy(lengths).to(cfg.device)
        params, why = cfg.method_params(method, shape)
        fn2, why = (None, why) if params is None else make_runner(backend, method, k, cfg.lam, device_type,
                                                                  cfg.check_finite, params, lengths)
        if fn2 is None:
            skipped.append(f"{backend} {method} {shape.name}: {why}")
            _progress(quiet, f"{tag}  skipped")
            continue
        _progress(quiet, f"{tag} ...", end="")
        try:
            x, w = make_inputs(shape, DTYPES[dt], cfg.device, cfg.seed)
            nbytes = x.numel() * x.element_size() + (0 if w is None else w.numel() * 4)
            inputs = [(x, w)] + [(x.clone(), None if w is None else w.clone())
                                 for _ in range(_n_buffers(nbytes, cfg.device) - 1)]
            call = _rotating(fn2, inputs)
            if device_type == "cuda":
                t = time_cuda(call, cfg.repeats, cfg.device)
            else:
                t = time_cpu(call, cfg.repeats, cfg.warmup, cfg.max_seconds)
            rounds = _mean_rounds(fn2(x, w))
            del inputs, call, x, w
        except Exception as exc:  # a broken backend is reported, never a traceback
            reason = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            skipped.append(f"{backend} {method} {shape.name} {dt}: {reason}")
            _progress(quiet, f" {reason}")
            continue
        _progress(quiet, f" {format_number(t['median_ms'])} ms")
        rec = dict(env)
        rec.update({"backend": backend, "method": method, "preset": shape.name, "batch": shape.batch,
                    "tokens": shape.tokens, "dim": shape.dim, "k": k, "lam": cfg.lam, "dtype": dt,
                    "median_ms": t["median_ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"],
                    "us_per_step": t["median_ms"] * 1e3 / k,
                    "images_per_s": shape.batch / (t["median_ms"] * 1e-3),
                    "speedup_vs_torch": None, "speedup_vs_anchor": None,
                    "repeats": t["repeats"], "timer": t["timer"], "threads": torch.get_num_threads(),
                    "check_finite": cfg.check_finite})
        if rounds is not None:   # absent, not guessed, where the backend does not count
            rec["rounds"] = rounds
            rec["rounds_per_k"] = rounds / k
        if params:  # the method's own parameters, e.g. "alpha=0.5,grid=32x32"
            rec["params"] = ",".join(f"{name}={'x'.join(map(str, v)) if isinstance(v, tuple) else v}"
                                     for name, v in sorted(params.items()))
        if device_type == "cuda" and method != "topk":  # top-k never forms similarities
            key = (shape, dt)
            if key not in gram_cache:
                try:
                    gram_cache[key] = gram_stats(shape, cfg.device, cfg.repeats, env["device"])
                except Exception as exc:
                    skipped.append(f"bf16 Gram {shape.name}: failed: {type(exc).__name__}: {exc}")
                    gram_cache[key] = {}
            g = gram_cache[key]
            if g:
                rec.update(g)
                rec["gram_share"] = g["gram_ms"] / t["median_ms"]
        records.append(rec)
    add_speedups(records)
    return records, skipped


def add_speedups(records: list) -> None:
    """Fill ``speedup_vs_torch`` / ``speedup_vs_anchor``: baseline median / this median, within
    the same device, shape, dtype, method, k and lam."""
    def key(r):
        return (r["device"], r.get("preset"), r["batch"], r["tokens"], r["dim"], r["dtype"], r["method"],
                r["k"], r["lam"])
    base = {}
    for r in records:
        if r["backend"] in ("torch", "anchor"):
            base[(r["backend"],) + key(r)] = r["median_ms"]
    for r in records:
        for name in ("torch", "anchor"):
            ms = base.get((name,) + key(r))
            r[f"speedup_vs_{name}"] = None if ms is None else ms / r["median_ms"]


TABLE_COLUMNS = [("backend", "backend"), ("method", "method"), ("preset", "preset"), ("B", "batch"),
                 ("N", "tokens"), ("D", "dim"), ("k", "k"), ("dtype", "dtype"), ("x anchor", "speedup_vs_anchor"),
                 ("median ms", "median_ms"), ("p20 ms", "p20_ms"), ("p80 ms", "p80_ms"), ("us/step", "us_per_step"),
                 ("img/s", "images_per_s"), ("x torch", "speedup_vs_torch"),
                 ("rounds/k", "rounds_per_k")]
GPU_COLUMNS = [("gram share", "gram_share"), ("gram TFLOP/s", "gram_tflops"), ("% peak", "gram_pct_of_peak")]


LEGEND = """\
x anchor   speed-up over the anchor: anchor median / this median, same case. The anchor is the
           structure of the published selectors' code (mmrprune/baselines.py): one image at a
           time, the full fp32 N x N similarity matrix, then every greedy step as separate torch
           ops with a host sync to read the pick. mmr and divprune only ('-' elsewhere).
median ms  wall time of one call selecting k tokens in each of the B images (p20/p80: spread
           over the timed repeats)
us/step    median / k: microseconds per greedy step (one kept token per image, all B images)
img/s      images per second: B / median
x torch    speed-up over backend="torch", this package's plain PyTorch fallback
rounds/k   sequential rounds per image / k, on backends that pick in exact multi-commit rounds
           (1 = one pick per step; '-' where the backend does not count)"""
GPU_LEGEND = """\
gram ...   the bf16 batched Gram x x^T of the same shape: its share of this call's median, its
           TFLOP/s and % of the device's dense bf16 peak"""


def format_records(records: list) -> str:
    """The aligned terminal table of a sweep (GPU runs add the bf16 Gram columns), then what
    each column means."""
    from .records import format_table
    cols, legend = list(TABLE_COLUMNS), LEGEND
    if any("gram_ms" in r for r in records):
        cols += GPU_COLUMNS
        legend += "\n" + GPU_LEGEND
    return format_table(records, cols) + "\n\n" + legend
