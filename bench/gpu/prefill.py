"""Target (f): the selection's time as a share of the prefill time it saves.

    python3 bench/gpu/prefill.py --out prefill.json [--dry-run]

A decoder with Qwen2.5-VL-7B's text dimensions (hidden 3584, 28 layers, MLP 18944,
28 query heads and 4 key/value heads of 128, RMSNorm, rotary positions, SwiGLU, biased
q/k/v projections) in plain torch, random bf16 weights (std 0.02): ``--layers-timed``
layers are built and timed, and the time is scaled to the full depth.  Embedding and
LM head are left out (the head runs on the last token only; the embedding is a gather).
The prompt is (b)'s image, 2691 visual tokens, plus ``--text-tokens`` of text; pruned,
the image keeps 25 % (673).  Prefill saved = prefill(all tokens) - prefill(pruned);
the selection (mmr, lam 0.5, bf16, on (b)'s shape) is timed with the same timer on each
kernel backend; share = selection / saved.  CUDA: ``triton.testing.do_bench`` medians
(``mmrprune.bench.speed.time_cuda``).  ``--dry-run``: tiny dimensions on CPU (the plumbing).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from common import TARGET, exit_status, record_fields, write_json  # first: sys.path, --dry-run's env
from goals import CASES, DTYPE, KEEP_RATIO, LAM, PREFILL_CASE

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mmrprune.bench import speed  # noqa: E402
from mmrprune.reference import budget  # noqa: E402


@dataclass(frozen=True)
class DecoderDims:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float = 1e6


QWEN25_VL_7B = DecoderDims(hidden=3584, layers=28, intermediate=18944, heads=28, kv_heads=4, head_dim=128)
TINY = DecoderDims(hidden=64, layers=28, intermediate=160, heads=4, kv_heads=2, head_dim=16)


class Layer:
    """One pre-norm decoder layer's weights (random, bf16)."""

    def __init__(self, dims: DecoderDims, device: str, gen: torch.Generator):
        h, q, kv, m = dims.hidden, dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim, dims.intermediate

        def w(*shape):   # drawn on the device: a 7B layer's 233M weights are slow to draw on the host
            return (torch.randn(*shape, generator=gen, device=device) * 0.02).to(torch.bfloat16)
        self.dims = dims
        self.ln1, self.ln2 = torch.ones(h, device=device, dtype=torch.bfloat16), torch.ones(h, device=device,
                                                                                          dtype=torch.bfloat16)
        self.wq, self.bq, self.wk, self.bk, self.wv, self.bv = w(q, h), w(q), w(kv, h), w(kv), w(kv, h), w(kv)
        self.wo, self.wg, self.wu, self.wd = w(h, q), w(m, h), w(m, h), w(h, m)


def rms_norm(x, weight, eps=1e-6):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rotary(t: int, dims: DecoderDims, device: str):
    inv = 1.0 / dims.rope_theta ** (torch.arange(0, dims.head_dim, 2, device=device, dtype=torch.float32)
                                    / dims.head_dim)
    ang = torch.outer(torch.arange(t, device=device, dtype=torch.float32), inv)
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)


def apply_rotary(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def layer_forward(layer: Layer, hidden, cos, sin):
    d = layer.dims
    t = hidden.shape[0]
    x = rms_norm(hidden, layer.ln1)
    q = F.linear(x, layer.wq, layer.bq).view(t, d.heads, d.head_dim).transpose(0, 1)
    k = F.linear(x, layer.wk, layer.bk).view(t, d.kv_heads, d.head_dim).transpose(0, 1)
    v = F.linear(x, layer.wv, layer.bv).view(t, d.kv_heads, d.head_dim).transpose(0, 1)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    a = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, enable_gqa=True)[0]
    hidden = hidden + F.linear(a.transpose(0, 1).reshape(t, d.heads * d.head_dim), layer.wo)
    x = rms_norm(hidden, layer.ln2)
    return hidden + F.linear(F.silu(F.linear(x, layer.wg)) * F.linear(x, layer.wu), layer.wd)


def time_call(fn, repeats: int) -> dict:
    if TARGET.dry_run:
        return speed.time_cpu(fn, repeats, warmup=1, max_seconds=1.0)
    return speed.time_cuda(fn, repeats, TARGET.device)


def time_prefill(layers: list, tokens: int, repeats: int) -> dict:
    dims = layers[0].dims
    gen = torch.Generator(device=TARGET.device).manual_seed(tokens)
    hidden = torch.randn(tokens, dims.hidden, generator=gen, device=TARGET.device).to(torch.bfloat16)
    cos, sin = rotary(tokens, dims, TARGET.device)

    def run():
        with torch.inference_mode():
            h = hidden
            for layer in layers:
                h = layer_forward(layer, h, cos, sin)
            return h
    out = run()
    if not torch.isfinite(out.float()).all():   # random weights that overflow would time garbage
        raise RuntimeError(f"prefill of {tokens} tokens produced non-finite activations")
    t = time_call(run, repeats)
    scale = dims.layers / len(layers)
    return {"median_ms": t["median_ms"] * scale, "p20_ms": t["p20_ms"] * scale, "p80_ms": t["p80_ms"] * scale,
            "timed_ms": t["median_ms"], "timer": t["timer"], "repeats": t["repeats"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON list of records")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny dimensions")
    p.add_argument("--layers-timed", type=int, default=None, help="layers built and timed (default 4; dry run 2)")
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens of the prompt besides the image "
                                                                "(default 64; dry run 8)")
    args = p.parse_args(argv)
    dims = TINY if TARGET.dry_run else QWEN25_VL_7B
    n_layers = args.layers_timed or TARGET.size(4, 2)
    text = args.text_tokens if not TARGET.dry_run else min(args.text_tokens, 8)
    case = next(c for c in CASES if c.name == PREFILL_CASE)
    shape = speed.make_shapes([case.preset], batch=1)[0]
    if TARGET.dry_run:
        b, n, dim = case.dry_shape
        shape = speed.Shape(f"{case.preset}-tiny", 1, n, dim, "random")
    visual = shape.tokens
    kept = budget(visual, keep_ratio=KEEP_RATIO)
    repeats = TARGET.size(10, 2)

    env = dict(record_fields(__file__, argv), target="f")
    common_fields = dict(batch=1, dim=dims.hidden, lam=None, dtype=DTYPE, k=None, us_per_step=None,
                         layers=dims.layers, layers_timed=n_layers, text_tokens=text, visual_tokens=visual,
                         decoder=f"Qwen2.5-VL-7B text dims ({dims})" if not TARGET.dry_run else f"tiny ({dims})")
    gen = torch.Generator(device=TARGET.device).manual_seed(0)
    layers = [Layer(dims, TARGET.device, gen) for _ in range(n_layers)]
    records = []
    prefill = {}
    for label, tokens in (("unpruned", text + visual), ("pruned", text + kept)):
        t = time_prefill(layers, tokens, repeats)
        prefill[label] = t["median_ms"]
        records.append({**env, **common_fields, "backend": "torch", "method": f"prefill ({label})",
                        "tokens": tokens, **t})
        print(f"[prefill] {label}: {tokens} tokens, {t['median_ms']:.4g} ms for {dims.layers} layers "
              f"({t['timed_ms']:.4g} ms timed over {n_layers})", flush=True)
        write_json(args.out, records)
    saved = prefill["unpruned"] - prefill["pruned"]
    x, w = speed.make_inputs(shape, speed.DTYPES[DTYPE], TARGET.device)
    failed = []
    for backend in TARGET.backends:
        fn, why = speed.make_runner(backend, "mmr", kept, LAM, TARGET.device)
        if fn is None:
            failed.append(f"{backend}: {why}")
            continue
        t = time_call(lambda: fn(x, w), repeats)
        share = 100.0 * t["median_ms"] / saved if saved > 0 else None   # None: pruning saved nothing
        records.append({**env, "backend": backend, "method": "mmr", "batch": 1, "tokens": visual, "dim": shape.dim,
                        "k": kept, "lam": LAM, "dtype": DTYPE, "median_ms": t["median_ms"], "p20_ms": t["p20_ms"],
                        "p80_ms": t["p80_ms"], "us_per_step": t["median_ms"] * 1e3 / kept, "timer": t["timer"],
                        "prefill_unpruned_ms": prefill["unpruned"], "prefill_pruned_ms": prefill["pruned"],
                        "prefill_saved_ms": saved, "share_pct": share})
        print(f"[prefill] {backend} mmr selection {t['median_ms']:.4g} ms = "
              f"{'n/a' if share is None else format(share, '.3g')} % of the {saved:.4g} ms saved", flush=True)
        write_json(args.out, records)
    return exit_status("prefill", failed)


if __name__ == "__main__":
    raise SystemExit(main())
