"""``mmrprune-bench`` / ``python -m mmrprune.bench``: speed sweeps and selection quality.

    mmrprune-bench                       # = speed: real DINOv2 tokens, B=8 N=1024 D=384, keep 25%,
                                         #   mmr/divprune/topk on every backend this machine has
    mmrprune-bench speed --preset llava,qwen1080p --dtype bfloat16 --json out.json --plot out.png
    mmrprune-bench quality               # IDPruner Sec. 3 retention-vs-Hopkins on the real tokens
    mmrprune-bench downstream            # accuracy a real ViT keeps when pruned inside (see downstream.py)

Unavailable backends (not built, no GPU, method not implemented) are listed as
``skipped: ...`` lines; nothing a backend raises escapes as a traceback.
"""
from __future__ import annotations

import argparse
import sys
import time

from ..reference import D2PRUNER_DEFAULTS, METHODS
from .defaults import add_downstream_arguments
from .records import COMMITTED_DIRS, COMMITTED_OUT, FRESH_OUT
from .defaults import BACKEND_NAMES, DTYPE_NAMES, HYBRID_LAMS, MMR_LAMS, PRESETS, SINGLE_METHODS

# Argument parsing imports no torch (so --help and usage errors are instant); the
# subcommands import it when they run.

SUBCOMMANDS = ("speed", "quality", "downstream")
COMMITTED_FIGURE = "bench/figures/token_masks.png"


def _csv_list(kind, choices=None):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"empty {kind} list")
        if choices is not None:
            if items == ["all"]:
                return list(choices)
            bad = [t for t in items if t not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {kind} {bad}; choose from {list(choices)} or 'all'")
        return items
    return parse


def _floats(text):
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _ints(text):
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _grid(text):
    try:
        rows, cols = (int(t) for t in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS, e.g. 24x24, got {text!r}") from None
    if rows < 1 or cols < 1:
        raise argparse.ArgumentTypeError(f"grid sides must be >= 1, got {text!r}")
    return rows, cols


def _device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmrprune-bench",
        description="Speed and quality benchmarks of mmrprune's token selection. "
                    "With no subcommand, runs `speed` with its defaults.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets:\n" + "\n".join(f"  {k:<10} B={v[0]} N={v[1]} D={v[2]}  {v[4]}"
                                        for k, v in PRESETS.items()))
    sub = parser.add_subparsers(dest="command")

    sp = sub.add_parser("speed", help="time backends x methods x shapes (the default)",
                        description="Time selection across backends x methods x shapes x dtypes. CPU: warm-up, "
                                    "then median/p20/p80 of perf_counter repeats. CUDA: triton.testing.do_bench.")
    sp.add_argument("--preset", type=_csv_list("preset", list(PRESETS)), default=None,
                    help=f"comma list of {list(PRESETS)} or 'all' (default: dinov2, or a custom "
                         "random shape when --tokens and --dim are given)")
    sp.add_argument("--data", metavar="FILE.npz",
                    help="benchmark your own tokens, an .npz archive (numpy.savez) of features [B, N, D] "
                         "(float16/32/64), optional importance [B, N] and lengths [B] (instead of --preset / "
                         "--tokens / --dim)")
    sp.add_argument("--batch", type=int, help="images per call (overrides the preset)")
    sp.add_argument("--tokens", type=int, help="tokens per image N (overrides the preset)")
    sp.add_argument("--dim", type=int, help="feature dim D (overrides the preset)")
    budget = sp.add_mutually_exclusive_group()
    budget.add_argument("--keep-ratio", type=float, default=0.25, help="kept share of tokens (default 0.25)")
    budget.add_argument("--k", type=int, help="tokens kept per image (instead of --keep-ratio)")
    sp.add_argument("--lam", type=float, default=0.5, help="MMR trade-off lam (default 0.5)")
    sp.add_argument("--dtype", type=_csv_list("dtype", list(DTYPE_NAMES)), default=None,
                    help="comma list of float16,bfloat16,float32,float64 (default float16; with --data, "
                         "the file's dtype)")
    sp.add_argument("--method", type=_csv_list("method", list(METHODS)), default=["mmr", "divprune", "topk"],
                    help=f"comma list of {list(METHODS)} or 'all' (default mmr,divprune,topk)")
    d2 = sp.add_argument_group("d2pruner parameters (default: the library's; the preset's grid)")
    d2.add_argument("--grid", type=_grid, help="patch grid ROWSxCOLS of the tokens, row-major (presets know theirs; "
                                               "needed for a custom shape unless --alpha 1)")
    for name, kind in (("pivot_ratio", float), ("alpha", float), ("tau", float), ("radius", int)):
        d2.add_argument("--" + name.replace("_", "-"), type=kind, help=f"default {D2PRUNER_DEFAULTS[name]}")
    sp.add_argument("--backend", type=_csv_list("backend", list(BACKEND_NAMES)),
                    default=None, help="comma list of cuda,triton,cpu,torch,numpy,anchor (default on CPU: "
                                       "cpu,torch,numpy,anchor; on CUDA: cuda,triton,torch,anchor)")
    sp.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    sp.add_argument("--repeats", type=int, default=10, help="timed calls per case (default 10; on CPU at "
                                                            "least 3, fewer once a case passes --max-seconds)")
    sp.add_argument("--warmup", type=int, default=1, help="untimed calls before timing, CPU (default 1)")
    sp.add_argument("--max-seconds", type=float, default=3.0,
                    help="CPU: stop a case's repeats after this long once 3 are done (default 3)")
    sp.add_argument("--no-check-finite", action="store_true",
                    help="call select(check_finite=False) (no NaN/Inf scan, no host sync)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the random features (default 0)")
    sp.add_argument("--threads", type=int, help="torch.set_num_threads for the run (default: torch's own)")
    sp.add_argument("--json", metavar="PATH", help="write the records as JSON")
    sp.add_argument("--csv", metavar="PATH", help="write the records as CSV")
    sp.add_argument("--plot", metavar="PATH", help="write a PNG bar chart (needs matplotlib)")
    sp.add_argument("--update-committed", action="store_true",
                    help=f"let --json/--csv/--plot write into the committed folders ({', '.join(COMMITTED_DIRS)}), "
                         "to regenerate a committed record")
    sp.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    qp = sub.add_parser("quality", help="importance retention vs Hopkins on the real tokens (IDPruner Sec. 3)",
                        description="Uniform random importance per image (seeded), keep a share of the tokens, "
                                    "sweep mmr's lam and hybrid's pool; average importance retention and Hopkins "
                                    "over images and seeds; check whether MMR's points dominate hybrid's.")
    qp.add_argument("--images", type=int, default=8, help="first N of the 8 bundled photos (default 8)")
    qp.add_argument("--tokens", type=int, help="evenly subsample this many of the 1024 tokens (quick runs)")
    qp.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="importance seeds (default 0,1,2)")
    qp.add_argument("--keep-ratio", type=float, default=0.25, help="kept share (default 0.25)")
    qp.add_argument("--mmr-lams", type=_floats, default=list(MMR_LAMS), help="mmr lam sweep")
    qp.add_argument("--hybrid-lams", type=_floats, default=list(HYBRID_LAMS),
                    help="hybrid lam sweep (pool c = round(k/lam))")
    qp.add_argument("--methods", type=_csv_list("method", list(METHODS)), default=list(SINGLE_METHODS),
                    help="single-point methods (default topk,fps,divprune,dpp)")
    qp.add_argument("--backend", default="auto", help="selection backend (default auto = fastest available)")
    qp.add_argument("--device", default="auto", help="auto, cpu or cuda")
    qp.add_argument("--out-dir", default=None,
                    help="writes quality_pareto.{json,csv,png}, quality_dominance.json and token_masks.png "
                         f"here (default: a new folder {FRESH_OUT}/quality-<date>-<time>, so no run overwrites "
                         "an earlier one or the committed results)")
    qp.add_argument("--figure", default=None, help="token-mask figure path (default OUT_DIR/token_masks.png)")
    qp.add_argument("--update-committed", action="store_true",
                    help=f"regenerate the committed results: --out-dir {COMMITTED_OUT} --figure "
                         f"{COMMITTED_FIGURE} (run from the repository root)")
    qp.add_argument("--no-figure", action="store_true", help="skip the token-mask figure")
    qp.add_argument("--mask-lam", type=float, default=0.5, help="mmr lam of the token-mask figure (default 0.5)")
    qp.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    add_downstream_arguments(sub.add_parser(
        "downstream", help="task accuracy kept when pruning inside DINOv2 ViT-S/14 (Fashion-MNIST probe, photos)",
        description="Downstream quality: prune inside a real ViT and measure what a task keeps."))
    return parser


def _argv_with_default(argv):
    """No subcommand given -> ``speed`` (top-level -h/--help still shows the overview)."""
    if not argv:
        return ["speed"]
    if argv[0] in SUBCOMMANDS or argv[0] in ("-h", "--help"):
        return list(argv)
    return ["speed"] + list(argv)


def main(argv=None) -> int:
    raw = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(_argv_with_default(raw))
    if args.command == "quality":
        return _quality(args, argv, parser)
    if args.command == "downstream":
        from . import downstream
        return downstream.run_cli(args, argv, parser)
    return _speed(args, argv, parser)


def _speed(args, argv, parser) -> int:
    import torch

    from . import speed
    from .records import SPEED_FIELDS, environment, refuse_committed, write_csv, write_json
    from .token_file import ACCEPTED_TEXT, read_token_file
    device = _device(args.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available to torch {torch.__version__}")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if not 0.0 <= args.lam <= 1.0:
        parser.error("--lam must be in [0, 1]")
    if args.k is not None and args.k < 1:
        parser.error("--k must be >= 1")
    if not 0.0 < args.keep_ratio <= 1.0:
        parser.error("--keep-ratio must be in (0, 1]")
    paths = {"--json": args.json, "--csv": args.csv, "--plot": args.plot}
    if not args.update_committed:
        refuse_committed(paths, parser.error, fixed=False)
    elif not any(paths.values()):
        parser.error("--update-committed: give the committed --json/--csv/--plot path(s) to rewrite")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    presets = args.preset
    if presets is None:
        presets = [] if (args.tokens and args.dim) else ["dinov2"]
    if args.data and (args.preset or args.batch or args.tokens or args.dim):
        parser.error("--data takes its shape from the file: drop --preset / --batch / --tokens / --dim")
    dtypes = args.dtype or ["float16"]
    try:
        if args.data:
            tokens = read_token_file(args.data)
            shapes = [speed.Shape("data", *tokens.features.shape, "file", path=args.data)]
        else:
            shapes = speed.make_shapes(presets, args.batch, args.tokens, args.dim)
    except ValueError as exc:
        parser.error(str(exc))
    if args.data:
        if tokens.features_from != "features":
            print(f"--data {args.data}: its only array, '{tokens.features_from}', read as the features",
                  file=sys.stderr)
        if tokens.ignored:
            print(f"warning: --data {args.data}: ignoring array(s) {tokens.ignored}; accepted: {ACCEPTED_TEXT}",
                  file=sys.stderr)
        if args.dtype is None:
            dtypes = [tokens.features.dtype.name]
            print(f"dtype: {dtypes[0]}, the file's (--dtype to benchmark others)")
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    cfg = speed.Config(shapes=shapes, methods=args.method, dtypes=dtypes, device=device,
                       backends=args.backend or list(speed.DEFAULT_BACKENDS[device_type]),
                       k=args.k, keep_ratio=args.keep_ratio, lam=args.lam, repeats=args.repeats,
                       warmup=args.warmup, max_seconds=args.max_seconds, check_finite=not args.no_check_finite,
                       seed=args.seed, d2pruner={name: getattr(args, name) for name in D2PRUNER_DEFAULTS})
    env = environment(device, argv)
    print(f"device: {env['device']} | torch {env['torch']} ({torch.get_num_threads()} threads) | "
          f"triton {env['triton']} | commit {env['commit']}")
    t0 = time.perf_counter()
    records, skipped = speed.run_sweep(cfg, env, quiet=args.quiet)
    if records:
        print(speed.format_records(records))
    for s in skipped:
        print(f"skipped: {s}")
    if not records:
        print("no case ran: nothing was measured (see the skipped lines)", file=sys.stderr)
        return 1
    print(f"{len(records)} cases in {time.perf_counter() - t0:.1f} s")
    return _write(args, records, SPEED_FIELDS, write_json, write_csv,
                  lambda path: __import__("mmrprune.bench.plotting", fromlist=["plot_speed"]).plot_speed(records, path))


def _write(args, records, fields, write_json, write_csv, plot) -> int:
    from .plotting import PlotUnavailable
    if args.json:
        write_json(args.json, records)
        print(f"wrote {args.json}")
    if args.csv:
        write_csv(args.csv, records, fields)
        print(f"wrote {args.csv}")
    if getattr(args, "plot", None):
        if not records:
            print(f"no plot: nothing ran ({args.plot})")
        else:
            try:
                plot(args.plot)
                print(f"wrote {args.plot}")
            except PlotUnavailable as exc:
                print(f"no plot: {exc}", file=sys.stderr)
                return 1
    return 0


def _quality(args, argv, parser) -> int:
    import os

    from . import quality
    from .records import REQUIRED_FIELDS, environment, output_paths, write_csv, write_json
    device = _device(args.device)
    if not 1 <= args.images <= 8:
        parser.error("--images must be in 1..8")
    if args.tokens is not None and not 2 <= args.tokens <= 1024:
        parser.error("--tokens must be in 2..1024")
    if not 0.0 < args.keep_ratio <= 1.0:
        parser.error("--keep-ratio must be in (0, 1]")
    if not args.seeds:
        parser.error("--seeds: give at least one seed")
    for lam in list(args.mmr_lams) + list(args.hybrid_lams) + [args.mask_lam]:
        if not 0.0 <= lam <= 1.0:
            parser.error(f"lam {lam} is outside [0, 1]")
    out, figure = output_paths("quality", args.out_dir, args.figure, args.update_committed, COMMITTED_FIGURE,
                               "token_masks.png", parser.error, "--figure")
    env = environment(device, argv)
    cfg = quality.QualityConfig(images=args.images, tokens=args.tokens, seeds=args.seeds,
                                keep_ratio=args.keep_ratio, mmr_lams=args.mmr_lams, hybrid_lams=args.hybrid_lams,
                                singles=args.methods, backend=args.backend, device=device)
    progress = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    try:
        records = quality.run_quality(cfg, env, progress)
    except (RuntimeError, ValueError) as exc:
        print(f"quality run failed: {exc}", file=sys.stderr)
        return 1
    comparison = quality.compare_mmr_hybrid(records)
    print(quality.format_quality(records, comparison))
    paths = {ext: os.path.join(out, f"quality_pareto.{ext}") for ext in ("json", "csv", "png")}
    write_json(paths["json"], records)
    write_csv(paths["csv"], records, REQUIRED_FIELDS)
    dom_path = os.path.join(out, "quality_dominance.json")
    write_json(dom_path, dict(comparison, command=env["command"], commit=env["commit"], device=env["device"]))
    print(f"wrote {paths['json']}, {paths['csv']}, {dom_path}")
    from .plotting import PlotUnavailable, plot_pareto, plot_token_masks
    rc = 0
    try:
        plot_pareto(records, comparison, paths["png"])
        print(f"wrote {paths['png']}")
        if not args.no_figure:
            photos = records[0]["images"].split(",")[:quality.MASK_PHOTO_COUNT]   # only the run's photos
            masks = quality.token_masks(args.mask_lam, args.keep_ratio, args.backend, device, photos)
            plot_token_masks(masks, figure)
            print(f"wrote {figure}")
            for (name, m), s in masks["stats"].items():
                print(f"  mask {name:<10} {m:<9} retention {s['retention']:.3f}  hopkins {s['hopkins']:.3f}")
    except PlotUnavailable as exc:
        print(f"no plots: {exc}", file=sys.stderr)
        rc = 1
    print(f"quality run: {time.perf_counter() - t0:.1f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
