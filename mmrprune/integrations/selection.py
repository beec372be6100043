"""Selecting the kept tokens of packed media items, independent of any model library.

An integration packs the visual tokens of several items (images, or whole videos) into one
``[T, D]`` tensor, item ``b`` being rows ``cu[b]:cu[b+1]``, and asks which rows to keep.  This
module answers with one :func:`mmrprune.select_varlen` call per batch (one per distinct patch
grid for ``d2pruner``'s spatial term) and gathers every per-token tensor that must follow the
kept rows, e.g. Qwen3-VL's DeepStack features of each level.  No transformers or vLLM import.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .. import importance as imp_mod
from ..api import select_varlen
from ..reference import budget

IMPORTANCE_SOURCES = ("norm", "none")   # what an integration can compute from the features alone


@dataclass(frozen=True)
class Budget:
    """Tokens kept per item: ``min(k, N)``, ``max(1, round_half_even(keep_ratio * N))``, or every
    token when neither is set.  A function of the item's token count ``N`` alone, so an engine can
    size an item's placeholders before the vision tower runs."""
    k: Optional[int] = None
    keep_ratio: Optional[float] = None

    @property
    def prunes(self) -> bool:
        return self.k is not None or self.keep_ratio is not None

    def tokens_kept(self, n: int) -> int:
        return budget(n, self.k, self.keep_ratio) if self.prunes else n


@dataclass(frozen=True)
class Selector:
    """How the kept tokens are chosen: :func:`mmrprune.select`'s ``method``, ``lam`` (``None``: the
    method's default, so methods that ignore it never warn), ``backend`` and method parameters,
    plus the importance source (``"norm"``: each token's L2 norm; ``"none"``)."""
    method: str = "mmr"
    lam: Optional[float] = None
    backend: str = "auto"
    importance: str = "norm"
    params: dict = field(default_factory=dict)

    @property
    def needs_grid(self) -> bool:
        """d2pruner's spatial term (``alpha < 1``) reads each item's patch grid."""
        return self.method == "d2pruner" and float(self.params.get("alpha", 0.5)) < 1.0


def offsets(lengths: Sequence[int]) -> torch.Tensor:
    """``[B + 1]`` int64 segment offsets of items with ``lengths`` tokens."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(torch.as_tensor(list(lengths), dtype=torch.int64), 0)
    return cu


def select_items(features: torch.Tensor, lengths: Sequence[int], budget_: Budget, selector: Selector,
                 grids: Optional[Sequence[tuple]] = None):
    """The rows to keep of packed ``features [T, D]`` (item ``b`` has ``lengths[b]`` rows).

    Returns ``(idx, cu_k)``: flat int64 row indices on ``features.device``, ascending within each
    item, item ``b``'s in ``idx[cu_k[b]:cu_k[b+1]]``, ``cu_k`` on the CPU.  Every item is selected
    in one call over all its tokens (all frames of a video).  ``grids`` (item ``b``'s ``(h, w)``
    patch grid, ``h * w == lengths[b]``) is required when ``selector.needs_grid``."""
    cu = offsets(lengths)
    if not budget_.prunes:
        return torch.arange(int(cu[-1]), device=features.device), cu
    w = imp_mod.token_norm(features) if selector.importance == "norm" else None
    if not selector.needs_grid:
        idx, cu_k = _select(features, w, cu, budget_, selector, {})
        return idx, cu_k.cpu()
    if grids is None or len(grids) != len(lengths):
        raise ValueError(f"select_items: method {selector.method!r} with alpha < 1 needs one (h, w) grid per item")
    # select_varlen takes one grid per call: one call per distinct grid
    return select_by_group(features, w, lengths, [tuple(g) for g in grids],
                           lambda f, w_, cu_, grid: _select(f, w_, cu_, budget_, selector, {"grid": grid}))


def select_by_group(features: torch.Tensor, w: Optional[torch.Tensor], lengths: Sequence[int], groups: Sequence,
                    select):
    """Items that share a group key selected together, for what one selection call cannot mix
    (a budget, a patch grid): ``select(features_g, w_g, cu_g, key)`` returns ``(idx, cu_k)``
    over the group's items, packed in item order.  Returns ``(idx, cu_k)`` over all items in
    their order, ``cu_k`` on the CPU; one group is one call on the tensors as given."""
    keys = list(dict.fromkeys(groups))
    if not keys:
        return torch.zeros(0, dtype=torch.int64, device=features.device), offsets([])
    if len(keys) == 1:
        idx, cu_k = select(features, w, offsets(lengths), keys[0])
        return idx, cu_k.cpu()
    cu = offsets(lengths)
    per_item = [None] * len(lengths)
    for key in keys:
        members = [b for b, g in enumerate(groups) if g == key]
        rows = torch.cat([torch.arange(int(cu[b]), int(cu[b + 1])) for b in members]).to(features.device)
        idx, cu_k = select(features[rows], None if w is None else w[rows], offsets([lengths[b] for b in members]),
                           key)
        cu_k = cu_k.cpu()
        for j, b in enumerate(members):
            per_item[b] = rows[idx[cu_k[j]:cu_k[j + 1]]]
    return torch.cat(per_item), offsets([p.numel() for p in per_item])


def _select(features, w, cu, budget_, selector, extra):
    return select_varlen(features, w, cu.to(features.device), k=budget_.k, keep_ratio=budget_.keep_ratio,
                         lam=selector.lam, method=selector.method, backend=selector.backend,
                         **selector.params, **extra)


def keep_rows(idx: torch.Tensor, *tensors: torch.Tensor) -> tuple:
    """Each ``[T, ...]`` tensor's rows ``idx``: the features that travel with a token (DeepStack
    levels, positions) keep exactly the rows the main features keep."""
    return tuple(t.index_select(0, idx.to(t.device)) for t in tensors)


def local_indices(idx: torch.Tensor, lengths: Sequence[int], cu_k: torch.Tensor) -> list:
    """Per item, its kept indices counted from the item's first token (plain lists)."""
    cu = offsets(lengths)
    flat = idx.cpu()
    return [(flat[int(cu_k[b]):int(cu_k[b + 1])] - cu[b]).tolist() for b in range(len(lengths))]
