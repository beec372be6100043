"""mmrprune's pruning subclass of vLLM's Qwen2.5-VL (images and videos).

An image or a video is one item: a ``t x h x w`` grid of merged tokens behind one run of
``<|image_pad|>`` / ``<|video_pad|>`` placeholders.  A video's tokens, all frames together, are
selected in one call; its temporal position is ``floor(i * second_per_grid * tokens_per_second)``.
See :mod:`.common` for the positions.
"""
from __future__ import annotations

import torch
from vllm.model_executor.models.qwen2_5_vl import (Qwen2_5_VLDummyInputsBuilder, Qwen2_5_VLForConditionalGeneration,
                                                   Qwen2_5_VLMultiModalProcessor, Qwen2_5_VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .. import mrope
from .common import PruningModel, prompt_updates, truncated

ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"


class MMRPruneQwen2_5_VLProcessor(Qwen2_5_VLMultiModalProcessor):
    """Each item expands to ``tokens_kept(N)`` placeholders instead of ``N``."""

    mmrprune_config = None

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        config = self.mmrprune_config
        return prompt_updates(updates, {"image": config.images, "video": config.videos},
                              {"image": truncated, "video": truncated})


@MULTIMODAL_REGISTRY.register_processor(MMRPruneQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class MMRPruneQwen2_5_VL(PruningModel, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL whose image and video embeddings are pruned by mmrprune before the decoder."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._mmrprune_start(vllm_config)

    def _t_scales(self, seconds, count: int) -> list:
        tps = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        return [float(tps) * (1.0 if seconds is None else float(seconds[i])) for i in range(count)]

    def _prune(self, embeds_split, grids, t_scales, budget, modality):
        merge = self.visual.spatial_merge_size
        cells = [(t, h // merge, w // merge) for t, h, w in grids]
        packed, idx, cu_k = self._mmrprune_select(embeds_split, budget, cells, modality)
        rel = torch.cat([torch.from_numpy(mrope.grid_positions(*c, t_scale=s)) for c, s in zip(cells, t_scales)],
                        dim=1)
        rows = self._mmrprune_rows(packed[idx], rel[:, idx.cpu()])
        return tuple(rows.split((cu_k[1:] - cu_k[:-1]).tolist()))

    def _postprocess_image_embeds_evs(self, image_embeds_split, image_input):
        grids = image_input["image_grid_thw"].tolist()
        return self._prune(image_embeds_split, grids, [1.0] * len(grids), self.mmrprune_config.images, "image")

    def _postprocess_video_embeds_evs(self, video_embeds_split, video_input):
        grids = video_input["video_grid_thw"].tolist()
        scales = self._t_scales(video_input.get("second_per_grid_ts"), len(grids))
        return self._prune(video_embeds_split, grids, scales, self.mmrprune_config.videos, "video")

    def _mmrprune_extents(self, input_tokens, items):
        return [mrope.extent(mrope.grid_positions(t, h, w, t_scale=s))
                for _, t, h, w, s in self.iter_mm_grid_thw(items)]



def classes() -> list:
    """``(architecture, model class, processor class)`` of each model this module prunes."""
    return [(ARCHITECTURE, MMRPruneQwen2_5_VL, MMRPruneQwen2_5_VLProcessor)]
