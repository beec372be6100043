"""The shared per-batch preparation (mmrprune/prepare.py) every backend consumes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mmrprune import prepare as P
from mmrprune import reference as R
from mmrprune.validation import validate


@pytest.mark.parametrize("lam", [1e-300, 5e-324, 1e-30, 0.3, 0.5, 1.0])
def test_hybrid_pool_size_matches_reference_even_for_tiny_lam(lam):
    lengths = torch.tensor([0, 1, 7, 100, 1000], dtype=torch.int64)
    ks = torch.tensor([0, 1, 3, 40, 999], dtype=torch.int64)
    got = P.hybrid_pool_size(lengths, ks, lam).tolist()
    # k / lam past 2**63 must clamp to N, not wrap to a negative int64
    want = [min(n, max(k, int(min(np.rint(np.float64(k) / lam), n)))) for n, k in zip(lengths.tolist(), ks.tolist())]
    assert got == want
    assert all(0 <= g <= n for g, n in zip(got, lengths.tolist()))


def test_hybrid_pool_size_lam_zero_is_every_token():
    lengths = torch.tensor([0, 5], dtype=torch.int64)
    assert P.hybrid_pool_size(lengths, torch.tensor([0, 2]), 0.0).tolist() == [0, 5]


def test_maxsim_plan_covers_the_greedy_methods():
    assert P.maxsim_plan("mmr", 0.3) == P.MaxSimPlan(0.3, False, False)
    assert P.maxsim_plan("topk", 0.3).lam == 1.0 and P.maxsim_plan("fps", 0.3).lam == 0.0
    assert P.maxsim_plan("hybrid", 0.3).pooled and P.maxsim_plan("divprune", 0.3).divprune
    with pytest.raises(ValueError, match="not a max-similarity method"):
        P.maxsim_plan("dpp", 0.5)


def test_padded_and_packed_layouts_agree():
    torch.manual_seed(0)
    x = torch.randn(3, 6, 4)
    lengths = [6, 2, 0]
    padded = validate(x, torch.rand(3, 6), k=2, keep_ratio=None, lam=0.5, method="hybrid", lengths=lengths).batch
    flat = torch.cat([x[b, :n] for b, n in enumerate(lengths)])
    packed = validate(flat, torch.cat([padded.weights[b, :n] for b, n in enumerate(lengths)]), k=2, keep_ratio=None,
                      lam=0.5, method="hybrid", cu_seqlens=[0, 6, 8, 8]).batch
    assert packed.max_length() == 6 and padded.max_length() == 6
    seg, local, valid = padded.row_layout()
    assert valid.reshape(3, 6).tolist() == padded.valid_mask().tolist()
    assert seg.tolist() == [b for b in range(3) for _ in range(6)]
    assert local.tolist() == list(range(6)) * 3
    pool_p = P.hybrid_pool_rows(padded).reshape(3, 6)
    pool_k = P.to_padded(packed, P.hybrid_pool_rows(packed), False)
    assert pool_k.tolist() == pool_p.tolist()
    first_p = P.divprune_first_rows(padded).reshape(3, 6)
    first_k = P.to_padded(packed, P.divprune_first_rows(packed), float("inf"))
    mask = padded.valid_mask()
    assert torch.equal(first_p[mask], first_k[mask])
    back = P.from_padded(packed, first_k, float("inf"))
    assert torch.equal(back, P.divprune_first_rows(packed))
