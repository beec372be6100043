"""Gemma 3 (``Gemma3ForConditionalGeneration``): one budget unit per image (each pan-and-scan
crop is an image of its own), the plain 1-D position numbering, and image tokens that attend
bidirectionally within their image.

The model finds an image's bidirectional block as a run of consecutive ``token_type_ids == 1``
columns (every release of the window).  Listing ``token_type_ids`` in ``token_keys`` re-packs
it with the sequence, so the model rebuilds the blocks over the kept tokens: an image's kept
tokens stay consecutive, and the text tokens between two images (the processor's
begin/end-of-image tokens, which its ``token_type_ids`` mark 0 in every release) are never
pruned, so two images' blocks never merge.
"""
from __future__ import annotations

from . import versions
from .family import Family, square_grids


class Gemma3(Family):
    name = "gemma3"
    model_classes = ("Gemma3ForConditionalGeneration",)
    multimodal_keys = ("pixel_values", "mm_encoder_outputs")
    token_keys = ("token_type_ids",)

    def embed(self, input_ids):
        # The model embeds an out-of-vocabulary image token as the padding id (0) before
        # writing the image features over it; any other id is embedded as is.
        image = self.model.config.image_token_id
        if image >= self.model.get_input_embeddings().num_embeddings:
            input_ids = input_ids.masked_fill(input_ids == image, 0)
        return self.model.get_input_embeddings()(input_ids)

    def image_features(self, kw):
        return _image_features(self.model.model, kw)

    def grids(self, counts, positions):
        return square_grids(counts)


# ----------------------------------------------------------------------------- version-dependent calls
def _image_features(inner, kw) -> list:
    """Per image, its [mm_tokens_per_image, H] projected features (``generate`` in 5.19 and
    later passes them precomputed; 4.57's ``get_image_features`` takes ``pixel_values`` only)."""
    return versions.item_features(kw, "image", lambda **out: inner.get_image_features(kw["pixel_values"], **out))
