"""Exact multi-commit rounds in the fused CUDA maxsim kernel, run on CPU by ``cuda_emu``.

Picks with rounds (``max_round=None``: the kernel's ``MAX_ROUND``) must equal one
pick per step (``max_round=1``) on every fuzz problem, in row mode and Gram mode;
on real tokens the kernel's round count must equal :func:`mmrprune.reference.select_rounds`.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mmrprune
from mmrprune import reference as R
from mmrprune.backends import cuda_backend as cb
from mmrprune.backends import cuda_emu_backend as emu
from mmrprune.data import load_dinov2
from test_fuzz import CASES, _problem

pytestmark = pytest.mark.skipif(not emu.status()[0], reason=f"backend cuda_emu unavailable: {emu.status()[1]}")
MODES = {"row": "rows", "gram": "gram"}


def _select(mode, max_round, x, w, **kw):
    return mmrprune.select(x, w, backend="cuda_emu", order="selection", return_stats=True, sim=MODES[mode],
                           max_round=max_round, **kw)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("seed", range(CASES))
def test_rounds_pick_what_one_pick_per_step_picks(seed, mode):
    x, w, lengths, method, lam, k = _problem(seed)
    if method not in cb.GREEDY_METHODS:   # d2pruner: no CUDA kernel; topk: a ranking, no rounds
        method = "mmr"
    xt, wt = torch.from_numpy(x).float(), None if w is None else torch.from_numpy(w).float()
    kw = dict(k=k, method=method, lam=lam, lengths=torch.from_numpy(lengths))
    one, one_stats = _select(mode, 1, xt, wt, **kw)
    rnd, rnd_stats = _select(mode, None, xt, wt, **kw)
    assert torch.equal(one, rnd), (method, lam, one.tolist(), rnd.tolist())
    ks = torch.from_numpy(np.minimum(lengths, k))
    assert torch.equal(one_stats["rounds"], ks)
    assert (rnd_stats["rounds"] <= ks).all() and (rnd_stats["rounds"] >= (ks > 0).long()).all()
    if method == "dpp":
        assert torch.equal(rnd_stats["rounds"], ks)


@pytest.fixture(scope="module")
def tokens():
    d = load_dinov2()
    return d["tokens"][:2, :192], d["cls_attention"][:2, :192]


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("method", ["mmr", "fps", "divprune", "hybrid"])
def test_round_count_equals_reference_on_real_tokens(tokens, mode, method):
    x, w = tokens
    k = 48
    got, stats = _select(mode, None, torch.from_numpy(x), torch.from_numpy(w), k=k, method=method,
                         lam=0.5)
    limit = int(emu.KERNELS.ext.MAX_ROUND)
    for b in range(x.shape[0]):
        want, rounds = R.select_rounds(x[b].astype(np.float64), w[b].astype(np.float64), k, method, 0.5, limit)
        assert got[b].tolist() == want.tolist(), (method, b)
        assert int(stats["rounds"][b]) == rounds, (method, b, int(stats["rounds"][b]), rounds)
    # rounds do commit several picks here: otherwise this test could not tell rounds from steps
    assert int(stats["rounds"].sum()) < k * x.shape[0]


def test_round_setting_is_checked():
    x = torch.randn(1, 12, 8)
    for bad in (0, 9, 2.0, True, "4"):
        with pytest.raises(ValueError, match=r"max_round: expected None \(the kernel's default, 8\) or an int in "
                                             r"\[1, 8\]"):
            mmrprune.select(x, k=3, backend="cuda_emu", max_round=bad)
    # the kernels' own limit is the one the argument is checked against
    assert int(emu.KERNELS.ext.MAX_ROUND) == mmrprune.backends.MAX_ROUND
