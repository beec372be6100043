"""Selecting the kept tokens of packed media items, independent of any model library.

An integration packs the visual tokens of several items (images, or whole videos) into one
``[T, D]`` tensor, item ``b`` being rows ``cu[b]:cu[b+1]``, and asks which rows to keep.  This
module answers with one :func:`mmrprune.select_varlen` call per batch (one per distinct patch
grid for ``d2pruner``'s spatial term) and gathers every per-token tensor that must follow the
kept rows, e.g. Qwen3-VL's DeepStack features of each level.  No transformers or vLLM import.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from .. import importance as imp_mod
from ..api import select_varlen
from ..reference import LAM_METHODS, budget
from ..validation import check_budget, check_lam, check_method, check_method_params

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


@dataclass(frozen=True)
class Spec:
    """What an integration keeps: a budget for images, one for videos, and the selector.  Made
    (and validated) by :func:`spec`; a modality whose budget does not prune keeps every token."""
    images: Budget = field(default_factory=Budget)
    videos: Budget = field(default_factory=Budget)
    selector: Selector = field(default_factory=Selector)

    def budget(self, video: bool) -> Budget:
        return self.videos if video else self.images


def spec(*, k=None, keep_ratio=None, video_k=None, video_keep_ratio=None, method="mmr", lam=None,
         backend="auto", importance: Any = "norm", importance_names: Sequence[str] = IMPORTANCE_SOURCES,
         device: Optional[str] = None, warn_prefix: str = "", stacklevel: int = 2, **params) -> Spec:
    """The validated :class:`Spec` of an integration's settings, or the error that says which
    setting is wrong and what is accepted (:func:`mmrprune.select`'s messages for what it shares).

    * ``k`` / ``keep_ratio``: at most one, the budget of each image; ``video_k`` /
      ``video_keep_ratio``: at most one, the budget of each video.  At least one of the two
      budgets; a modality without one is not pruned.
    * ``lam`` given to a method that ignores it warns once (prefixed by ``warn_prefix``, at
      ``stacklevel`` counted from the caller) and is dropped.
    * ``params``: the method's parameters.  ``d2pruner``'s ``grid`` is never a setting: each
      item's own patch grid comes from the model at selection time (``grids=`` of
      :func:`select_items`); with ``alpha < 1`` video budgets are refused (the spatial term is
      defined on one image's grid).
    * ``importance``: a name in ``importance_names`` is checked; anything else (a tensor, a
      callable) is the caller's to check.  ``topk`` needs an importance.
    * ``backend``: ``"auto"`` or a backend name; with ``device`` (``"cpu"``, ``"cuda"``) it must
      also run ``method`` there."""
    if k is None and keep_ratio is None:
        images = Budget()
    else:
        images = Budget(*check_budget(k, keep_ratio))
    videos = _video_budget(video_k, video_keep_ratio)
    if not (images.prunes or videos.prunes):
        raise ValueError("nothing to prune: give k or keep_ratio (tokens kept per image) and/or video_k or "
                         "video_keep_ratio (tokens kept per video)")
    method = check_method(method)
    if lam is not None:
        lam = check_lam(lam)
        if method not in LAM_METHODS:
            warnings.warn(f"{warn_prefix}lam={lam} is ignored by method={method!r}: only "
                          f"{' and '.join(LAM_METHODS)} use lam", UserWarning, stacklevel=stacklevel + 1)
            lam = None
    if method == "d2pruner":
        if "grid" in params:
            raise TypeError("grid: d2pruner's grid is each image's own patch grid, which the integration takes "
                            "from the model; leave grid out")
        params = check_method_params(method, {**params, "grid": (1, 1)})
        params.pop("grid")
        if videos.prunes and params["alpha"] < 1.0:
            raise ValueError("video_k/video_keep_ratio with method=d2pruner needs alpha=1.0: its spatial term is "
                             f"defined on one image's patch grid, not across a video's frames "
                             f"(got alpha={params['alpha']})")
    else:
        params = check_method_params(method, dict(params))
    if isinstance(importance, str) and importance not in importance_names:
        raise ValueError(f"importance must be one of {list(importance_names)}, got {importance!r}")
    if method == "topk" and (importance is None or importance == "none"):
        raise ValueError("method=topk ranks tokens by importance; importance=none would keep the first k tokens "
                         "of each item (use importance=norm)")
    if device is not None:
        from .. import dispatch
        dispatch.resolve(backend, device, method)
    elif not isinstance(backend, str) or (backend != "auto" and backend not in _backends()):
        raise ValueError(f"backend must be 'auto' or one of {list(_backends())}, got {backend!r}")
    return Spec(images=images, videos=videos,
                selector=Selector(method=method, lam=lam, backend=backend, importance=importance, params=params))


def _video_budget(video_k, video_keep_ratio) -> Budget:
    if video_k is None and video_keep_ratio is None:
        return Budget()
    if video_k is not None and video_keep_ratio is not None:
        raise ValueError(f"at most one of video_k or video_keep_ratio may be given, got video_k={video_k!r}, "
                         f"video_keep_ratio={video_keep_ratio!r}")
    try:
        return Budget(*check_budget(video_k, video_keep_ratio))
    except (TypeError, ValueError) as e:         # the same rules as k / keep_ratio, named as video ones
        raise type(e)(f"video_{e}") from None


def _backends():
    from ..dispatch import BACKENDS
    return BACKENDS


def offsets(lengths: Sequence[int]) -> torch.Tensor:
    """``[B + 1]`` int64 segment offsets of items with ``lengths`` tokens."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(torch.as_tensor(list(lengths), dtype=torch.int64), 0)
    return cu


_NORM = object()


def select_items(features: torch.Tensor, lengths: Sequence[int], budget_, selector: Selector,
                 grids: Optional[Sequence[tuple]] = None, w=_NORM):
    """The rows to keep of packed ``features [T, D]`` (item ``b`` has ``lengths[b]`` rows).

    Returns ``(idx, cu_k)``: flat int64 row indices on ``features.device``, ascending within each
    item, item ``b``'s in ``idx[cu_k[b]:cu_k[b+1]]``, ``cu_k`` on the CPU.  Every item is selected
    in one call over all its tokens (all frames of a video).  ``budget_``: one :class:`Budget`
    for every item, or one per item (items whose budget does not prune keep every row).
    ``grids`` (item ``b``'s ``(h, w)`` patch grid, ``h * w == lengths[b]``) is required when
    ``selector.needs_grid``.  ``w``: the importance ``[T]`` (or None); by default the one
    ``selector.importance`` names."""
    cu = offsets(lengths)
    budgets = [budget_] * len(lengths) if isinstance(budget_, Budget) else list(budget_)
    if not any(b.prunes for b in budgets):
        return torch.arange(int(cu[-1]), device=features.device), cu
    if w is _NORM:
        w = imp_mod.token_norm(features) if selector.importance == "norm" else None
    if selector.needs_grid:
        if grids is None or len(grids) != len(lengths):
            raise ValueError(f"select_items: method {selector.method!r} with alpha < 1 needs one (h, w) grid per "
                             "item")
        keys = [(b, tuple(g)) for b, g in zip(budgets, grids)]
    else:
        keys = [(b, None) for b in budgets]

    def select(f, w_, cu_, key):
        b, grid = key
        if not b.prunes:
            return torch.arange(f.shape[0], device=f.device), cu_
        return _select(f, w_, cu_, b, selector, {} if grid is None else {"grid": grid})

    # one selection call takes one budget and one grid: one call per distinct pair
    return select_by_group(features, w, lengths, keys, select)


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
