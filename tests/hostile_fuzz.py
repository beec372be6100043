"""Seeded hostile-input fuzz of the C++ CPU backend (run by .ci/sanitize.sh under ASan/UBSan).

Each case draws a problem meant to reach the corners of the extension:
every method and input dtype, padded / packed / single-image layouts with
empty images, budgets from 1 to far beyond N (2**63 included), lam at 0, 1
and subnormal, duplicate / zero / antipodal / huge feature rows, constant,
tied or missing importance, d2pruner with huge radii.  Every call must either
raise a clean ValueError/TypeError naming an argument, or return well-formed
picks: the right width, distinct in-range indices, -1 padding past each
budget, and untouched inputs.  A memory error or undefined behaviour aborts
the process under the sanitizers.

    python3 tests/hostile_fuzz.py --seed 17 --cases 400
"""
from __future__ import annotations

import argparse
import hashlib
import sys

import numpy as np
import torch

import mmrprune
from mmrprune import reference as R

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LAMS = (0.0, 1.0, 0.5, 0.25, 1e-19, 5e-324, 1e-300)
KS = (1, 2, 3, 7, 64, 2**31, 2**62, 2**63, 2**64)


def _digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _features(rng, shape, dtype):
    d = shape[-1]
    kind = rng.integers(0, 4)
    if kind == 0:    # small integer palette: duplicates, zero rows, antipodes
        palette = rng.integers(-2, 3, size=(int(rng.integers(1, 6)), d)).astype(np.float64)
        x = palette[rng.integers(0, len(palette), size=shape[:-1])]
    elif kind == 1:  # all zero
        x = np.zeros(shape)
    elif kind == 2:  # gaussian
        x = rng.standard_normal(shape)
    else:            # large but representable in the input dtype
        x = rng.standard_normal(shape) * (1e3 if dtype == torch.float16 else 1e15)
    return torch.from_numpy(x).to(dtype)


def _importance(rng, shape, dtype):
    kind = rng.integers(0, 4)
    if kind == 0:
        return None
    if kind == 1:
        return torch.full(shape, 3.0, dtype=dtype)
    if kind == 2:
        return torch.from_numpy(rng.integers(0, 3, size=shape).astype(np.float64)).to(dtype)
    return torch.from_numpy(rng.standard_normal(shape)).to(dtype)


def _check_rows(out, ks, k_max, lengths):
    assert out.dtype == torch.int64 and out.shape == (len(ks), k_max), (out.shape, k_max)
    for b, (k, n) in enumerate(zip(ks, lengths)):
        row = out[b].tolist()
        picks, pad = row[:k], row[k:]
        assert all(p == -1 for p in pad), row
        assert len(set(picks)) == k and all(0 <= p < n for p in picks), (row, k, n)


def one_case(rng) -> str:
    """Run one random problem on the cpu backend; return a short tag of what it did."""
    method = R.METHODS[int(rng.integers(0, len(R.METHODS)))]
    dtype = DTYPES[int(rng.integers(0, len(DTYPES)))]
    layout = ("single", "padded", "packed")[int(rng.integers(0, 3))]
    b, n, d = int(rng.integers(1, 5)), int(rng.integers(1, 40)), int(rng.integers(1, 20))
    lam = float(LAMS[int(rng.integers(0, len(LAMS)))])
    if rng.random() < 0.7:
        budget = {"k": int(KS[int(rng.integers(0, len(KS)))])}
    else:
        budget = {"keep_ratio": float(rng.choice([1e-9, 0.1, 0.5, 1.0]))}
    params = {}
    if method == "d2pruner":
        params = {"alpha": 1.0, "radius": int(rng.choice([0, 1, 2**40, 2**70]))}
    order = "selection" if rng.random() < 0.5 else "position"
    kw = dict(lam=lam, method=method, order=order, backend="cpu", **budget, **params)

    if layout == "single":
        x, w = _features(rng, (n, d), dtype), _importance(rng, (n,), dtype)
        before = _digest(x, w)
        out = mmrprune.select(x, w, **kw)
        lengths = [n]
        out = out[None]
    elif layout == "padded":
        x, w = _features(rng, (b, n, d), dtype), _importance(rng, (b, n), dtype)
        lengths = rng.integers(0, n + 1, size=b).tolist()
        if rng.random() < 0.2:
            lengths = [0] * b
        before = _digest(x, w)
        out = mmrprune.select(x, w, lengths=torch.tensor(lengths), **kw)
    else:
        lengths = rng.integers(0, n + 1, size=b).tolist()
        if sum(lengths) == 0:
            lengths[0] = 1
        x, w = _features(rng, (sum(lengths), d), dtype), _importance(rng, (sum(lengths),), dtype)
        cu = torch.tensor([0] + np.cumsum(lengths).tolist())
        before = _digest(x, w)
        flat, cu_k = mmrprune.select_varlen(x, w, cu, **kw)
        ks = (cu_k[1:] - cu_k[:-1]).tolist()
        assert flat.shape == (sum(ks),)
        for i, (k, s, n_b) in enumerate(zip(ks, cu[:-1].tolist(), lengths)):
            seg = flat[int(cu_k[i]):int(cu_k[i + 1])].tolist()
            assert len(set(seg)) == k and all(s <= p < s + n_b for p in seg), (seg, s, n_b)
        assert _digest(x, w) == before, "inputs were modified"
        return f"{method}/{layout}"
    ks = [R.budget(L, budget.get("k"), budget.get("keep_ratio")) for L in lengths]
    _check_rows(out, ks, out.shape[1], lengths)
    assert out.shape[1] >= max(ks)
    assert _digest(x, w) == before, "inputs were modified"
    return f"{method}/{layout}"


def run(seed: int, cases: int) -> dict:
    """Run ``cases`` seeded cases; return counts of what was exercised."""
    rng = np.random.default_rng(seed)
    counts: dict = {}
    for _ in range(cases):
        try:
            tag = one_case(rng)
        except (ValueError, TypeError) as exc:  # a clean rejection must name what is wrong
            msg = str(exc)
            assert ":" in msg and len(msg) < 2000, msg
            tag = "rejected"
        counts[tag] = counts.get(tag, 0) + 1
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--cases", type=int, default=400)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    counts = run(args.seed, args.cases)
    print(f"hostile_fuzz: {args.cases} cases, seed {args.seed}: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
