"""Selection quality metrics (IDPruner, Sec. 3.1).

* importance retention ``I(S) = sum_{i in S} w_i / sum_{i in V} w_i``;
* Hopkins ``H(S)``: a reference set R of |S| points drawn uniformly (seeded)
  from the axis-aligned bounding box of all tokens of the image, cosine
  distance ``d = 1 - cos`` to the nearest neighbour,
  ``H = sum_R d(r, S) / (sum_R d(r, S) + sum_{v in S} d(v, S \\ {v}))``.
  Lower H means the kept set covers the space more evenly; H near 1 means
  the kept tokens cluster together.

Both take one image (``[N, D]``, ``[N]``, indices ``[k]``) as NumPy arrays or
tensors; -1 entries in ``indices`` (batch padding) are ignored.
"""
from __future__ import annotations

import numpy as np

from .reference import normalize_rows


def _np(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu()
        if str(a.dtype) == "torch.bfloat16":
            a = a.float()
        a = a.numpy()
    return np.asarray(a)


def _one_image(name: str, a: np.ndarray, want: str) -> None:
    """The metrics take one image: a batch gets this error, not a misleading one about its contents."""
    if a.ndim != 1:
        raise ValueError(f"{name}: expected {want} for one image, got shape {tuple(a.shape)}; these metrics "
                         f"take one image at a time (for a batch, call them per image: w[b], indices[b])")


def _kept(indices, n: int) -> np.ndarray:
    idx = _np(indices).astype(np.int64)
    _one_image("indices", idx, "[k]")
    idx = idx[idx >= 0]
    if idx.size and idx.max() >= n:
        raise ValueError(f"indices: values must be < N={n}, got max {idx.max()}")
    if np.unique(idx).size != idx.size:
        raise ValueError("indices: contains duplicates")
    return idx


def importance_retention(importance, indices) -> float:
    """``sum_S w / sum_V w`` for one image (raw importance ``w``, e.g. attention mass)."""
    w = _np(importance).astype(np.float64)
    _one_image("importance", w, "[N]")
    idx = _kept(indices, w.size)
    total = w.sum()
    if total == 0:
        raise ValueError("importance: sums to 0, retention is undefined")
    return float(w[idx].sum() / total)


def _cosine_nn(a: np.ndarray, b: np.ndarray, exclude_self: bool = False) -> np.ndarray:
    d = 1.0 - normalize_rows(a) @ normalize_rows(b).T
    if exclude_self:
        np.fill_diagonal(d, np.inf)
    return d.min(axis=1)


def hopkins(features, indices, seed: int = 0) -> float:
    """Hopkins statistic of the kept set ``S`` inside one image's tokens (needs |S| >= 2)."""
    x = _np(features).astype(np.float64)
    if x.ndim != 2:
        raise ValueError(f"features: expected [N, D] for one image, got shape {x.shape}")
    idx = _kept(indices, x.shape[0])
    if idx.size < 2:
        raise ValueError(f"indices: Hopkins needs at least 2 kept tokens, got {idx.size}")
    kept = x[idx]
    rng = np.random.default_rng(seed)
    ref = rng.uniform(x.min(axis=0), x.max(axis=0), size=(idx.size, x.shape[1]))
    u = _cosine_nn(ref, kept).sum()
    w = _cosine_nn(kept, kept, exclude_self=True).sum()
    return float(u / (u + w))
