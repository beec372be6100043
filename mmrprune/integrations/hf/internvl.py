"""InternVL (the transformers-native ``InternVLForConditionalGeneration``): one budget unit per
image across all its tiles, and the plain 1-D position numbering.

The model returns one feature block per *tile* and never says which tiles form an image: the
processor splits an image into tiles and writes their image-context tokens as one run
between the image's start and end tokens.  So an image is a run of consecutive
image-context tokens in ``input_ids``, and its tiles' features, packed in order, fill it.
A video reaches the model as images, one run per frame, so each frame is a unit with the
image budget (the model's inputs do not tell a frame from an image).
"""
from __future__ import annotations

import torch

from . import versions
from .family import Family, Visual, scatter_features


class InternVL(Family):
    name = "internvl"
    model_classes = ("InternVLForConditionalGeneration",)
    multimodal_keys = ("pixel_values", "vision_feature_layer", "vision_feature_select_strategy",
                       "mm_encoder_outputs")

    def merge(self, kw, input_ids, embeds):
        tiles = _tile_features(self.model.model, kw)
        slots = input_ids == self.model.config.image_token_id
        embeds = scatter_features(embeds, slots, tiles, "image")
        units = image_runs(slots)
        per_tile = tiles[0].shape[0] if tiles else 1
        sizes = torch.bincount(units[units >= 0])
        if bool((sizes % per_tile != 0).any()):
            raise ValueError(f"prune_visual_tokens: an image's run of image-context tokens ({sizes.tolist()}) is not "
                             f"a whole number of tiles of {per_tile} tokens; each image's tokens must be one run "
                             "between its start and end tokens, as the processor writes them")
        return Visual(embeds=embeds, units=units, visual=slots)


def image_runs(slots: torch.Tensor) -> torch.Tensor:
    """[B, L] unit map: each run of consecutive ``slots`` within a row is one unit, numbered
    0, 1, ... in row-major order; -1 outside ``slots``."""
    prev = torch.nn.functional.pad(slots[:, :-1], (1, 0), value=False)
    starts = slots & ~prev
    ids = torch.cumsum(starts.flatten().long(), 0).view(slots.shape) - 1
    return torch.where(slots, ids, torch.full_like(ids, -1))


# ----------------------------------------------------------------------------- version-dependent calls
def _tile_features(inner, kw) -> list:
    """Per tile, its [n, H] projected features, tiles in order (``generate`` in 5.19 and later
    passes them precomputed).  The feature layer and strategy default to the config's, as the
    model's own forward does in every release."""
    cfg = inner.config
    layer = kw.get("vision_feature_layer")
    strategy = kw.get("vision_feature_select_strategy")
    return versions.item_features(kw, "image", lambda **out: inner.get_image_features(
        pixel_values=kw["pixel_values"], vision_feature_layer=cfg.vision_feature_layer if layer is None else layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy if strategy is None else strategy,
        **out))
