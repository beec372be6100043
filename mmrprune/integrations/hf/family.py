"""What a model family tells the pruning core: the adapter interface.

The core (:mod:`.core`) does what is the same for every family: it finds the prefill,
selects the tokens (one :func:`mmrprune.select_varlen` call per batch, one segment per
budget unit), removes the dropped columns from the embeddings, attention mask, position
ids, labels and the per-token inputs, re-pads the rows, and keeps the decode steps
consistent with the pruned cache.  An adapter (one file per family, a subclass of
:class:`Family`) says only what differs between families:

* which model classes it covers and which forward arguments carry visual inputs;
* how the prompt is embedded and where each visual feature goes (:meth:`Family.merge`),
  and which visual slots may be pruned, grouped into *budget units* (an image; a video or
  one frame of it; an image with all its crops);
* the position ids of the *unpruned* prompt (:meth:`Family.positions`), which kept tokens
  keep;
* what the pruned forward call needs besides embeddings, mask and positions
  (:meth:`Family.pruned_call`, e.g. DeepStack features restricted to the kept rows).

Every transformers call of a family whose name, signature or result changed inside the
tested window (:data:`.versions.REQUIREMENT`, whose docstring says which releases it was
tested on) sits in one marked section of its adapter ("version-dependent calls").  Adding a
family is one adapter file, one line in :mod:`.families` and its tiny-model tests
(docs/integrations.md, "Adding a family").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import versions


@dataclass
class Visual:
    """A prompt embedded as the model would embed it, and its prunable visual slots.

    ``units[b, l]`` is the budget unit of a prunable slot and -1 elsewhere.  Units are
    numbered 0, 1, ... in row-major order of their slots (the order of the packed features
    handed to the selector) and each lies within one row; every unit gets its own ``k`` /
    ``keep_ratio`` budget.  ``visual`` marks every visual slot, prunable or not (a video
    that is merged unpruned, a crop-separator token): ``importance="text"`` skips them.
    ``video_units`` [U] bool marks the units that belong to a video (they take the video
    budget); ``None``: every unit is an image.  An adapter whose :meth:`Family.pruned_call`
    needs more (DeepStack features) returns a subclass carrying it.
    """
    embeds: torch.Tensor          # [B, L, H]
    units: torch.Tensor           # [B, L] int64
    visual: torch.Tensor          # [B, L] bool
    video_units: Optional[torch.Tensor] = None


@dataclass
class PrunedPrompt:
    """The pruned prefill handed to :meth:`Family.pruned_call`.

    ``keep`` [B, L] marks the original columns that survived (text, kept visual tokens; no
    padding); ``move(t, fill)`` re-packs any [*lead, B, L, ...] tensor of the original layout
    into the pruned one (``lead`` leading dims), filling the new padding with ``fill``.
    """
    visual: Visual
    keep: torch.Tensor            # [B, L] bool, original layout
    embeds: torch.Tensor          # [B, L', H]
    attention_mask: torch.Tensor  # [B, L']
    positions: torch.Tensor       # [B, L'] or [R, B, L']
    move: Callable[..., torch.Tensor]


class Family:
    """One model family.  Instantiated once per enabled model (``self.model``).

    Class attributes:
        name: short name (``VisualTokenPruner.family``).
        model_classes: class names it covers, matched against the model's MRO.
        transformers: a version specifier (e.g. ``">=5.3"``) when the family is tested on
            less than the whole window of :data:`.versions.REQUIREMENT`; empty otherwise.
        videos: whether the family's adapter can prune videos (it then honours
            ``self.video_unit``).
        videos_transformers: a version specifier narrowing, for video budgets only, the
            releases the family is tested on (a release whose model itself cannot run the
            family's videos); empty otherwise.
        multimodal_keys: forward arguments that carry visual inputs or their layout; the
            pruned call drops them, since its ``inputs_embeds`` already hold the features.
        token_keys: per-token ``[B, L]`` forward arguments the pruned call keeps, re-packed
            like the sequence (e.g. ``token_type_ids`` that shape an attention mask); on a
            decode step, a full-length one is mapped onto the pruned cache.
        cls_importance: whether ``importance="cls"`` works; such a family defines
            ``record_cls_attention() -> list[handles]`` (called when pruning is enabled)
            and ``cls_attention(kw, visual) -> Tensor[T]`` (one score per prunable slot, in
            packed order).
    """
    name = ""
    model_classes: tuple = ()
    transformers = ""
    videos = False
    videos_transformers = ""
    multimodal_keys: tuple = ()
    token_keys: tuple = ()
    cls_importance = False

    VIDEO_UNITS = ("video", "frame")

    def __init__(self, model, video_unit: Optional[str] = None):
        self.model = model
        # how videos are pruned: one budget unit per "video" or per "frame"; None: videos
        # are merged unpruned (visual, never prunable)
        self.video_unit = video_unit

    def carries_visual(self, kw: dict) -> bool:
        """Whether this forward call brings visual inputs the family prunes; by default,
        images."""
        return given(kw, "image")

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings of ``input_ids`` [B, L, H] (placeholders included)."""
        return self.model.get_input_embeddings()(input_ids)

    def merge(self, kw: dict, input_ids: torch.Tensor, embeds: torch.Tensor) -> Visual:
        """Run the encoder(s) (or take ``kw``'s precomputed outputs) and put every visual
        feature into its slot of ``embeds``, exactly as the model's forward would.  This
        default serves families whose images each fill a run of the config's
        ``image_token_id`` placeholders, one budget unit per image, from
        :meth:`image_features`."""
        feats = self.image_features(kw)
        slots = input_ids == self.model.config.image_token_id
        embeds = scatter_features(embeds, slots, feats, "image")
        return Visual(embeds=embeds, units=units_from_counts(slots, [f.shape[0] for f in feats]), visual=slots)

    def image_features(self, kw: dict) -> list:
        """Per image of the call, its [n_i, H] features (for the default :meth:`merge`)."""
        raise NotImplementedError

    def positions(self, kw: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Position ids of the unpruned prompt, [B, L] or [R, B, L]: the caller's if given,
        else what the model computes.  This default is the plain numbering a decoder-only
        language model uses when given none."""
        bsz, seqlen = input_ids.shape
        pos = kw.get("position_ids")
        if pos is None:
            return torch.arange(seqlen, device=input_ids.device).expand(bsz, seqlen)
        return pos.expand(bsz, -1) if pos.ndim == 2 else pos

    def grids(self, counts: list, positions: torch.Tensor) -> list:
        """Each budget unit's ``(h, w)`` patch grid (d2pruner's spatial term), from its token
        count and the ``[R, T]`` positions of the packed prunable tokens.  A family whose units
        have a grid overrides this; :meth:`check_grids` then lets ``alpha < 1`` through."""
        raise AssertionError("unreachable: check_grids refuses the family when pruning is enabled")

    @classmethod
    def check_grids(cls) -> None:
        """Refuse, at enable time, d2pruner's spatial term on a family whose units have no grid."""
        if cls.grids is Family.grids:
            raise ValueError(f"method='d2pruner' with alpha < 1 reads each image's patch grid, which {cls.name} "
                             "images do not have as one grid (crops or tiles); use alpha=1.0")

    def pruned_call(self, kw: dict, pruned: PrunedPrompt) -> dict:
        """The keyword arguments of the pruned forward call (``kw`` already has its labels
        and ``token_keys`` re-packed)."""
        for key in self.multimodal_keys + ("input_ids",):
            kw.pop(key, None)
        kw.update(inputs_embeds=pruned.embeds, attention_mask=pruned.attention_mask,
                  position_ids=pruned.positions)
        return kw


# ----------------------------------------------------------------------------- helpers for adapters
def given(kw: dict, modality: str) -> bool:
    """Whether the call brings images (or videos): pixels, or ``generate``'s precomputed
    encoder output (5.19 and later)."""
    key = "pixel_values" if modality == "image" else "pixel_values_videos"
    return kw.get(key) is not None or versions.encoder_output(kw, modality) is not None


def square_grids(counts: list) -> list:
    """``(n, n)`` for units of ``n * n`` tokens: an image encoded as one square grid."""
    out = []
    for c in counts:
        side = int(round(c ** 0.5))
        if side * side != c:
            raise ValueError(f"prune_visual_tokens: method='d2pruner' with alpha < 1 needs each image's patch grid; "
                             f"an image of {c} tokens is not a square grid (a [CLS] token kept by "
                             "vision_feature_select_strategy='full'?); use alpha=1.0")
        out.append((side, side))
    return out


def scatter_features(embeds: torch.Tensor, slots: torch.Tensor, features: list, what: str) -> torch.Tensor:
    """``embeds`` with ``features`` (a list of [n_i, H]) written into the ``slots`` [B, L]
    in row-major order, as the models' ``masked_scatter`` does; the counts must agree."""
    packed = torch.cat([f.to(embeds.device, embeds.dtype) for f in features]) if features else \
        embeds.new_zeros(0, embeds.shape[-1])
    n_slots = int(slots.sum())
    if n_slots != packed.shape[0]:
        raise ValueError(f"prune_visual_tokens: {n_slots} {what} placeholder tokens in input_ids but "
                         f"{packed.shape[0]} {what} features")
    return embeds.masked_scatter(slots.unsqueeze(-1), packed)


def units_from_counts(slots: torch.Tensor, counts: list) -> torch.Tensor:
    """[B, L] unit map: the first ``counts[0]`` slots (row-major) are unit 0, the next
    ``counts[1]`` unit 1, ...; -1 outside ``slots``."""
    units = torch.full(slots.shape, -1, dtype=torch.int64, device=slots.device)
    ids = torch.repeat_interleave(torch.arange(len(counts), device=slots.device),
                                  torch.tensor(counts, dtype=torch.int64, device=slots.device))
    units[slots] = ids
    return units



def merge_unit_maps(*maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One [B, L] unit map from several with disjoint slots (e.g. the images' and the videos'
    maps, each numbered 0, 1, ... on its own), renumbered in row-major order of each unit's
    first slot as :class:`Visual` requires.  Returns ``(units, source)``: ``source[u]`` is the
    index in ``maps`` of the map unit ``u`` came from."""
    flat_index = torch.arange(maps[0].numel(), device=maps[0].device).view_as(maps[0])
    firsts, sources, olds = [], [], []
    for i, m in enumerate(maps):
        n = int(m.max()) + 1 if bool((m >= 0).any()) else 0
        first = torch.full((n,), maps[0].numel(), dtype=torch.int64, device=m.device)
        first.scatter_reduce_(0, m[m >= 0], flat_index[m >= 0], reduce="amin")
        firsts.append(first)
        sources.append(torch.full((n,), i, dtype=torch.int64, device=m.device))
        olds.append(torch.arange(n, device=m.device))
    order = torch.argsort(torch.cat(firsts))
    source, old = torch.cat(sources)[order], torch.cat(olds)[order]
    units = torch.full_like(maps[0], -1)
    for i, m in enumerate(maps):
        new_id = torch.empty(int((source == i).sum()), dtype=torch.int64, device=m.device)
        new_id[old[source == i]] = (source == i).nonzero()[:, 0]
        units[m >= 0] = new_id[m[m >= 0]]
    return units, source
