"""mmrprune's pruning subclass of vLLM's Qwen2.5-VL (imported by vLLM when it loads the model).

See :mod:`mmrprune.integrations.vllm` for the configuration and the overall flow."""
from __future__ import annotations

from functools import partial

import numpy as np
import torch
from vllm.model_executor.models.qwen2_5_vl import (Qwen2_5_VLDummyInputsBuilder, Qwen2_5_VLForConditionalGeneration,
                                                   Qwen2_5_VLMultiModalProcessor, Qwen2_5_VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement
from vllm.multimodal.video_prune.evs import compute_mrope_for_media

from .. import importance as imp_mod
from ..api import select_varlen
from . import vllm as plugin


def _config() -> plugin.PruneConfig:
    config = plugin.active_config()
    if config is None:
        raise RuntimeError(f"mmrprune's Qwen2.5-VL class is loaded but {plugin.ENV} is not set in this process")
    return config


class MMRPruneQwen2_5_VLProcessor(Qwen2_5_VLMultiModalProcessor):
    """Each image expands to ``tokens_kept(N)`` placeholders instead of ``N``."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        config = _config()

        def image_replacement(item_idx, full):
            tokens = full(item_idx)            # N copies of the image placeholder token
            return tokens[:config.tokens_kept(len(tokens))]

        return [PromptReplacement(modality=u.modality, target=u.target,
                                  replacement=partial(image_replacement, full=u.replacement))
                if u.modality == "image" else u for u in updates]


@MULTIMODAL_REGISTRY.register_processor(MMRPruneQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class MMRPruneQwen2_5_VL(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL whose image embeddings are pruned by mmrprune before they reach the decoder."""

    mmrprune_prunes_images = True          # read by the runner fix (_vllm_runner)

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.mmrprune_config = _config()
        # embed_multimodal post-processes (and the runner re-positions) only when this is set
        self.is_multimodal_pruning_enabled = True

    def _postprocess_image_embeds_evs(self, image_embeds_split, image_input):
        config = self.mmrprune_config
        merge = self.visual.spatial_merge_size
        grids = image_input["image_grid_thw"].tolist()
        lengths = [e.shape[0] for e in image_embeds_split]
        packed = torch.cat(image_embeds_split, dim=0)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
        w = imp_mod.token_norm(packed) if config.importance == "norm" else None
        idx, cu_k = select_varlen(packed, w, cu.to(packed.device), k=config.k, keep_ratio=config.keep_ratio,
                                  lam=config.lam, method=config.method, backend=config.backend)
        # each token's original (t, h, w) plus the grid width: the 4 channels recompute_mrope_positions reads
        positions = torch.cat([compute_mrope_for_media(g, merge) for g in grids], dim=0).to(packed.device)
        kept = torch.cat([packed[idx], positions[idx].to(packed.dtype)], dim=1)
        cu_k = cu_k.cpu()
        plugin.recent_selections.append(dict(lengths=lengths, kept_indices=idx.cpu().tolist(), cu_k=cu_k.tolist()))
        return tuple(kept.split((cu_k[1:] - cu_k[:-1]).tolist()))

    def _postprocess_video_embeds_evs(self, video_embeds_split, video_input):
        if self.video_pruning_rate:            # vLLM's own EVS video pruning was asked for
            return super()._postprocess_video_embeds_evs(video_embeds_split, video_input)
        # videos are not pruned, but with the pruning path on they must carry their positions too
        merge = self.visual.spatial_merge_size
        tps = self.config.vision_config.tokens_per_second
        seconds = video_input.get("second_per_grid_ts")
        out = []
        for i, (emb, grid) in enumerate(zip(video_embeds_split, video_input["video_grid_thw"].tolist())):
            sec = 1.0 if seconds is None else float(seconds[i].long())
            pos = compute_mrope_for_media(grid, merge, tokens_per_second=tps, video_second_per_grid=sec)
            out.append(torch.cat([emb, pos.to(emb.device, emb.dtype)], dim=1))
        return tuple(out)

    def get_mrope_input_positions(self, input_tokens, mm_features):
        """Positions for the prompt as tokenised, i.e. with ``mm_position.length`` (possibly pruned)
        placeholders per item.  Text before the first item is exact; each item's slots get the first
        ``length`` positions of its full grid (provisional: the runner overwrites them with the kept
        tokens' positions once the encoder ran) and the text after it continues the unpruned numbering."""
        items = sorted(mm_features, key=lambda f: f.mm_position.offset)
        chunks, start, next_pos = [], 0, 0
        for feature, (offset, t, h, w, t_factor) in zip(items, self.iter_mm_grid_thw(items)):
            length = feature.mm_position.length
            text_len = offset - start
            chunks.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + next_pos)
            grid = np.indices((t, h, w))
            if t_factor != 1.0:
                grid[0] = (grid[0] * t_factor).astype(np.int64)
            full = grid.reshape(3, -1) + text_len + next_pos
            chunks.append(full[:, :length])
            next_pos = int(full.max()) + 1
            start = offset + length
        if start < len(input_tokens):
            text_len = len(input_tokens) - start
            chunks.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + next_pos)
        positions = np.concatenate(chunks, axis=1).reshape(3, -1)
        return torch.from_numpy(positions), int(positions.max()) + 1 - len(input_tokens)
