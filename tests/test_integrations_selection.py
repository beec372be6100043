"""The framework-neutral helpers of the integrations: selection over packed items
(mmrprune.integrations.selection) and Qwen M-RoPE layouts (mmrprune.integrations.mrope)."""
import warnings

import numpy as np
import pytest
import torch

import mmrprune
from mmrprune.integrations import mrope
from mmrprune.integrations.selection import Budget, Selector, keep_rows, local_indices, offsets, select_items


def _packed(lengths, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(lengths), d, generator=g)


def test_select_items_is_one_select_varlen_call():
    lengths = [12, 5, 30]
    x = _packed(lengths)
    idx, cu_k = select_items(x, lengths, Budget(k=6), Selector(method="mmr", lam=0.3))
    want, want_cu = mmrprune.select_varlen(x, mmrprune.importance.token_norm(x), offsets(lengths), k=6, lam=0.3)
    assert torch.equal(idx, want) and torch.equal(cu_k, want_cu)
    assert local_indices(idx, lengths, cu_k) == [
        (want[want_cu[b]:want_cu[b + 1]] - offsets(lengths)[b]).tolist() for b in range(3)]


def test_no_budget_keeps_every_token():
    lengths = [4, 7]
    idx, cu_k = select_items(_packed(lengths), lengths, Budget(), Selector())
    assert idx.tolist() == list(range(11)) and cu_k.tolist() == [0, 4, 11]
    assert Budget().tokens_kept(7) == 7 and not Budget().prunes


def test_default_lam_never_warns():
    lengths = [9, 9]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in ("dpp", "divprune", "fps", "topk"):
            select_items(_packed(lengths), lengths, Budget(k=3), Selector(method=method))


def test_d2pruner_uses_each_items_grid():
    lengths, grids = [12, 6, 12], [(3, 4), (2, 3), (4, 3)]
    x = _packed(lengths, seed=1)
    selector = Selector(method="d2pruner", params={"alpha": 0.5, "tau": 0.4, "pivot_ratio": 0.5, "radius": 1})
    assert selector.needs_grid
    idx, cu_k = select_items(x, lengths, Budget(k=4), selector, grids=grids)
    cu = offsets(lengths)
    for b, grid in enumerate(grids):        # one call per item with its own grid gives the same picks
        item = x[cu[b]:cu[b + 1]]
        want = mmrprune.select(item, mmrprune.importance.token_norm(item), k=4, method="d2pruner", grid=grid,
                               alpha=0.5, tau=0.4, pivot_ratio=0.5, radius=1)
        assert (idx[cu_k[b]:cu_k[b + 1]] - cu[b]).tolist() == want.tolist()
    with pytest.raises(ValueError, match="needs one \\(h, w\\) grid per item"):
        select_items(x, lengths, Budget(k=4), selector)


def test_keep_rows_keeps_the_same_rows_of_every_tensor():
    main, level = torch.arange(20.0).reshape(10, 2), torch.arange(30.0).reshape(10, 3)
    idx = torch.tensor([1, 4, 9])
    kept_main, kept_level = keep_rows(idx, main, level)
    assert kept_main.tolist() == main[[1, 4, 9]].tolist() and kept_level.tolist() == level[[1, 4, 9]].tolist()


def test_grid_positions_and_layout():
    g = mrope.grid_positions(2, 2, 3, t_scale=2.5)
    assert g.tolist() == [[0] * 6 + [2] * 6, [0, 0, 0, 1, 1, 1] * 2, [0, 1, 2] * 4]
    pos = mrope.layout([2, mrope.grid_positions(1, 2, 3), 1, mrope.grid_positions(2, 1, 1, t_scale=4.0), 2])
    assert pos.tolist() == [[0, 1, 2, 2, 2, 2, 2, 2, 5, 6, 10, 11, 12],
                            [0, 1, 2, 2, 2, 3, 3, 3, 5, 6, 6, 11, 12],
                            [0, 1, 2, 3, 4, 2, 3, 4, 5, 6, 6, 11, 12]]
    assert mrope.extent(mrope.grid_positions(1, 5, 3)) == 5 and mrope.extent(np.zeros((3, 0))) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_positions_survive_the_embedding_dtype(dtype):
    p = torch.tensor([[0, 255, 256, 70000, 2 ** 24 - 1], [1, 2, 3, 4, 5], [300, 1000, 65535, 65536, 9]])
    cols = mrope.encode(p, dtype)
    assert cols.dtype == dtype and cols.shape == (5, mrope.POSITION_COLUMNS)
    assert torch.equal(mrope.decode(cols), p)
    if dtype == torch.bfloat16:   # why the digits: a plain cast loses positions above 256
        assert not torch.equal(p.to(dtype).to(torch.int64), p)
    with pytest.raises(ValueError, match="M-RoPE positions must lie in"):
        mrope.encode(torch.tensor([[2 ** 24], [0], [0]]), dtype)


# ----------------------------------------------------------------------------- the validated spec
from mmrprune.integrations.selection import Spec, spec  # noqa: E402


def test_spec_holds_both_budgets_and_the_selector():
    s = spec(k=4, video_keep_ratio=0.5, method="d2pruner", alpha=1.0)
    assert s.images == Budget(k=4) and s.videos == Budget(keep_ratio=0.5)
    assert s.budget(False) is s.images and s.budget(True) is s.videos
    assert s.selector.method == "d2pruner" and s.selector.params["alpha"] == 1.0 and "grid" not in s.selector.params
    assert isinstance(s, Spec)


def test_a_video_budget_alone_prunes_only_videos():
    s = spec(video_keep_ratio=0.5)
    assert not s.images.prunes and s.videos.prunes
    lengths = [6, 8]
    idx, cu_k = select_items(_packed(lengths), lengths, [s.images, s.videos], s.selector)
    assert cu_k.tolist() == [0, 6, 10] and idx[:6].tolist() == list(range(6))


@pytest.mark.parametrize("kwargs, error, text", [
    (dict(), ValueError, "nothing to prune: give k or keep_ratio (tokens kept per image) and/or video_k"),
    (dict(k=2, keep_ratio=0.5), ValueError, "exactly one of k or keep_ratio"),
    (dict(video_k=2, video_keep_ratio=0.5), ValueError, "at most one of video_k or video_keep_ratio"),
    (dict(video_k=0), ValueError, "video_k: expected an int >= 1, got 0"),
    (dict(k=2, method="d2pruner", grid=(2, 2)), TypeError, "grid: d2pruner's grid is each image's own patch grid"),
    (dict(k=2, video_k=2, method="d2pruner", alpha=0.5), ValueError, "needs alpha=1.0"),
    (dict(k=2, importance="cls"), ValueError, "importance must be one of ['norm', 'none'], got 'cls'"),
    (dict(k=2, method="topk", importance="none"), ValueError, "method=topk ranks tokens by importance"),
    (dict(k=2, backend="gpu"), ValueError, "backend must be 'auto' or one of"),
    (dict(k=2, backend="gpu", device="cpu"), ValueError, "backend: expected 'auto' or one of"),
], ids=lambda v: str(v)[:40] if isinstance(v, dict) else "")
def test_spec_refuses_with_a_message_naming_the_setting(kwargs, error, text):
    with pytest.raises(error) as got:
        spec(**kwargs)
    assert text in str(got.value)


def test_a_stray_lam_warns_once_at_the_callers_line_and_is_dropped():
    with pytest.warns(UserWarning, match="lam=0.3 is ignored by method='dpp'") as record:
        s = spec(k=2, method="dpp", lam=0.3, stacklevel=1)
    assert s.selector.lam is None and len(record) == 1 and record[0].filename == __file__
    lengths = [9, 9]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        select_items(_packed(lengths), lengths, s.images, s.selector)
