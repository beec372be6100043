"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``): one budget unit per image and, with a video budget,
one per video or per frame; M-RoPE (t, h, w) positions from the model's ``get_rope_index``
on the unpruned prompt.  Without a video budget videos are merged unpruned."""
from __future__ import annotations

import inspect

import torch

from . import versions
from .family import Family, Visual, given, merge_unit_maps, scatter_features, units_from_counts


class MRopeFamily(Family):
    """What the Qwen VL families share: images and videos, M-RoPE (t, h, w) positions from the
    model's ``get_rope_index`` on the unpruned prompt, and patch grids read off them."""
    videos = True
    token_keys = ("mm_token_type_ids",)

    def carries_visual(self, kw):
        """Images, or videos with a video budget (unpruned videos alone go through untouched)."""
        return given(kw, "image") or (self.video_unit is not None and given(kw, "video"))

    def positions(self, kw, input_ids, attention_mask):
        pos = kw.get("position_ids")
        if pos is not None:
            # generate() passes [4, B, L]: the plain text numbering, then the (t, h, w) rows
            return pos[-3:] if pos.ndim == 3 else pos.expand(3, input_ids.shape[0], -1)
        return rope_index(self.model, input_ids, attention_mask, kw)

    def grids(self, counts, positions):
        """An image's merged tokens are its grid row by row, numbered (s, s + i, s + j): its grid
        is the extent of its h and w positions."""
        out = []
        for c, p in zip(counts, positions.split(counts, dim=1)):
            h, w = (int(p[r].max() - p[r].min()) + 1 for r in (1, 2))
            if h * w != c:
                raise ValueError(f"prune_visual_tokens: an image of {c} tokens has M-RoPE positions spanning a "
                                 f"{h} x {w} grid; method='d2pruner' with alpha < 1 needs each image's grid")
            out.append((h, w))
        return out


class Qwen2VL(MRopeFamily):
    name = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    multimodal_keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                       "second_per_grid_ts", "mm_encoder_outputs")

    def merge(self, kw, input_ids, embeds):
        cfg = self.model.config
        feats = _features(self.model.model, kw, "image") or []
        images = input_ids == cfg.image_token_id
        embeds = scatter_features(embeds, images, feats, "image")
        units = units_from_counts(images, [f.shape[0] for f in feats])
        video_feats = _features(self.model.model, kw, "video")
        if video_feats is None:
            return Visual(embeds=embeds, units=units, visual=images)
        videos = input_ids == cfg.video_token_id
        embeds = scatter_features(embeds, videos, video_feats, "video")
        if self.video_unit is None:
            return Visual(embeds=embeds, units=units, visual=images | videos)
        video_units = units_from_counts(videos, self._video_counts(kw, input_ids, videos, video_feats))
        units, source = merge_unit_maps(units, video_units)
        return Visual(embeds=embeds, units=units, visual=images | videos, video_units=source == 1)

    def _video_counts(self, kw, input_ids, videos, video_feats) -> list:
        """Tokens per budget unit of the videos (``videos`` [B, L] marks their slots): per
        video, or per temporal grid step -- a video's merged tokens are laid out frame after
        frame, each frame ``h * w / merge**2`` of them."""
        counts = [f.shape[0] for f in video_feats]
        if self.video_unit == "video":
            return counts
        grid = kw.get("video_grid_thw")
        if grid is not None:
            frames = grid[:, 0].tolist()
        else:
            frames = self._frames_from_positions(kw, input_ids, videos, counts)
        if len(frames) != len(counts):
            raise ValueError(f"prune_visual_tokens: video_grid_thw has {len(frames)} rows for {len(counts)} videos")
        per_frame = []
        for n, t in zip(counts, frames):
            if t < 1 or n % t:
                raise ValueError(f"prune_visual_tokens: a video of {n} tokens does not split into the {t} frames "
                                 "of its video_grid_thw row")
            per_frame += [n // t] * t
        return per_frame

    def _frames_from_positions(self, kw, input_ids, videos, counts) -> list:
        """Frames per video when the call brings no ``video_grid_thw`` (``generate`` in 5.19
        and later hands the encoder outputs over without it): every frame's (h, w) positions
        start again from the video's first token's, so its frames are counted there."""
        if kw.get("position_ids") is None:
            raise ValueError("prune_visual_tokens: video_unit='frame' needs video_grid_thw (or position_ids) to find "
                             "each video's frames")
        hw = self.positions(kw, input_ids, kw.get("attention_mask"))[1:, videos].T   # [T_video, 2], row-major
        return [int((part == part[0]).all(dim=1).sum()) for part in hw.split(counts)]


# ----------------------------------------------------------------------------- version-dependent calls
def encoder_output(inner, kw, modality: str):
    """What the Qwen vision tower returns for the images (or videos) of the call: ``generate``'s
    precomputed output (5.19 and later), else ``get_image_features`` / ``get_video_features``
    run here; None without that input."""
    if modality == "image":
        return versions.encoder_call(kw, modality, lambda **out: inner.get_image_features(
            kw["pixel_values"], kw.get("image_grid_thw"), **out))
    return versions.encoder_call(kw, modality, lambda **out: inner.get_video_features(
        kw["pixel_values_videos"], kw.get("video_grid_thw"), **out))


def _features(inner, kw, modality: str):
    """Per image (or video), its [n_i, H] merged features, or None without that input."""
    out = encoder_output(inner, kw, modality)
    return None if out is None else versions.per_item(out)


def rope_index(model, input_ids, attention_mask, kw) -> torch.Tensor:
    """[3, B, L] M-RoPE positions of the unpruned prompt, for Qwen2-VL, Qwen2.5-VL and
    Qwen3-VL (interleaved by the rotary embedding, not here).  ``get_rope_index`` takes the
    processor's ``mm_token_type_ids`` (text 0, image 1, video 2) from 5.3 on (Qwen3-VL: in
    5.17-5.25 of the tested releases) and finds the vision tokens in ``input_ids`` itself in
    4.57-5.2; only Qwen2.5-VL's takes ``second_per_grid_ts`` (one per video; in 5.3-5.4 one per
    image and video, and it spaces images in time too)."""
    inner = model.model
    params = inspect.signature(inner.get_rope_index).parameters
    args = dict(image_grid_thw=kw.get("image_grid_thw"), video_grid_thw=kw.get("video_grid_thw"),
                attention_mask=attention_mask)
    if "mm_token_type_ids" in params:
        if kw.get("mm_token_type_ids") is None:
            # the model itself would then silently fall back to 1-D positions
            raise ValueError(f"prune_visual_tokens: {type(model).__name__} needs mm_token_type_ids (returned by the "
                             "processor) or explicit position_ids to compute its M-RoPE positions")
        args["mm_token_type_ids"] = kw["mm_token_type_ids"]
    if "second_per_grid_ts" in params:
        args["second_per_grid_ts"] = kw.get("second_per_grid_ts")
    try:
        positions, _ = inner.get_rope_index(input_ids, **args)
    except StopIteration:
        # the model's own forward fails the same way; a StopIteration would read as a silent end
        raise ValueError("prune_visual_tokens: get_rope_index ran out of image_grid_thw / video_grid_thw / "
                         "second_per_grid_ts rows for the images and videos of input_ids (transformers 5.3-5.4's "
                         "Qwen2.5-VL takes one second_per_grid_ts per image as well as per video; leave it out "
                         "there, or use another release)") from None
    return positions
