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

from .. import mrope
from ..selection import Budget, local_indices, select_items
from .config import ENV, PruneConfig, check_backend


def _device_type(vllm_config) -> str:
    device = getattr(getattr(vllm_config, "device_config", None), "device", None)
    if device is not None:
        return torch.device(device).type
    from vllm.platforms import current_platform
    return current_platform.device_type


def _default(config_cls, name):
    """The declared default of a (pydantic) dataclass field; ``None`` when there is none."""
    pydantic_fields = getattr(config_cls, "__pydantic_fields__", None)
    if pydantic_fields and name in pydantic_fields:
        default = pydantic_fields[name].default
        return None if type(default).__name__ == "PydanticUndefinedType" else default
    fields = getattr(config_cls, "__dataclass_fields__", {})
    default = getattr(fields.get(name), "default", None)
    return None if type(default).__name__ == "_MISSING_TYPE" else default


def engine_pruning(mm_config) -> dict:
    """vLLM's own pruning settings that are in effect or changed from their default: every
    field of the multimodal config whose name mentions pruning (``video_pruning_rate``,
    ``video_pruning_method``, and any image pruning setting a vLLM release adds).  A pruning
    method counts once a pruning rate is on, since vLLM then applies it."""
    if mm_config is None:
        return {}
    names = [n for n in (getattr(type(mm_config), "__dataclass_fields__", None) or vars(mm_config)) if "prun" in n]
    changed = {}
    for name in names:
        value = getattr(mm_config, name, None)
        if value is None or value is False or value == _default(type(mm_config), name):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
            continue
        changed[name] = value
    if any(not isinstance(v, str) for v in changed.values()):    # a rate is on: its method applies too
        changed.update({n: getattr(mm_config, n) for n in names if n.endswith("_method") and n not in changed})
    return {n: changed[n] for n in names if n in changed}


class PruningModel:
    """Mixin of the pruning model classes; :func:`mmrprune.integrations.vllm.register` binds
    ``mmrprune_config`` and ``mmrprune_record`` to the class."""

    mmrprune_config: Optional[PruneConfig] = None
    mmrprune_record: Optional[deque] = None
    mmrprune_prunes = True                    # read by the runner change (.runner)

    def _mmrprune_start(self, vllm_config) -> None:
        """At model load, before any weight: refuse what cannot work with this engine."""
        if self.mmrprune_config is None:
            raise RuntimeError(f"mmrprune's {type(self).__name__} is loaded but {ENV} was not registered in this "
                               "process")
        own = engine_pruning(vllm_config.model_config.multimodal_config)
        if own:
            shown = ", ".join(f"--{name.replace('_', '-')}={value}" for name, value in own.items())
            raise ValueError(f"{ENV} and vLLM's own pruning ({shown}) are mutually exclusive: mmrprune positions "
                             "every pruned item itself; prune videos with mmrprune's video_k or video_keep_ratio "
                             f"and leave vLLM's pruning settings unset, or unset {ENV} to use vLLM's own pruning")
        check_backend(self.mmrprune_config.selector, _device_type(vllm_config))
        from .runner import verify
        verify(self, vllm_config)
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

