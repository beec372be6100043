"""Qwen3-VL beyond the family suite: the strong check covers DeepStack (it fails when a level
keeps other rows than the main features, or none reach the language model), DeepStack
reaches the pruned language model once and only for the kept rows, unpruned videos keep
their DeepStack rows, and the frames of a video are found from its tokens.

Tiny random-weight models from tests/hf_families.py (no downloads).
"""
import dataclasses

import pytest
import torch

pytest.importorskip("transformers")

from mmrprune.integrations import prune_visual_tokens  # noqa: E402
from mmrprune.integrations.hf import qwen3_vl  # noqa: E402

from hf_check import check_pruned_prefill, language_model, recording  # noqa: E402
from hf_families import (QWEN_IMAGE, QWEN_VIDEO, QWEN3_VL, QWEN3_VL_FRAME, QWEN3_VL_VIDEO,  # noqa: E402
                         one_thread)  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def model():
    return QWEN3_VL.build()       # the video specs build the same model


def _wrong_row_of_level(level):
    """A ``keep_rows`` that gives DeepStack level ``level`` one dropped row in place of a kept one."""
    real = qwen3_vl.keep_rows

    def keep_rows(idx, *levels):
        out = list(real(idx, *levels))
        dropped = [i for i in range(levels[level].shape[0]) if i not in set(idx.tolist())]
        wrong = idx.clone()
        wrong[len(wrong) // 2] = dropped[0]
        out[level] = real(wrong, levels[level])[0]
        return tuple(out)
    return keep_rows


@pytest.mark.parametrize("spec", [QWEN3_VL, QWEN3_VL_FRAME], ids=lambda s: s.name)
@pytest.mark.parametrize("level", [0, 1])
def test_strong_check_fails_on_a_wrong_deepstack_row(model, spec, level, monkeypatch):
    batch = spec.batch(model, seed=6)
    check_pruned_prefill(model, batch, spec, keep_ratio=0.5)                 # untampered: passes
    monkeypatch.setattr(qwen3_vl, "keep_rows", _wrong_row_of_level(level))
    with pytest.raises(AssertionError):
        check_pruned_prefill(model, batch, spec, keep_ratio=0.5)


def test_strong_check_fails_without_deepstack(model, monkeypatch):
    batch = QWEN3_VL.batch(model, seed=6)
    monkeypatch.setattr(qwen3_vl, "_deepstack_once", lambda *args, **kwargs: None)
    with pytest.raises(AssertionError):
        check_pruned_prefill(model, batch, QWEN3_VL, keep_ratio=0.5)


def test_deepstack_reaches_the_language_model_once_with_the_kept_rows(model):
    spec = QWEN3_VL_VIDEO
    batch = spec.batch(model, seed=8)
    lm = language_model(model)
    with torch.no_grad(), recording(lm) as (calls, _):
        model(**batch)
    full = calls[0][1]
    got = check_pruned_prefill(model, batch, spec, k=3)
    with torch.no_grad(), prune_visual_tokens(model, **spec.enable(dict(k=3))), recording(lm) as (calls, _):
        model(**batch)
        model(**dict(batch, pixel_values=None, pixel_values_videos=None))  # no visual inputs: no DeepStack
    pruned, plain = calls[0][1], calls[1][1]
    visual = full["visual_pos_masks"]
    kept = got.keep[visual]                                              # kept rows of the visual slots
    assert int(pruned["visual_pos_masks"].sum()) == int(kept.sum()) < int(visual.sum())
    assert len(pruned["deepstack_visual_embeds"]) == len(full["deepstack_visual_embeds"]) == 2
    for mine, theirs in zip(pruned["deepstack_visual_embeds"], full["deepstack_visual_embeds"]):
        assert torch.equal(mine, theirs[kept])
    assert plain.get("deepstack_visual_embeds") is None and plain.get("visual_pos_masks") is None
    assert not lm._forward_pre_hooks                                     # the one-shot hook is gone


def test_unpruned_videos_keep_their_deepstack_rows(model):
    """Without a video budget the videos stay whole (and keep their DeepStack rows) while the
    image is pruned; a prompt with videos only then passes through unpruned."""
    images_only = dataclasses.replace(QWEN3_VL_VIDEO, name="qwen3_vl-unpruned-video", enable=dict,
                                      prunable=lambda b: b["input_ids"] == QWEN_IMAGE,
                                      image_tokens=lambda b: (b["image_grid_thw"].prod(-1) // 4).tolist())
    batch = images_only.batch(model, seed=9)
    got = check_pruned_prefill(model, batch, images_only, keep_ratio=0.25)
    assert bool(got.keep[batch["input_ids"] == QWEN_VIDEO].all())
    assert got.pruner.last["visual_before"] == int((batch["input_ids"] == QWEN_IMAGE).sum())
    videos = _without_images(batch)
    with torch.no_grad():
        ref = model(**videos).logits
        with prune_visual_tokens(model, keep_ratio=0.25) as p:
            out = model(**videos).logits
    assert p.last is None and torch.equal(out, ref)


def test_frames_are_runs_of_video_tokens():
    slots = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 0, 1],
                          [1, 1, 1, 0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert qwen3_vl.video_unit_counts(slots, [4, 1, 6], "frame") == [2, 2, 1, 3, 3]
    assert qwen3_vl.video_unit_counts(slots, [4, 1, 6], "video") == [4, 1, 6]
    with pytest.raises(ValueError, match="whole frames"):
        qwen3_vl.video_unit_counts(slots, [3, 2, 6], "frame")


def test_m_rope_needs_mm_token_type_ids_where_the_model_does(model):
    batch = QWEN3_VL.batch(model, seed=11)
    if "mm_token_type_ids" not in batch:
        pytest.skip("this transformers release finds the vision tokens in input_ids itself")
    del batch["mm_token_type_ids"]
    with torch.no_grad(), prune_visual_tokens(model, keep_ratio=0.5), \
            pytest.raises(ValueError, match="mm_token_type_ids"):
        model(**batch)


@pytest.mark.parametrize("importance", ["text", "tensor"])
def test_importance_scores_image_and_video_tokens_in_unit_order(model, importance):
    spec = QWEN3_VL_FRAME
    batch = spec.batch(model, seed=12)
    n = int(spec.prunable(batch).sum())
    w = torch.linspace(1.0, 2.0, n) if importance == "tensor" else importance
    got = check_pruned_prefill(model, batch, spec, k=2, method="topk", importance=w)
    if importance == "tensor":     # top-2 of increasing scores: the last two tokens of every unit
        cu = torch.tensor([0] + spec.image_tokens(batch)).cumsum(0)
        want = torch.stack([cu[1:] - 2, cu[1:] - 1], 1).flatten()
        assert torch.equal(got.pruner.last["kept_indices"], want)


def test_videos_without_images(model):
    """A batch whose only media are videos with a budget: every unit is a video unit."""
    videos_only = dataclasses.replace(
        QWEN3_VL_VIDEO, name="qwen3_vl-videos-only",
        batch=lambda m, seed=0, padding="left": _without_images(QWEN3_VL_VIDEO.batch(m, seed, padding)),
        image_tokens=lambda b: [12, 12])
    batch = videos_only.batch(model, seed=13)
    got = check_pruned_prefill(model, batch, videos_only, keep_ratio=0.25)
    assert got.pruner.last["video_units"].tolist() == [True, True]
    assert got.pruner.last["cu_k"].tolist() == [0, 3, 6]


def _without_images(batch):
    out = {k: v for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    out["input_ids"] = batch["input_ids"].masked_fill(batch["input_ids"] == QWEN_IMAGE, 9)
    if "mm_token_type_ids" in out:
        out["mm_token_type_ids"] = 2 * (out["input_ids"] == QWEN_VIDEO).int()
    return out


def test_a_stale_deepstack_hook_leaves_other_calls_alone(model):
    """A pruned call that failed before its language model ran leaves a hook that must not
    touch the next call: it removes itself there and changes nothing."""
    batch = QWEN3_VL.batch(model, seed=14)
    with torch.no_grad():
        ref = model(**batch).logits
        qwen3_vl._deepstack_once(model, torch.zeros(2, 5, 32), torch.ones(2, 5, dtype=torch.bool),
                                 [torch.ones(10, 32)] * 2)
        out = model(**batch).logits
    assert torch.equal(out, ref) and not language_model(model)._forward_pre_hooks


def test_frames_must_match_the_video_grid(model):
    """Frames without their own separators (two frames' tokens in one run) are refused when
    the grid says otherwise, instead of being pruned as one frame."""
    batch = QWEN3_VL_FRAME.batch(model, seed=15)
    ids = batch["input_ids"].clone()
    row1 = (ids[1] == QWEN_VIDEO).nonzero()[:, 0]
    ids[1, row1[3] + 1:row1[4]] = QWEN_VIDEO            # joins frames 0 and 1 of row 1's video ...
    ids[1, row1[4]:row1[4] + (row1[4] - row1[3] - 1)] = 9  # ... keeping the token count
    batch = dict(batch, input_ids=ids)
    if "mm_token_type_ids" in batch:
        batch["mm_token_type_ids"] = (ids == QWEN_IMAGE).int() + 2 * (ids == QWEN_VIDEO).int()
    with torch.no_grad(), prune_visual_tokens(model, **QWEN3_VL_FRAME.enable(dict(k=2))), \
            pytest.raises(ValueError, match="video_grid_thw gives"):
        model(**batch)


@pytest.mark.parametrize("release", ["5.3.0", "5.3.2"])
def test_video_budgets_are_refused_where_the_model_cannot_run_videos(model, monkeypatch, release):
    import transformers
    monkeypatch.setattr(transformers, "__version__", release)
    with pytest.raises(RuntimeError, match=f"qwen3_vl videos are not pruned on transformers {release}, whose "
                                           r"model cannot run them \(video budgets need transformers!=5.3.\*\)"):
        prune_visual_tokens(model, k=2, video_k=4).__enter__()
    assert getattr(model, "_mmrprune_pruner", None) is None
    with prune_visual_tokens(model, k=2):             # images still are
        pass
