"""Randomised cross-check of every CPU-capable backend against the contract.

Hundreds of small seeded problems built to be hostile: features drawn from a
handful of small integer vectors (exact duplicates, exact ties, zero vectors,
antipodes), importance on three levels (ties), random padding lengths (0
included), every method, lam in {0, 0.25, 0.5, 1}, k from 1 to beyond N.
Each backend's picks must pass the step certificate (float64 input: tol 1e-9;
float32: 1e-4) and, for ties between exact duplicates, go to the lowest index.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import certify as C
import mmrprune
from mmrprune import dispatch
from mmrprune import reference as R

CASES = 120


def _backends(method):
    names = []
    for name in dispatch.BACKENDS:
        backend, _ = dispatch.load(name)
        if backend is None or name == "numpy" or not dispatch.status(name)[0]:
            continue
        if "cpu" in backend.device_types and method in backend.methods:
            names.append(name)
    return names


def _problem(seed):
    rng = np.random.default_rng(seed)
    b, n, d = int(rng.integers(1, 4)), int(rng.integers(1, 25)), int(rng.integers(1, 6))
    palette = rng.integers(-2, 3, size=(int(rng.integers(2, 7)), d)).astype(np.float64)
    x = palette[rng.integers(0, len(palette), size=(b, n))]
    w = rng.integers(0, 3, size=(b, n)).astype(np.float64) if rng.random() < 0.8 else None
    lengths = rng.integers(0, n + 1, size=b)
    lengths[rng.integers(0, b)] = n                      # at least one full image
    method = R.METHODS[int(rng.integers(0, len(R.METHODS)))]
    lam = float(rng.choice([0.0, 0.25, 0.5, 1.0]))
    k = int(rng.integers(1, n + 3))
    return x, w, lengths, method, lam, k


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("seed", range(CASES))
def test_random_hostile_problem(seed, dtype):
    x, w, lengths, method, lam, k = _problem(seed)
    params = {"alpha": 1.0} if method == "d2pruner" else {}
    for name in _backends(method):
        out = mmrprune.select(torch.from_numpy(x).to(dtype), None if w is None else torch.from_numpy(w).to(dtype), k=k,
                              lam=lam, method=method, lengths=torch.from_numpy(lengths), order="selection",
                              backend=name, **params)
        for b in range(x.shape[0]):
            n_b = int(lengths[b])
            picks = out[b].numpy()
            assert (picks[min(k, n_b):] == -1).all(), (name, method, b, picks)
            C.check_certificate(x[b, :n_b], None if w is None else w[b, :n_b], picks, method=method,
                                lam=lam, tol=1e-9 if dtype == torch.float64 else 1e-4, k=min(k, n_b), **params)
            # exact duplicates (same token vector, same importance) that are both eligible
            # and scored identically must be taken lowest index first
            kept = [int(i) for i in picks if i >= 0]
            for t, j in enumerate(kept):
                twins = [i for i in range(j) if i not in kept[:t] and np.array_equal(x[b, i], x[b, j])
                         and (w is None or w[b, i] == w[b, j])]
                if method in ("mmr", "fps", "topk", "divprune", "dpp") and twins:
                    raise AssertionError(f"{name} {method}: step {t} took {j} before its lower twin {twins[0]}")
