"""Qwen3-VL and Qwen3-VL-MoE (``Qwen3VLForConditionalGeneration``,
``Qwen3VLMoeForConditionalGeneration``): one budget unit per image, and per video or per
frame of it; interleaved M-RoPE (t, h, w) positions from the model's ``get_rope_index``;
DeepStack features restricted to the kept tokens.

DeepStack: the vision tower also returns features of some of its intermediate layers (one
*level* each); the model adds level ``i`` to the hidden states at the visual positions
after decoder layer ``i``.  The language model receives them as ``visual_pos_masks``
([B, L] bool, every image and video token) and ``deepstack_visual_embeds`` (one
[n_visual, H] tensor per level, rows in row-major order of those positions).  A pruned
prompt must give every level exactly the rows of the visual tokens it kept, so the levels
keep the same rows as the main features (:func:`..selection.keep_rows`).

Videos: a video of ``t x h x w`` patches (``t`` temporal grid steps) is laid out per frame
as its timestamp (text tokens, never pruned), ``<vision_start>``, ``h*w/4`` video tokens and
``<vision_end>``; ``video_unit="video"`` makes all frames of a video one budget unit,
``"frame"`` each temporal grid step one.  Without a video budget the video tokens are merged
unpruned (visual, with their DeepStack rows, never prunable).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..selection import keep_rows
from .family import PrunedPrompt, Visual, merge_unit_maps, scatter_features, units_from_counts
from .qwen2_vl import MRopeFamily, encoder_output


@dataclass
class DeepStackVisual(Visual):
    """A :class:`Visual` with the DeepStack levels: one [n_visual, H] tensor per level, its
    rows the ``visual`` slots in row-major order (what the model hands its language model)."""
    deepstack: list = field(default_factory=list)


class Qwen3VL(MRopeFamily):
    name = "qwen3_vl"
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
    # 5.3's get_rope_index takes one grid per run of video tokens, so a video whose frames are
    # split by timestamp text fails in the model itself (5.2 and 5.4 number it right)
    videos_transformers = "!=5.3.*"
    multimodal_keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                       "mm_encoder_outputs")

    def merge(self, kw, input_ids, embeds):
        cfg, inner = self.model.config, self.model.model
        maps, is_video, levels = [], [], []
        visual = torch.zeros_like(input_ids, dtype=torch.bool)
        for modality, token_id in (("image", cfg.image_token_id), ("video", cfg.video_token_id)):
            found = _features(inner, kw, modality)
            if found is None:
                continue
            feats, deepstack = found
            slots = input_ids == token_id
            embeds = scatter_features(embeds, slots, feats, modality)
            levels.append((slots, deepstack))
            visual |= slots
            if modality == "image":
                maps.append(units_from_counts(slots, [f.shape[0] for f in feats]))
            elif self.video_unit is not None:
                counts = video_unit_counts(slots, [f.shape[0] for f in feats], self.video_unit)
                _check_frames(counts, kw.get("video_grid_thw"), cfg.vision_config.spatial_merge_size ** 2,
                              self.video_unit)
                maps.append(units_from_counts(slots, counts))
            else:
                continue
            is_video.append(modality == "video")
        units, source = merge_unit_maps(*maps)
        video_units = torch.tensor(is_video, device=source.device)[source] if any(is_video) else None
        return DeepStackVisual(embeds=embeds, units=units, visual=visual, video_units=video_units,
                               deepstack=_joint_levels(visual, levels))

    def pruned_call(self, kw, pruned: PrunedPrompt):
        kw = super().pruned_call(kw, pruned)
        visual = pruned.visual
        # the kept visual tokens, row-major in the original layout, are row-major in the pruned
        # one too (rows keep their order and the columns within a row theirs)
        kept = pruned.keep[visual.visual].nonzero()[:, 0]
        levels = list(keep_rows(kept, *visual.deepstack))
        _deepstack_once(self.model, pruned.embeds, pruned.move(visual.visual, False), levels)
        return kw


def video_unit_counts(slots: torch.Tensor, per_video: list, unit: str) -> list:
    """Tokens per budget unit of the videos whose tokens fill ``slots`` [B, L] (row-major,
    ``per_video[v]`` tokens each): one unit per video (``"video"``) or per frame (``"frame"``).
    A frame is a run of consecutive video tokens, as Qwen3-VL wraps each frame in its own
    vision start / end tokens; this needs no ``video_grid_thw``, which ``generate`` in 5.19
    and later no longer passes to the prefill."""
    if unit == "video":
        return list(per_video)
    edges = torch.nn.functional.pad(slots.int(), (1, 1)).diff(dim=1)     # +1 at a run's start, -1 after its end
    starts, ends = (edges == 1).nonzero()[:, 1], (edges == -1).nonzero()[:, 1]
    runs = (ends - starts).tolist()
    frames, i = [], 0
    for v, n in enumerate(per_video):
        total = 0
        while total < n and i < len(runs):
            total += runs[i]
            frames.append(runs[i])
            i += 1
        if total != n:
            raise ValueError(f"prune_visual_tokens: video {v} has {n} features, but its placeholder tokens do not "
                             "form whole frames (each frame's video tokens between its own vision start and end "
                             "tokens, as the Qwen3-VL processor lays them out)")
    return frames


def _check_frames(counts: list, grid_thw, merge: int, unit: str) -> None:
    """With the videos' patch grids at hand, the frames found in the tokens must be their
    temporal grid steps of ``merge`` patches per token (a layout without per-frame separators
    would merge them)."""
    if unit != "frame" or grid_thw is None:
        return
    want = [int(h * w) // merge for t, h, w in grid_thw.tolist() for _ in range(int(t))]
    if counts != want:
        raise ValueError(f"prune_visual_tokens: video_unit='frame' found frames of {counts} tokens in input_ids, "
                         f"but video_grid_thw gives {want}; each frame's video tokens must lie between their own "
                         "vision start and end tokens, as the Qwen3-VL processor lays them out")


def _joint_levels(visual: torch.Tensor, levels: list) -> list:
    """Per DeepStack level, one [n_visual, H] tensor over every ``visual`` slot (row-major),
    from each modality's ``(slots, [per-level [n_slots, H]])``."""
    if not levels:
        return []
    n_levels = len(levels[0][1])
    out = []
    for i in range(n_levels):
        first = levels[0][1][i]
        joint = first.new_zeros(int(visual.sum()), first.shape[-1])
        for slots, deepstack in levels:
            joint[slots[visual].to(joint.device)] = deepstack[i].to(joint.dtype)
        out.append(joint)
    return out


# ----------------------------------------------------------------------------- version-dependent calls
def _deepstack_once(model, embeds: torch.Tensor, visual_pos_masks: torch.Tensor, levels: list) -> None:
    """Hand the DeepStack inputs to the language model's call that gets the pruned ``embeds``:
    the model's own forward passes none, since the pruned call carries no pixels.  The
    language model takes them as ``visual_pos_masks`` / ``deepstack_visual_embeds`` in
    4.57.6-5.25.  The pre-hook removes itself on the first call it sees, so a call that fails
    before reaching the language model leaves nothing behind; it acts only on a call whose
    ``inputs_embeds`` are the pruned ones (possibly moved to another device by a device map),
    and runs before any other pre-hook, so those see the call the language model gets."""
    def inject(module, args, kwargs):
        handle.remove()
        x = kwargs.get("inputs_embeds")
        if x is None or x.shape != embeds.shape or not (x is embeds or torch.equal(x.to(embeds.device), embeds)):
            return None
        return args, dict(kwargs, visual_pos_masks=visual_pos_masks.to(x.device), deepstack_visual_embeds=levels)

    handle = model.model.language_model.register_forward_pre_hook(inject, with_kwargs=True, prepend=True)


def _features(inner, kw, modality: str):
    """``(per item [n_i, H] features, per DeepStack level [n, H])`` of the images (or videos),
    or None without that input.  ``get_*_features`` returns a tuple ``(split features,
    levels)`` in 4.57 and an output with ``pooler_output`` / ``deepstack_features`` in
    5.0-5.25, whose levels are split per item in 5.19-5.25 (not in 5.0-5.17); ``generate`` in
    5.19 and later passes that output precomputed as ``mm_encoder_outputs``."""
    out = encoder_output(inner, kw, modality)
    if out is None:
        return None
    if hasattr(out, "pooler_output"):
        feats, levels = out.pooler_output, out.deepstack_features
    else:
        feats, levels = out
    levels = [torch.cat(list(level)) if isinstance(level, (list, tuple)) else level for level in levels]
    return list(feats), levels
