"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``): one budget unit per image, M-RoPE (t, h, w)
positions from the model's ``get_rope_index``.  Videos are merged unpruned."""
from __future__ import annotations

import inspect

import torch

from . import versions
from .family import Family, Visual, scatter_features, units_from_counts


class Qwen2VL(Family):
    name = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    multimodal_keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                       "second_per_grid_ts", "mm_encoder_outputs")
    token_keys = ("mm_token_type_ids",)

    def carries_visual(self, kw):
        return kw.get("pixel_values") is not None or versions.encoder_output(kw, "image") is not None

    def merge(self, kw, input_ids, embeds):
        cfg = self.model.config
        feats = _features(self.model.model, kw, "image")
        images = input_ids == cfg.image_token_id
        embeds = scatter_features(embeds, images, feats, "image")
        videos = torch.zeros_like(images)
        video_feats = _features(self.model.model, kw, "video")
        if video_feats is not None:
            videos = input_ids == cfg.video_token_id
            embeds = scatter_features(embeds, videos, video_feats, "video")
        return Visual(embeds=embeds, units=units_from_counts(images, [f.shape[0] for f in feats]),
                      visual=images | videos)

    def positions(self, kw, input_ids, attention_mask):
        pos = kw.get("position_ids")
        if pos is not None:
            # generate() passes [4, B, L]: the plain text numbering, then the (t, h, w) rows
            return pos[-3:] if pos.ndim == 3 else pos.expand(3, input_ids.shape[0], -1)
        return _rope_index(self.model.model, input_ids, attention_mask, kw)


# ----------------------------------------------------------------------------- version-dependent calls
# Tested on transformers 4.57.6, 5.0.0 to 5.25.0 (.ci/hf_matrix.sh; docs/integrations.md).
def _features(inner, kw, modality: str):
    """Per image (or video), its [n_i, H] merged features, or None without that input
    (``generate`` in 5.19 and later passes them precomputed)."""
    out = versions.encoder_output(kw, modality)
    if out is None:
        if modality == "image":
            out = inner.get_image_features(kw["pixel_values"], kw.get("image_grid_thw"), **versions.output_kwargs())
        elif kw.get("pixel_values_videos") is not None:
            out = inner.get_video_features(kw["pixel_values_videos"], kw.get("video_grid_thw"),
                                           **versions.output_kwargs())
        else:
            return None
    return versions.per_item(out)


def _rope_index(inner, input_ids, attention_mask, kw) -> torch.Tensor:
    """[3, B, L] M-RoPE positions of the unpruned prompt.  ``get_rope_index`` takes the
    processor's ``mm_token_type_ids`` from 5.3 on and finds the vision tokens in
    ``input_ids`` itself in 4.57-5.2; only Qwen2.5-VL's takes ``second_per_grid_ts``."""
    params = inspect.signature(inner.get_rope_index).parameters
    args = dict(image_grid_thw=kw.get("image_grid_thw"), video_grid_thw=kw.get("video_grid_thw"),
                attention_mask=attention_mask)
    if "mm_token_type_ids" in params:
        if kw.get("mm_token_type_ids") is None:
            # the model itself would then silently fall back to 1-D positions
            raise ValueError("prune_visual_tokens: Qwen2-VL needs mm_token_type_ids (returned by the processor) "
                             "or explicit position_ids to compute its M-RoPE positions")
        args["mm_token_type_ids"] = kw["mm_token_type_ids"]
    if "second_per_grid_ts" in params:
        args["second_per_grid_ts"] = kw.get("second_per_grid_ts")
    positions, _ = inner.get_rope_index(input_ids, **args)
    return positions
