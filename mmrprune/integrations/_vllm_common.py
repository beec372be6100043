"""What mmrprune's vLLM model adapters share (imported only once vLLM loads a pruning model).

Every media item (image or video) of a request is one run of placeholder slots in the prompt,
``budget(N)`` long when pruned.  Positions go through three steps:

1. when vLLM adds a request (``get_mrope_input_positions``), the text gets its final M-RoPE
   positions, numbered as in the *unpruned* prompt, and each item's slot ``s`` is marked
   ``(base, -1 - s, base)``, ``base`` being the position of the item's first unpruned token;
2. after the vision tower, each kept row carries its original position relative to ``base``,
   appended to the embedding as :data:`mrope.POSITION_COLUMNS` columns;
3. vLLM's runner then calls ``recompute_mrope_positions`` on each prefill chunk, as for its own
   EVS pruning, and the first marked slots at or after the chunk's start take ``base + relative``
   position, in order, while the columns are stripped.

Markers instead of searching the prompt for ``<|vision_start|>`` keep this exact for several
items per prompt, for Qwen3-VL's timestamped videos and for items split across prefill chunks
or partly served from the prefix cache.
"""
from __future__ import annotations

from collections import deque
from typing import Optional, Sequence

import numpy as np
import torch

from . import mrope
from .selection import Budget, local_indices, select_items
from .vllm_config import ENV, PruneConfig


class PruningModel:
    """Mixin of the pruning model classes; :func:`mmrprune.integrations.vllm.register` binds
    ``mmrprune_config`` and ``mmrprune_record`` to the class."""

    mmrprune_config: Optional[PruneConfig] = None
    mmrprune_record: Optional[deque] = None
    mmrprune_prunes = True                    # read by the runner fix (_vllm_runner)

    def _mmrprune_start(self, multimodal_config) -> None:
        if self.mmrprune_config is None:
            raise RuntimeError(f"mmrprune's {type(self).__name__} is loaded but {ENV} was not registered in this "
                               "process")
        rate = getattr(multimodal_config, "video_pruning_rate", None)
        if rate:
            raise ValueError(f"{ENV} and --video-pruning-rate={rate} are mutually exclusive: mmrprune positions "
                             "every pruned item itself; prune videos with mmrprune's video_k or video_keep_ratio, "
                             f"or unset {ENV} to use vLLM's own video pruning")
        # embed_multimodal post-processes the encoder output, and the runner re-positions, only when set
        self.is_multimodal_pruning_enabled = True

    def _mmrprune_select(self, features: Sequence[torch.Tensor], budget: Budget, grids: Sequence[tuple],
                         modality: str, select_dims: Optional[int] = None):
        """Rows kept of each item: ``(packed [T, D], idx, cu_k)``.  Selection reads the first
        ``select_dims`` columns (the main features; all by default); the caller's gather of the
        packed rows takes every column, so extra feature levels keep the same rows."""
        lengths = [f.shape[0] for f in features]
        packed = torch.cat(list(features), dim=0)
        main = packed if select_dims is None else packed[:, :select_dims]
        idx, cu_k = select_items(main, lengths, budget, self.mmrprune_config.selector,
                                 grids=[g[-2:] for g in grids])
        self.mmrprune_record.append(dict(modality=modality, lengths=lengths, grids=[list(g) for g in grids],
                                         kept=local_indices(idx, lengths, cu_k)))
        return packed, idx, cu_k

    @staticmethod
    def _mmrprune_rows(kept: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Embedding rows with their relative positions ``[3, R]`` appended as columns."""
        return torch.cat([kept, mrope.encode(positions, kept.dtype).to(kept.device)], dim=1)

    def _mmrprune_extents(self, input_tokens, items) -> list:
        """Per item (sorted by offset): how far it moves the numbering of what follows."""
        raise NotImplementedError

    def get_mrope_input_positions(self, input_tokens, mm_features):
        """Step 1 of the module docstring: final text positions, marked item slots."""
        items = sorted(mm_features, key=lambda f: f.mm_position.offset)
        n = len(input_tokens)
        positions = np.empty((3, n), dtype=np.int64)
        start, cursor = 0, 0
        for feature, ext in zip(items, self._mmrprune_extents(input_tokens, items)):
            rng = feature.mm_position
            if rng.is_embed is not None and not bool(rng.is_embed.all()):
                raise RuntimeError(f"mmrprune: a {feature.modality} placeholder with non-embedding slots; this vLLM "
                                   "lays out placeholders differently from the versions mmrprune supports")
            text = rng.offset - cursor
            positions[:, cursor:rng.offset] = np.arange(start, start + text)
            start += text
            positions[0, rng.offset:rng.offset + rng.length] = start
            positions[1, rng.offset:rng.offset + rng.length] = -1 - np.arange(rng.length)
            positions[2, rng.offset:rng.offset + rng.length] = start
            start += ext
            cursor = rng.offset + rng.length
        positions[:, cursor:] = np.arange(start, start + n - cursor)
        start += n - cursor
        return torch.from_numpy(positions), start - n

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """Step 3 of the module docstring, for one prefill chunk of one request."""
        width = mrope.POSITION_COLUMNS
        stripped = [e[:, :-width] for e in multimodal_embeddings]
        positions = mrope_positions.clone()
        if multimodal_embeddings:
            rel = mrope.decode(torch.cat([e[:, -width:] for e in multimodal_embeddings], dim=0).cpu())
            rel = rel.to(positions.device)
            marked = (positions[1, num_computed_tokens:] < 0).nonzero().flatten() + num_computed_tokens
            if marked.numel() < rel.shape[1]:
                raise RuntimeError(f"mmrprune: {rel.shape[1]} media rows but {marked.numel()} media slots left in "
                                   "the prompt; the runner called recompute_mrope_positions out of order")
            slots = marked[:rel.shape[1]]
            positions[:, slots] = rel + positions[0, slots]
        return stripped, positions, int(positions.max()) + 1 - positions.shape[1]


def prompt_updates(updates, budgets: dict, replacement_for: dict):
    """vLLM's prompt updates with each pruned modality's replacement swapped.

    ``budgets``: modality -> :class:`Budget`; ``replacement_for``: modality -> ``f(item_idx,
    original, budget)`` building the replacement (``original`` is vLLM's replacement callable)."""
    from vllm.multimodal.processing import PromptReplacement
    out = []
    for u in updates:
        make = replacement_for.get(u.modality)
        if make is None:
            out.append(u)
            continue

        def replacement(item_idx, make=make, original=u.replacement, budget=budgets[u.modality]):
            return make(item_idx, original, budget)
        out.append(PromptReplacement(modality=u.modality, target=u.target, replacement=replacement))
    return out


def truncated(item_idx, original, budget: Budget):
    """A replacement of ``N`` identical placeholder tokens cut to ``budget.tokens_kept(N)``."""
    tokens = original(item_idx)
    return tokens[:budget.tokens_kept(len(tokens))]

