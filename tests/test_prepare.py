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
    with np.errstate(over="ignore"):   # k / 5e-324 is inf on purpose: it must clamp to N
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


# ----------------------------------------------------------------------------- the prepare kernel
def _kernel_prepared(x, w, method, lam, k, **layout):
    """The cuda backend's call for ``x`` after the prepare kernel (on the CPU emulator), and its batch."""
    emu = pytest.importorskip("mmrprune.backends.cuda_emu_backend")
    if emu.KERNELS.ext is None:
        pytest.skip(f"cuda_emu not built: {emu.KERNELS.import_error}")
    from mmrprune.backends import cuda_backend as cb
    batch = validate(x, w, k=k, keep_ratio=None, lam=lam, method=method, **layout).batch
    return emu.KERNELS.complete(cb.prepare(batch, sim="gram")), batch


def _pool_inputs(seed, ties, n=37):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, n, 8, generator=g, dtype=torch.bfloat16)
    w = torch.rand(4, n, generator=g)
    if ties:   # few distinct values: the order among equal Imp decides the pool
        w = (w * 3).floor()
    return x, w


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("lam", [0.0, 5e-324, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("k", [4, 25])
def test_prepare_kernel_pool_is_the_torch_pool(k, lam, ties, packed):
    """The hybrid pool the prepare kernel writes: exactly hybrid_pool_rows (size, ties to the
    lower index), for padded and packed rows, empty and short images, k past N."""
    x, w = _pool_inputs(1, ties)
    lengths = [37, 5, 0, 20]
    if packed:
        flat = torch.cat([x[b, :n] for b, n in enumerate(lengths)])
        wf = torch.cat([w[b, :n] for b, n in enumerate(lengths)])
        cu = np.cumsum([0] + lengths).tolist()
        call, batch = _kernel_prepared(flat, wf, "hybrid", lam, k, cu_seqlens=cu)
    else:
        call, batch = _kernel_prepared(x, w, "hybrid", lam, k, lengths=lengths)
    want = P.hybrid_pool_rows(batch)
    seg, _, valid = batch.row_layout()
    assert call.eligible.dtype == torch.uint8
    assert call.eligible.bool()[valid].tolist() == want[valid].tolist()
    assert torch.equal(call.score[valid], batch.importance().reshape(-1)[valid])


def test_prepare_kernel_pool_without_weights_is_the_first_tokens():
    x, _ = _pool_inputs(2, False)
    call, batch = _kernel_prepared(x, None, "hybrid", 0.5, 3)
    assert torch.equal(call.eligible.bool(), P.hybrid_pool_rows(batch))
    assert call.eligible.reshape(4, 37).sum(dim=1).tolist() == [6] * 4


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("n", [37, 1100])
def test_prepare_kernel_divprune_first_score_from_the_gram(packed, n):
    """DivPrune's first score the prepare kernel writes: 1 - max_{j != i} (G_ij / |x_j|) / |x_i|
    over each image's tokens, with the norms of the Gram's diagonal, in torch's fp32 operation
    order (+inf for a lone token).  n = 1100: rows over several blocks of the second grid
    dimension, columns over two tiles."""
    x, w = _pool_inputs(3, False, n)
    lengths = [n, 1, 0, 20]
    if packed:
        flat = torch.cat([x[b, :n] for b, n in enumerate(lengths)])
        call, batch = _kernel_prepared(flat, None, "divprune", 0.5, 3,
                                       cu_seqlens=np.cumsum([0] + lengths).tolist())
    else:
        call, batch = _kernel_prepared(x, None, "divprune", 0.5, 3, lengths=lengths)
    assert torch.equal(call.score, torch.zeros_like(call.score))
    gram, n = call.gram, call.gram.shape[1]
    assert n == lengths[0]
    # [B, n]; sqrt and division in float64, each cast back to fp32: exactly rounded fp32 results
    # (torch's vectorised fp32 sqrt on CPU may be off by one in the last bit)
    nrm = gram.diagonal(dim1=1, dim2=2).clamp_min(0).double().sqrt().float().clamp_min(R.NORM_EPS)
    inv = (1.0 / nrm.double()).float()
    idx, valid = batch.padded_index(n)
    g = gram * inv[:, None, :]
    g.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
    g.masked_fill_(~valid[:, None, :], float("-inf"))
    want = 1.0 - g.amax(dim=2) * inv
    got = call.first_score[idx]
    assert torch.equal(got[valid], want[valid])
    assert got[1, 0].item() == float("inf")      # a lone token
    # the norms the greedy kernel then reads are the diagonal's too
    assert torch.equal(call.inv_norm[idx][valid], inv[valid])


def _topk_both(x, w, k, check_finite=True, **layout):
    """topk on cuda_emu (the prepare kernel's ranking) and on the torch backend, selection order."""
    emu = pytest.importorskip("mmrprune.backends.cuda_emu_backend")
    if emu.KERNELS.ext is None:
        pytest.skip(f"cuda_emu not built: {emu.KERNELS.import_error}")
    import mmrprune
    kw = dict(method="topk", order="selection", check_finite=check_finite, **layout)
    if isinstance(k, float):
        kw["keep_ratio"] = k
    else:
        kw["k"] = k
    return mmrprune.select(x, w, backend="cuda_emu", **kw), mmrprune.select(x, w, backend="torch", **kw)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("k", [4, 25, 37, 60, 0.3])
def test_prepare_kernel_topk_is_the_torch_backends_topk(k, ties, packed):
    """topk on the kernel path: exactly the torch backend's picks (descending Imp, ties to the
    lower index, -1 past each image's budget), padded and packed, empty and short images, budgets
    that differ per image (keep_ratio 0.3), k >= N; with ties, also the float64 reference's."""
    x, w = _pool_inputs(4, ties)
    lengths = [37, 5, 0, 20]
    if packed:
        flat = torch.cat([x[b, :n] for b, n in enumerate(lengths)])
        wf = torch.cat([w[b, :n] for b, n in enumerate(lengths)])
        cu = torch.tensor(np.cumsum([0] + lengths).tolist())
        import mmrprune
        kw = dict(method="topk", order="selection", **({"keep_ratio": k} if isinstance(k, float) else {"k": k}))
        got, cu_got = mmrprune.select_varlen(flat, wf, cu, backend="cuda_emu", **kw)
        want, cu_want = mmrprune.select_varlen(flat, wf, cu, backend="torch", **kw)
        assert torch.equal(cu_got, cu_want) and torch.equal(got, want), (got.tolist(), want.tolist())
        got = [got[cu_got[b]:cu_got[b + 1]] - cu[b] for b in range(len(lengths))]
    else:
        got, want = _topk_both(x, w, k, lengths=lengths)
        assert torch.equal(got, want), (got.tolist(), want.tolist())
        for b, row in enumerate(got):
            kb = int((row >= 0).sum())
            assert (row[kb:] == -1).all()
        got = [row[row >= 0] for row in got]
    kbs = [len(row) for row in got]
    if isinstance(k, int):
        assert kbs == [min(k, n) for n in lengths]
    else:   # budgets per image
        assert kbs[1] < kbs[3] < kbs[0] and kbs[2] == 0
    for b, n in enumerate(lengths):
        if ties and n:
            np.testing.assert_array_equal(got[b].numpy(), R.select_topk(x[b, :n].double().numpy(),
                                                                        w[b, :n].double().numpy(), kbs[b]))


def test_prepare_kernel_topk_equal_and_absent_importance_go_in_index_order():
    """Every token of equal importance, or no importance at all: the first k tokens, in order."""
    x, _ = _pool_inputs(5, False)
    for w in (None, torch.full((4, 37), 0.25)):
        got, want = _topk_both(x, w, 9)
        assert torch.equal(got, want) and got.tolist() == [list(range(9))] * 4


def test_prepare_kernel_topk_unchecked_nan_gives_distinct_in_range_picks():
    """check_finite=False with NaN importance: the contract's undefined but in-range, distinct
    picks (the torch backend's NaN span makes every Imp of the image NaN, the kernel's min/max
    skips NaN, so the two may differ); NaN tokens rank first in the kernel (prepare.h)."""
    x, w = _pool_inputs(6, True)
    w[0, [30, 3]] = float("nan")
    w[1] = float("nan")
    got, _ = _topk_both(x, w, 6, check_finite=False)
    for row in got.tolist():
        assert all(0 <= i < 37 for i in row) and len(set(row)) == 6, row
    assert got[0, :2].tolist() == [3, 30] and got[1].tolist() == list(range(6))


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16, torch.float64])
def test_prepare_kernel_topk_other_importance_dtypes(wdtype):
    """Importance of another dtype than fp32 (converted once, as the torch backend's compute
    dtype does): the same picks; coarse values so that 16-bit ties are many."""
    x, w = _pool_inputs(7, True)
    w = (w + torch.rand(w.shape, generator=torch.Generator().manual_seed(7)) * 1e-2).to(wdtype)
    got, want = _topk_both(x, w, 20)
    assert torch.equal(got, want), (got.tolist(), want.tolist())
