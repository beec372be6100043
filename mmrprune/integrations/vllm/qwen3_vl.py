"""mmrprune's pruning subclass of vLLM's Qwen3-VL (images and videos).

Qwen3-VL's vision tower returns, per merged token, the main feature followed by one DeepStack
feature per level (``visual_dim`` columns each).  Selection reads the main feature; the kept
rows are gathered with every column, so each DeepStack level keeps exactly the main rows.

A video is laid out per frame as ``<t seconds><|vision_start|>`` + the frame's tokens +
``<|vision_end|>``, every frame a ``1 x h x w`` grid.  Its tokens, all frames together, are
selected in one call.  Since vLLM fixes the placeholder before the vision tower runs, a pruned
video's placeholder is every frame's timestamp and markers with all ``budget(N)`` tokens in the
first frame, the layout of vLLM's own EVS, and the whole placeholder is embedded: once the
kept tokens are known, the embedding rows follow the real layout (each kept token in its own
frame, after that frame's timestamp), with the timestamps' text embeddings between them.
"""
from __future__ import annotations

import numpy as np
import torch
from vllm.model_executor.models.qwen3_vl import (Qwen3VLDummyInputsBuilder, Qwen3VLForConditionalGeneration,
                                                 Qwen3VLMultiModalProcessor, Qwen3VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .. import mrope
from .common import PruningModel, prompt_updates, truncated

ARCHITECTURE = "Qwen3VLForConditionalGeneration"


def _video_tokens(*, frames: int, per_frame: int, kept: int, timestamps, tokenizer, config) -> list:
    """The token ids of a video placeholder: unpruned (``kept == frames * per_frame``) every frame
    holds its tokens, pruned the first frame holds all ``kept``."""
    tokens_per_frame = [per_frame] * frames if kept == frames * per_frame else [kept] + [0] * (frames - 1)
    return Qwen3VLMultiModalProcessor.get_video_repl(tokens_per_frame=tokens_per_frame, timestamps=timestamps, tokenizer=tokenizer,
                vision_start_token_id=config.vision_start_token_id, vision_end_token_id=config.vision_end_token_id,
                video_token_id=config.video_token_id, select_token_id=False)


class MMRPruneQwen3VLProcessor(Qwen3VLMultiModalProcessor):
    """Images expand to ``tokens_kept(N)`` placeholders; videos as in the module docstring."""

    mmrprune_config = None

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        config = self.mmrprune_config
        hf_config = self.info.get_hf_config()
        tokenizer = self.info.get_tokenizer()
        merge = hf_config.vision_config.spatial_merge_size

        def video(item_idx, original, budget):
            item = out_mm_kwargs["video"][item_idx]
            t, h, w = (int(v) for v in item["video_grid_thw"].data.tolist())
            per_frame = (h // merge) * (w // merge)
            return _video_tokens(frames=t, per_frame=per_frame,
                                 kept=budget.tokens_kept(t * per_frame), timestamps=item["timestamps"].data,
                                 tokenizer=tokenizer, config=hf_config)

        return prompt_updates(updates, {"image": config.images, "video": config.videos},
                              {"image": truncated, "video": video})


class Qwen3VLPruning(PruningModel):
    """The pruning of a Qwen3-VL model or of a subclass (Qwen3.5): mixed in before the model."""

    def __init__(self, *, vllm_config, prefix: str = "model"):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._mmrprune_start(vllm_config)

    def _cells(self, grids) -> list:
        merge = self.visual.spatial_merge_size
        return [(int(t), int(h) // merge, int(w) // merge) for t, h, w in grids]

    def _postprocess_image_embeds_evs(self, image_embeds_split, image_input):
        cells = self._cells(image_input["image_grid_thw"].tolist())
        packed, idx, cu_k = self._mmrprune_select(image_embeds_split, self.mmrprune_config.images, cells, "image",
                                                  select_dims=self.visual_dim)
        rel = torch.cat([torch.from_numpy(mrope.grid_positions(*c)) for c in cells], dim=1)
        rows = self._mmrprune_rows(packed[idx], rel[:, idx.cpu()])
        return tuple(rows.split((cu_k[1:] - cu_k[:-1]).tolist()))

    def _postprocess_video_embeds_evs(self, video_embeds_split, video_input):
        cells = self._cells(video_input["video_grid_thw"].tolist())
        packed, idx, cu_k = self._mmrprune_select(video_embeds_split, self.mmrprune_config.videos, cells, "video",
                                                  select_dims=self.visual_dim)
        starts = np.cumsum([0] + [f.shape[0] for f in video_embeds_split])
        out = []
        for b, (t, h, w) in enumerate(cells):
            local = (idx[int(cu_k[b]):int(cu_k[b + 1])] - int(starts[b])).cpu()
            out.append(self._video_rows(packed[int(starts[b]):int(starts[b + 1])], local, t, h * w,
                                        video_input.timestamps[b], mrope.grid_positions(1, h, w)))
        return tuple(out)

    def _video_rows(self, feats, local, frames: int, per_frame: int, timestamps, frame_grid):
        """One video's embedding rows in the real layout: every text token of the placeholder (its
        text embedding, no DeepStack) and the kept tokens in their frames, with positions."""
        ids = torch.tensor(_video_tokens(frames=frames,
                                         per_frame=per_frame, kept=frames * per_frame, timestamps=timestamps,
                                         tokenizer=self._tokenizer, config=self.config).full)
        is_video = ids == self.config.video_token_id
        rel_full = torch.from_numpy(mrope.layout(_parts(is_video.numpy(), frame_grid)))
        kept_video = torch.zeros(frames * per_frame, dtype=torch.bool)
        kept_video[local] = True
        keep = ~is_video
        keep[is_video] = kept_video
        ids, is_video = ids[keep], is_video[keep]
        rows = feats.new_zeros(ids.shape[0], feats.shape[1])
        rows[is_video] = feats[kept_video.to(feats.device)]
        text = ~is_video
        rows[text.to(rows.device), :self.visual_dim] = self.get_language_model().embed_input_ids(
            ids[text].to(rows.device)).to(rows.dtype)
        return self._mmrprune_rows(rows, rel_full[:, keep])

    def _mmrprune_extents(self, input_tokens, items):
        out = []
        for feature in items:
            t, h, w = self._cells([feature.data[f"{feature.modality}_grid_thw"].data.tolist()])[0]
            frame = max(h, w)               # a 1 x h x w grid's extent
            if feature.modality == "image":
                out.append(frame)
                continue
            rng = feature.mm_position
            span = np.asarray(input_tokens[rng.offset:rng.offset + rng.length])
            text = int((span != self.config.video_token_id).sum())   # timestamps and frame markers
            out.append(text + t * frame)
        return out


@MULTIMODAL_REGISTRY.register_processor(MMRPruneQwen3VLProcessor, info=Qwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class MMRPruneQwen3VL(Qwen3VLPruning, Qwen3VLForConditionalGeneration):
    """Qwen3-VL whose image and video embeddings (DeepStack levels included) are pruned by mmrprune."""


def classes() -> list:
    """``(architecture, model class, processor class)`` of each model this module prunes."""
    return [(ARCHITECTURE, MMRPruneQwen3VL, MMRPruneQwen3VLProcessor)]


def _parts(is_video: np.ndarray, frame_grid: np.ndarray) -> list:
    """The placeholder as :func:`mrope.layout` parts: text runs and one grid per frame."""
    parts, i, n = [], 0, len(is_video)
    per_frame = frame_grid.shape[1]
    while i < n:
        if is_video[i]:
            parts.append(frame_grid)
            i += per_frame
        else:
            j = i
            while j < n and not is_video[j]:
                j += 1
            parts.append(j - i)
            i = j
    return parts
