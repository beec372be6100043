"""LLaVA-NeXT and LLaVA-OneVision (``LlavaNextForConditionalGeneration``,
``LlavaOnevisionForConditionalGeneration``): anyres images, one budget unit per image across
its base image and crops, the plain 1-D position numbering of their language models.

Each image's features are its base tile, then its (unpadded) crop grid row by row, every
row followed by one ``image_newline`` token; an image that was not split into crops (a
OneVision prompt with several images) is its base tile followed by one newline token.  The
newline tokens are visual but never pruned, so every image keeps its row structure.

How the newline rows are found: they are the entries equal to the model's own
``image_newline`` parameter.  The model writes that parameter itself into each image's
features (cast to their dtype), so the comparison is exact.  Rebuilding the layout instead
needs ``image_sizes`` (and OneVision's ``batch_num_images``), which ``generate`` in
transformers 5.19 and later consumes when it encodes the images ahead of the prefill: the
prefill then gets the finished features and no sizes.  The layout is still checked: each
image must end with a newline token, as both layouts do.

OneVision videos are merged unpruned (their trailing newline token included).
"""
from __future__ import annotations

import torch

from . import versions
from .family import Family, Visual, scatter_features, units_from_counts


class LlavaNext(Family):
    name = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration",)
    multimodal_keys = ("pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy",
                       "mm_encoder_outputs")
    # forward arguments, besides the common ones, that reach get_image_features
    image_keys: tuple = ()

    def merge(self, kw, input_ids, embeds):
        inner = self.model.model
        feats = _image_features(inner, kw, {key: kw.get(key) for key in self.image_keys})
        slots = input_ids == self.model.config.image_token_id
        embeds = scatter_features(embeds, slots, feats, "image")
        newline = [_newline_rows(f, inner.image_newline) for f in feats]
        prunable = slots.clone()
        if newline:
            prunable[slots] = ~torch.cat(newline).to(slots.device)
        units = units_from_counts(prunable, [int((~n).sum()) for n in newline])
        visual = slots
        videos = self._merge_videos(kw, input_ids)
        if videos is not None:
            video_slots, video_feats = videos
            embeds = scatter_features(embeds, video_slots, video_feats, "video")
            visual = visual | video_slots
        return Visual(embeds=embeds, units=units, visual=visual)

    def _merge_videos(self, kw, input_ids):
        """``(slots, features)`` of the videos merged unpruned, or None."""
        return None


class LlavaOnevision(LlavaNext):
    name = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    multimodal_keys = LlavaNext.multimodal_keys + ("pixel_values_videos", "image_sizes_videos",
                                                   "vision_aspect_ratio", "batch_num_images")
    image_keys = ("batch_num_images",)

    def _merge_videos(self, kw, input_ids):
        slots = input_ids == self.model.config.video_token_id
        feats = _video_features(self.model.model, kw, slots)
        return None if feats is None else (slots, feats)


def _newline_rows(features: torch.Tensor, image_newline: torch.Tensor) -> torch.Tensor:
    """[n] bool: which rows of one image's [n, H] features are the newline token."""
    rows = (features == image_newline.to(features.device, features.dtype)).all(-1)
    if rows.numel() == 0 or not bool(rows[-1]):
        raise ValueError("prune_visual_tokens: an image's features do not end with the model's image_newline "
                         "token, the anyres layout this adapter knows (base tile, crop rows each followed by a "
                         "newline token); this transformers release or model variant is not supported")
    return rows


# ----------------------------------------------------------------------------- version-dependent calls
def _image_features(inner, kw, extra: dict) -> list:
    """Per image, its [n_i, H] packed features (base tile, crop rows and newline tokens), as
    the model's forward gets them (``generate`` in 5.19 and later passes them precomputed).
    The forward passes no ``vision_aspect_ratio`` (OneVision reads its config's), nor do we."""
    return versions.item_features(kw, "image", lambda **out: inner.get_image_features(
        kw["pixel_values"], kw.get("image_sizes"), vision_feature_layer=kw.get("vision_feature_layer"),
        vision_feature_select_strategy=kw.get("vision_feature_select_strategy"), **extra, **out))


def _video_features(inner, kw, slots: torch.Tensor):
    """Per video, its [n_i, H] features (pooled frames, then one newline token), or None
    without videos.  ``get_video_features`` returns a [B, n, H] tensor in 4.57 and its
    output's ``pooler_output`` in 5.0-5.25; the newline token is appended by the model's
    forward in 4.57-5.17 and by ``get_video_features`` itself in 5.19 and 5.25, so it is
    appended here when the placeholders (``slots``) count one more per video than the
    features."""
    out = versions.encoder_output(kw, "video")
    if out is None:
        if kw.get("pixel_values_videos") is None:
            return None
        # 4.57's get_video_features does not fill these in from the config (its forward does)
        cfg = inner.config
        layer, strategy = kw.get("vision_feature_layer"), kw.get("vision_feature_select_strategy")
        out = inner.get_video_features(
            kw["pixel_values_videos"],
            vision_feature_layer=cfg.vision_feature_layer if layer is None else layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy if strategy is None else strategy,
            **versions.output_kwargs())
    feats = versions.per_item(out)
    if int(slots.sum()) == sum(f.shape[0] + 1 for f in feats):
        feats = [torch.cat([f, inner.image_newline[None].to(f.device, f.dtype)]) for f in feats]
    return feats
