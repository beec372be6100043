"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one budget unit per image, the plain 1-D
position numbering of its Llama-style language model, and ``importance="cls"`` from the
CLIP tower's [CLS] attention."""
from __future__ import annotations

from typing import Optional

import torch

from ... import importance as imp_mod
from . import versions
from .family import Family, square_grids


class Llava(Family):
    name = "llava"
    model_classes = ("LlavaForConditionalGeneration",)
    multimodal_keys = ("pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy",
                       "mm_encoder_outputs")
    cls_importance = True

    def __init__(self, model, **options):
        super().__init__(model, **options)
        self._attn_store: Optional[list] = None     # set when importance="cls" records attention

    def image_features(self, kw):
        return _image_features(self.model.model, kw, attentions=self._attn_store is not None)

    def grids(self, counts, positions):
        return square_grids(counts)

    # [CLS] attention: forward hooks on the vision tower's attention modules record the
    # attention probabilities of its latest run (ours, or generate()'s pre-encoding).
    def record_cls_attention(self):
        vt = self.model.model.vision_tower
        body = getattr(vt, "vision_model", vt)        # CLIPVisionModel wraps a transformer, or is one
        layers = getattr(getattr(body, "encoder", None), "layers", None)
        if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
            raise ValueError("prune_visual_tokens: importance='cls' supports CLIP-style vision towers "
                             "(encoder.layers[i].self_attn) only")
        impl = getattr(getattr(vt, "config", None), "_attn_implementation", None)
        if impl not in (None, "eager"):
            # sdpa and flash kernels never form the attention probabilities
            raise ValueError(f"importance='cls' reads the vision tower's attention probabilities, which its "
                             f"{impl!r} attention does not compute; load the model with "
                             "attn_implementation='eager' (at least for the vision tower)")
        self._attn_store = [None] * len(layers)

        def reset(module, args, kwargs):
            self._attn_store = [None] * len(layers)

        def make(i):
            def record(module, args, output):
                if isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor):
                    self._attn_store[i] = output[1].detach()
            return record

        hs = [vt.register_forward_pre_hook(reset, with_kwargs=True)]
        hs += [layer.self_attn.register_forward_hook(make(i)) for i, layer in enumerate(layers)]
        return hs

    def cls_attention(self, kw, visual):
        cfg = self.model.config
        layer = kw.get("vision_feature_layer")
        layer = cfg.vision_feature_layer if layer is None else layer
        if not isinstance(layer, int):
            layer = layer[-1]
        # hidden_states[l] is the output of layer l (1-based); layer l's attention is store[l - 1]
        a = self._attn_store[layer] if layer < 0 else self._attn_store[layer - 1]
        if a is None:
            raise ValueError("prune_visual_tokens: importance='cls' needs the vision tower's attention "
                             "probabilities; load the model with attn_implementation='eager' (at least for "
                             "the vision tower)")
        strategy = kw.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
        w = imp_mod.cls_attention(a) if strategy == "default" else a.float()[:, :, 0, :].mean(dim=1)
        counts = torch.bincount(visual.units[visual.units >= 0])
        if w.shape[0] != counts.numel() or bool((counts != w.shape[1]).any()):
            raise ValueError("prune_visual_tokens: [CLS] attention does not match the image features "
                             "(images split with image_sizes are not supported with importance='cls')")
        return w.reshape(-1)


# ----------------------------------------------------------------------------- version-dependent calls
def _image_features(inner, kw, attentions: bool) -> list:
    """Per image, its [n_i, H] projected features (``generate`` in 5.19 and later passes them
    precomputed).  ``attentions``: make the CLIP tower return its attention probabilities,
    which 4.57 computes only when asked."""
    extra = dict(output_attentions=True) if attentions else {}
    return versions.item_features(kw, "image", lambda **out: inner.get_image_features(
        pixel_values=kw["pixel_values"], vision_feature_layer=kw.get("vision_feature_layer"),
        vision_feature_select_strategy=kw.get("vision_feature_select_strategy"), image_sizes=kw.get("image_sizes"),
        **out, **extra))
