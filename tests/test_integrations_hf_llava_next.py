"""LLaVA-NeXT and LLaVA-OneVision beyond the family suite: the row-newline tokens (visual,
never pruned), the budget per image across its crops, and OneVision's videos (merged
unpruned).  Tiny random-weight models from tests/hf_families.py, whose anyres layouts are
worked out by hand there."""
import pytest
import torch

pytest.importorskip("transformers")

from mmrprune.integrations import prune_visual_tokens  # noqa: E402
from mmrprune.integrations.hf.llava_next import _newline_rows  # noqa: E402

from hf_check import check_cached_generate, check_pruned_prefill  # noqa: E402
from hf_families import (ANYRES_IMAGE, ANYRES_VIDEO, LLAVA_NEXT, LLAVA_ONEVISION, NEXT_LAYOUT,  # noqa: E402
                         ONEVISION_LAYOUT, anyres_pattern, one_thread)  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def onevision():
    return LLAVA_ONEVISION.build()


@pytest.mark.parametrize("spec, layouts", [(LLAVA_NEXT, NEXT_LAYOUT), (LLAVA_ONEVISION, ONEVISION_LAYOUT)],
                         ids=["llava_next", "llava_onevision"])
def test_newline_tokens_are_visual_and_never_pruned(spec, layouts):
    """The adapter marks exactly the hand-derived newline slots as visual and unprunable, and
    numbers one budget unit per image across its base tile and crops."""
    model = spec.build()
    batch = spec.batch(model, seed=8)
    pruner = prune_visual_tokens(model, k=1)
    with torch.no_grad(), pruner as p:
        visual = p.adapter.merge(batch, batch["input_ids"], p.adapter.embed(batch["input_ids"]))
        model(**batch)
    images = batch["input_ids"] == ANYRES_IMAGE
    prunable = spec.prunable(batch)
    assert torch.equal(visual.units >= 0, prunable) and torch.equal(visual.visual, images)
    counts = [sum(anyres_pattern(layout)) for layout in layouts]
    assert torch.bincount(visual.units[prunable]).tolist() == counts
    # k=1: one token per image (crops included), and every newline slot survives
    assert p.last["visual_before"] == sum(counts) and p.last["visual_after"] == len(layouts)
    newlines = images & ~prunable
    kept = torch.zeros_like(images)
    for b, cols in enumerate(p.last["kept_columns"]):
        kept[b, cols] = True
    assert bool(kept[newlines].all()) and int((kept & prunable).sum()) == len(layouts)


def test_a_layout_without_newline_tokens_is_refused():
    feats, newline = torch.randn(5, 4), torch.randn(4)
    assert _newline_rows(torch.cat([feats, newline[None]]), newline).tolist() == [False] * 5 + [True]
    with pytest.raises(ValueError, match="do not end with the model's image_newline"):
        _newline_rows(feats, newline)


def video_batch(model, seed=11):
    """OneVision's batch with a two-frame video after row 1's image (2 frames x 2x2 pooled tokens
    and one newline token: 9 placeholders)."""
    batch = LLAVA_ONEVISION.batch(model, seed=seed)
    g = torch.Generator().manual_seed(seed)
    rows = [r[a == 1].tolist() for r, a in zip(batch["input_ids"], batch["attention_mask"])]
    rows[1] = rows[1][:-1] + [ANYRES_VIDEO] * 9 + rows[1][-1:]
    width = max(map(len, rows))
    ids = torch.zeros(2, width, dtype=torch.long)
    am = torch.zeros_like(ids)
    for b, r in enumerate(rows):                      # left-padded
        ids[b, width - len(r):], am[b, width - len(r):] = torch.tensor(r), 1
    return dict(batch, input_ids=ids, attention_mask=am, pixel_values_videos=torch.randn(1, 2, 3, 16, 16, generator=g))


def test_onevision_videos_are_merged_unpruned(onevision):
    """Images are pruned, every video token (its newline included) stays, the prefill equals
    the masked unpruned forward, a full budget changes nothing and cached generate equals the
    uncached recompute."""
    batch = video_batch(onevision)
    ids = batch["input_ids"]
    got = check_pruned_prefill(onevision, batch, LLAVA_ONEVISION, k=2)
    assert bool(got.keep[ids == ANYRES_VIDEO].all())
    assert int(got.keep[LLAVA_ONEVISION.prunable(batch)].sum()) == 2 * 3
    with torch.no_grad():
        ref = onevision(**batch).logits
        with prune_visual_tokens(onevision, keep_ratio=1.0) as p:
            full = onevision(**batch).logits
    assert p.last["pruned_len"] == p.last["orig_len"]
    torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-5)
    check_cached_generate(onevision, batch, LLAVA_ONEVISION, steps=3, k=2)


def test_a_video_without_images_passes_through(onevision):
    batch = video_batch(onevision)
    ids = batch["input_ids"][1:].clone()
    ids[ids == ANYRES_IMAGE] = 3                      # row 1 without its image
    batch = dict(input_ids=ids, attention_mask=batch["attention_mask"][1:],
                 pixel_values_videos=batch["pixel_values_videos"])
    with torch.no_grad():
        ref = onevision(**batch).logits
        with prune_visual_tokens(onevision, k=2) as p:
            got = onevision(**batch).logits
    assert p.last is None and torch.equal(got, ref)
