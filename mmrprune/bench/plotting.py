"""PNG figures.  matplotlib is optional (``pip install mmrprune[bench]``)."""
from __future__ import annotations

import os

import numpy as np

DPI_MASKS = 80  # the token-mask figure holds photos: keep the PNG small
MISSING = "matplotlib is not installed: `pip install matplotlib` (or `pip install -e .[bench]`) to write plots"


class PlotUnavailable(RuntimeError):
    pass


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable(MISSING) from exc
    return plt


def _save(fig, path: str, dpi: int = 130) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")


def plot_speed(records: list, path: str) -> None:
    """Write :func:`speed_figure` of ``records`` to ``path``."""
    plt = _pyplot()
    fig = speed_figure(records)
    _save(fig, path)
    plt.close(fig)


def backend_color(plt, backend: str):
    """A backend's bar colour, the same in every figure (fixed by its place in BACKEND_NAMES)."""
    from .defaults import BACKEND_NAMES
    names = list(BACKEND_NAMES)
    return plt.cm.tab10(names.index(backend) if backend in names else len(names))


def speed_figure(records: list):
    """One panel per (preset, shape, dtype): median ms per method x backend (log scale,
    whiskers p20..p80), each bar labelled with its time and its speed-up over the anchor
    loop; the label starts past the whisker, so no line crosses it.  Bars are coloured by
    backend, with one legend for the figure."""
    from matplotlib.patches import Patch

    from .records import format_number
    plt = _pyplot()
    groups = {}
    for r in records:
        groups.setdefault((r.get("preset"), r["batch"], r["tokens"], r["dim"], r["k"], r["dtype"]), []).append(r)
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 1.3 + 0.32 * max(len(g) for g in groups.values())
                                                      * len(groups)), squeeze=False)
    for ax, ((preset, b, n, d, k, dt), rows) in zip(axes[:, 0], groups.items()):
        rows = sorted(rows, key=lambda r: (r["method"], r["median_ms"]))
        y = np.arange(len(rows))
        med = np.array([r["median_ms"] for r in rows])
        err = np.array([[r["median_ms"] - r["p20_ms"] for r in rows], [r["p80_ms"] - r["median_ms"] for r in rows]])
        ax.barh(y, med, xerr=err, color=[backend_color(plt, r["backend"]) for r in rows], error_kw={"lw": 0.8})
        ax.set_yticks(y, [f"{r['method']} / {r['backend']}" for r in rows])
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("median ms per call (whiskers p20-p80), lower is better; "
                      "label: median and speed-up over the anchor loop")
        ax.set_title(f"{preset}: B={b} N={n} D={d} k={k} {dt} — {rows[0]['device']}", fontsize=9)
        lo, hi = min(r["p20_ms"] for r in rows), max(r["p80_ms"] for r in rows)
        ax.set_xlim(lo / 2, hi * 12)  # room right of the longest whisker for its label
        for yi, r in zip(y, rows):
            label = f"{format_number(r['median_ms'])} ms"
            if r.get("speedup_vs_anchor") is not None:
                label += f"  {format_number(r['speedup_vs_anchor'])}x anchor"
            ax.text(r["p80_ms"] * 1.15, yi, label, va="center", fontsize=7)
    backends = list(dict.fromkeys(r["backend"] for r in sorted(records, key=lambda r: r["backend"])))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    fig.legend(handles=[Patch(color=backend_color(plt, b), label=b) for b in backends], title="backend",
               loc="upper center", ncol=len(backends), fontsize=8, title_fontsize=8, frameon=False)
    return fig


def plot_pareto(records: list, comparison: dict, path: str) -> None:
    """Importance retention (up) vs Hopkins (left is better) for every quality point."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for fam, style in (("mmr", "o-"), ("hybrid", "s--")):
        rows = [r for r in records if r["method"] == fam]
        if not rows:
            continue
        rows = sorted(rows, key=lambda r: r["lam"])
        ax.plot([r["hopkins"] for r in rows], [r["retention"] for r in rows], style, ms=4,
                label=f"{fam} (lam sweep)" if fam == "mmr" else "hybrid (pool c = round(k/lam))")
        for r in rows:
            note = f"{r['lam']:g}" if fam == "mmr" else f"c={r['pool']}"
            ax.annotate(note, (r["hopkins"], r["retention"]), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
    markers = {"topk": "^", "fps": "v", "divprune": "D", "dpp": "P"}
    for r in records:
        if r["method"] in markers:
            ax.plot(r["hopkins"], r["retention"], markers[r["method"]], ms=8, label=r["method"])
    r0 = records[0]
    ax.set_xlabel("Hopkins H(S) (lower = kept tokens cover the space more evenly)")
    ax.set_ylabel("importance retention I(S) (higher is better)")
    title = (f"DINOv2 tokens, {r0['batch']} images x {len(r0['seeds'].split(','))} seeds, uniform random "
             f"importance, keep {r0['k']}/{r0['tokens']}")
    if comparison.get("hybrid_points"):
        title += (f"\nhybrid points weakly dominated by an MMR point: {comparison['dominated']}/"
                  f"{comparison['hybrid_points']}")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_token_masks(result: dict, path: str) -> None:
    """Rows: photos; columns: the photo, then its kept patches per method (others dimmed)."""
    plt = _pyplot()
    images, methods, masks, thumbs = result["images"], result["methods"], result["masks"], result["thumbnails"]
    fig, axes = plt.subplots(len(images), len(methods) + 1, figsize=(2.4 * (len(methods) + 1), 2.5 * len(images)),
                             squeeze=False)
    for i, name in enumerate(images):
        img = thumbs[i].astype(np.float32) / 255.0
        side = img.shape[0]
        axes[i, 0].imshow(img)
        axes[i, 0].set_title(name, fontsize=9)
        for j, m in enumerate(methods):
            mask = masks[i, j]
            rep = side // mask.shape[0]
            up = np.kron(mask, np.ones((rep, rep), dtype=bool))
            pad = np.zeros(img.shape[:2], dtype=bool)
            pad[:up.shape[0], :up.shape[1]] = up
            shown = np.where(pad[..., None], img, 0.15 * img + 0.1)
            axes[i, j + 1].imshow(shown)
            s = result["stats"][(name, m)]
            lam = f" lam={result['lam']:g}" if m == "mmr" else ""
            axes[i, j + 1].set_title(f"{m}{lam}\nI={s['retention']:.2f} H={s['hopkins']:.3f}", fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"kept patches ({result['keep_ratio']:.0%}, 32x32 grid), importance = last-layer [CLS] attention",
                 fontsize=9)
    fig.tight_layout()
    _save(fig, path, dpi=DPI_MASKS)
    plt.close(fig)


def plot_downstream(records: list, path: str) -> None:
    """Fashion-MNIST accuracy retained (% of unpruned) vs kept patches k, one line per method
    (bootstrap standard-error bars), one panel per pruning layer P."""
    plt = _pyplot()
    rows = [r for r in records if r["task"] == "fashion-mnist" and r["metric"] == "accuracy_retained"]
    layers = sorted({r["P"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(layers), figsize=(4.6 * len(layers), 4.4), squeeze=False, sharey=True)
    styles = {"random": ":", "grid": ":"}
    for ax, layer in zip(axes[0], layers):
        for i, m in enumerate(methods):
            pts = sorted((r["k"], r["value"], r["stderr"]) for r in rows if r["P"] == layer and r["method"] == m)
            k, v, se = (np.array(t, dtype=float) for t in zip(*pts))
            ax.errorbar(k * (1 + 0.015 * (i - len(methods) / 2)), 100 * v, yerr=100 * se, fmt="o" + styles.get(m, "-"),
                        ms=3, lw=1, capsize=2, color=plt.cm.tab20(i % 20), label=m)
        ax.set_xscale("log", base=2)
        ks = sorted({r["k"] for r in rows})
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.axhline(100, color="grey", lw=0.6)
        ax.set_title(f"pruned after block {layer} (P={layer})", fontsize=9)
        ax.set_xlabel(f"kept patches k (of {rows[0]['tokens']})")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("accuracy retained, % of unpruned")
    base = next((r for r in records if r["task"] == "fashion-mnist" and r["method"] == "unpruned"), None)
    title = "Fashion-MNIST linear probe on DINOv2 ViT-S/14 [CLS]"
    if base:
        title += f" (unpruned {100 * base['value']:.1f}% on n={base['n']}); bars: bootstrap standard error"
    fig.suptitle(title, fontsize=9)
    axes[0, -1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
