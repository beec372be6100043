"""The family-independent part of the HF integration: enabling, the forward pre-hook, the
sequence surgery of the prefill and the decode steps that follow it.

A forward *pre-hook* on the model rewrites every call that carries visual inputs on an
empty cache (the prefill):

1. the family adapter embeds ``input_ids`` and puts every visual feature into its slot,
   exactly as the model would, and gives the position ids of the *unpruned* prompt;
2. the prunable tokens are selected with :func:`mmrprune.select_varlen`, one segment per
   budget unit (image), so several images per prompt and batch > 1 are one call;
3. the dropped columns leave the embeddings, attention mask, position ids (kept tokens keep
   their *original* positions), labels and per-token inputs; rows are re-padded to a common
   length (on the left unless the batch was right-padded) and the model is called with
   ``inputs_embeds``.

During decoding (cache not empty, no new visual inputs) the hook maps the caller's attention
mask -- which ``generate`` keeps at the unpruned length -- onto the pruned cache, and fills
in position ids that continue the original numbering when the caller gives none.  The
decode state of a pruned prefill is kept with the KV cache it filled, so conversations can
be interleaved; a cache that holds no pruned prompt passes through untouched.
"""
from __future__ import annotations

import inspect
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch

from .. import selection
from . import importance as imp
from . import versions
from .families import family_of
from .family import Family, PrunedPrompt, Visual


@dataclass
class _Columns:
    """Where the kept columns of the prompt go: column ``src[j]`` of row ``rows[j]`` moves to
    column ``dest[j]`` of the re-padded [bsz, new_len] rows."""
    rows: torch.Tensor
    src: torch.Tensor
    dest: torch.Tensor
    bsz: int
    new_len: int
    right_padded: bool
    pads: tuple = ()              # (rows, src, dest) of the padding columns that keep their place

    @classmethod
    def of(cls, keep: torch.Tensor, am: torch.Tensor) -> "_Columns":
        """The layout of the ``keep`` [B, L] columns: rows re-padded on the left unless the
        batch was right-padded."""
        n_keep = keep.sum(dim=1)
        new_len = int(n_keep.max())
        right_padded = bool((am[:, -1] == 0).any()) and not bool((am[:, 0] == 0).any())
        rank = torch.cumsum(keep.long(), dim=1) - 1
        offset = torch.zeros_like(n_keep) if right_padded else new_len - n_keep
        dest = rank + offset[:, None]
        b_i, l_i = keep.nonzero(as_tuple=True)
        # padding columns keep their place counted from the padded edge, where the new
        # padding has room for them
        seqlen = keep.shape[1]
        col = torch.arange(seqlen, device=keep.device).expand_as(keep)
        pad_dest = col - (seqlen - new_len) if right_padded else col
        room = (pad_dest >= n_keep[:, None]) if right_padded else (pad_dest < (new_len - n_keep)[:, None])
        p_b, p_l = ((am == 0) & room & (pad_dest >= 0) & (pad_dest < new_len)).nonzero(as_tuple=True)
        return cls(rows=b_i, src=l_i, dest=dest[b_i, l_i], bsz=keep.shape[0], new_len=new_len,
                   right_padded=right_padded, pads=(p_b, p_l, pad_dest[p_b, p_l]))

    def move(self, t: torch.Tensor, fill, lead: int = 0) -> torch.Tensor:
        """``t`` [*lead dims, B, L, ...] re-packed to [*lead dims, bsz, new_len, ...]: the kept
        columns moved to their destinations, every other entry ``fill``; ``fill="pad"``: the
        new padding holds what the unpruned prompt had at its padding (its columns counted
        from the padded edge; beyond them the row's edge column)."""
        keep_lead = (slice(None),) * lead
        shape = tuple(t.shape[:lead]) + (self.bsz, self.new_len) + tuple(t.shape[lead + 2:])
        if isinstance(fill, str):
            edge = t.select(lead + 1, -1 if self.right_padded else 0).unsqueeze(lead + 1)
            out = edge.expand(shape).clone()
            p_b, p_l, p_dest = self.pads
            out[keep_lead + (p_b, p_dest)] = t[keep_lead + (p_b, p_l)]
        else:
            out = t.new_full(shape, fill)
        out[keep_lead + (self.rows, self.dest)] = t[keep_lead + (self.rows, self.src)]
        return out


@dataclass
class _DecodeState:
    orig_len: int                 # prompt length before pruning
    cols: _Columns                # the prompt's pruned layout
    mask: torch.Tensor            # [B, pruned_len] attention mask of the pruned prompt
    next_pos: torch.Tensor        # [B] or [R, B]: position ids of the first generated token


@dataclass
class _Units:
    """The prunable tokens packed in unit order, as the selector takes them."""
    packed: torch.Tensor          # [T, H]
    counts: list                  # tokens per unit
    rows: torch.Tensor            # [U] batch row of each unit
    slots: torch.Tensor           # [T, 2] (row, column) of each packed token

    @classmethod
    def of(cls, visual: Visual) -> "_Units":
        slots = (visual.units >= 0).nonzero()                          # row-major
        ids = visual.units[slots[:, 0], slots[:, 1]]
        n_units = int(ids.max()) + 1 if ids.numel() else 0
        counts = torch.bincount(ids, minlength=n_units)
        if not bool((ids[1:] >= ids[:-1]).all()) or bool((counts == 0).any()):
            raise AssertionError("family adapter: units must be numbered 0, 1, ... in row-major order")
        ends = torch.cumsum(counts, 0)
        first_row, last_row = slots[ends - counts, 0], slots[ends - 1, 0]
        split = (first_row != last_row).nonzero()
        if split.numel():
            u = int(split[0])
            raise ValueError(f"prune_visual_tokens: the {int(counts[u])} placeholder tokens of image {u} span "
                             f"prompts {int(first_row[u])} and {int(last_row[u])}; each image's placeholders "
                             "must lie in one prompt.  From generate with num_beams > 1 or "
                             "num_return_sequences > 1 over prompts with different image counts, this is "
                             "generate's expansion: transformers 4.57 repeats each prompt but not its images' "
                             "rows; generate such prompts one at a time (or with one image count), or use "
                             "transformers 5.x")
        return cls(packed=visual.embeds[slots[:, 0], slots[:, 1]], counts=counts.tolist(), rows=first_row,
                   slots=slots)


@dataclass
class VisualTokenPruner:
    """Handle returned by :func:`enable_visual_token_pruning` and :func:`prune_visual_tokens`;
    ``remove()`` (or leaving its ``with`` block) restores the model.

    ``spec`` holds the validated budgets and selector (:class:`..selection.Spec`).
    ``last`` describes the latest pruned prefill: ``orig_len`` / ``pruned_len``
    (sequence lengths), ``visual_before`` / ``visual_after`` (visual tokens),
    ``kept_indices`` (flat indices into the packed image features, as returned by
    :func:`mmrprune.select_varlen`), ``cu_seqlens`` / ``cu_k`` (per budget unit), ``video_units``, ``kept_columns``
    (per row, the original sequence columns that survived, in order) and ``right_padded``.
    """
    model: Any
    family: str
    spec: selection.Spec
    importance: Any
    text_reduce: str
    position_bias: Optional[torch.Tensor]
    video_unit: Optional[str] = None
    last: Optional[dict] = None
    adapter: Optional[Family] = None
    # the decode state of each KV cache that holds a pruned prompt (weakly: it goes with the cache)
    _states: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    _pending: Optional[_DecodeState] = None
    _handles: Optional[list] = None
    _sig_params: tuple = ()

    # ------------------------------------------------------------------ lifecycle
    def remove(self) -> None:
        for h in self._handles or ():
            h.remove()
        if self._handles is not None:
            self.model._mmrprune_pruner = None
        self._handles = None
        self._states = weakref.WeakKeyDictionary()
        self._pending = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    # ------------------------------------------------------------------ hook
    def _hook(self, module, args, kwargs):
        if args:
            kwargs = dict(kwargs)
            for name, value in zip(self._sig_params, args):
                if name in kwargs:
                    raise TypeError(f"forward got multiple values for argument {name!r}")
                kwargs[name] = value
        cache = versions.cache_of(kwargs)
        past_len = 0 if cache is None else int(cache.get_seq_length())
        has_visual = self.adapter.carries_visual(kwargs)
        if past_len == 0:
            self._pending = None
            return (), (self._prefill(kwargs) if has_visual else kwargs)
        if has_visual:
            raise NotImplementedError("prune_visual_tokens: images on a non-empty cache (continuing a "
                                      "conversation with new images) is not supported")
        state = self._states.get(cache)
        return (), (self._decode(kwargs, past_len, state) if state is not None else kwargs)

    def _after(self, module, args, kwargs, output):
        """After a pruned prefill: its decode state goes with the cache it filled."""
        if self._pending is not None:
            cache = versions.cache_of(output)
            if cache is not None:
                self._states[cache] = self._pending
            self._pending = None

    # ------------------------------------------------------------------ prefill
    def _prefill(self, kw: dict) -> dict:
        input_ids = kw.get("input_ids")
        if input_ids is None:
            raise ValueError("prune_visual_tokens: the prefill needs input_ids (to find the image tokens)")
        if kw.get("inputs_embeds") is not None:
            raise ValueError("prune_visual_tokens: pass input_ids, not inputs_embeds, with images")
        am = kw.get("attention_mask")
        if am is None:
            am = torch.ones_like(input_ids)
        if not isinstance(am, torch.Tensor) or am.shape != input_ids.shape:
            shape = tuple(am.shape) if isinstance(am, torch.Tensor) else type(am).__name__
            raise ValueError(f"prune_visual_tokens: the prefill takes a 2-D attention mask shaped like input_ids "
                             f"{tuple(input_ids.shape)}, got {shape} (generate builds 4-D masks for static "
                             "caches, which are not supported)")
        visual = self.adapter.merge(kw, input_ids, self.adapter.embed(input_ids))
        positions = self.adapter.positions(kw, input_ids, am)
        if tuple(positions.shape[-2:]) != tuple(input_ids.shape) or positions.ndim not in (2, 3):
            raise ValueError(f"prune_visual_tokens: position_ids of shape {tuple(positions.shape)} do not match "
                             f"input_ids {tuple(input_ids.shape)}")
        units = _Units.of(visual)
        idx, cu, cu_k = self._select(kw, am, visual, units, positions)
        keep = visual.units < 0
        keep[units.slots[idx, 0], units.slots[idx, 1]] = True
        keep &= am != 0
        cols = _Columns.of(keep, am)
        lead = positions.ndim - 2
        # the new padding copies the old one (generate reads a right-padded row's next token
        # off its last column, a padding column: 4.57 numbers padding 1, not 0)
        pruned = PrunedPrompt(visual=visual, keep=keep, embeds=cols.move(visual.embeds, "pad"),
                              attention_mask=cols.move(am, 0), positions=cols.move(positions, "pad", lead=lead),
                              move=cols.move)
        if kw.get("labels") is not None:
            kw["labels"] = cols.move(kw["labels"], -100)
        for key in self.adapter.token_keys:
            if kw.get(key) is not None:
                kw[key] = cols.move(kw[key], 0)
        versions.set_cache_position(kw, 0, cols.new_len)
        self._pending = _DecodeState(orig_len=input_ids.shape[1], cols=cols, mask=pruned.attention_mask,
                                     next_pos=versions.next_position(positions, am))
        self.last = dict(orig_len=input_ids.shape[1], pruned_len=cols.new_len, visual_before=int(units.packed.shape[0]),
                         visual_after=int(idx.numel()), kept_indices=idx, cu_seqlens=cu, cu_k=cu_k,
                         video_units=visual.video_units,
                         kept_columns=[cols.src[cols.rows == b] for b in range(cols.bsz)],
                         right_padded=cols.right_padded)
        return self.adapter.pruned_call(kw, pruned)

    def _select(self, kw, am, visual: Visual, units: _Units, positions: torch.Tensor):
        """``(kept_indices, cu_seqlens, cu_k)``: flat indices into the packed tokens (on the
        input's device), the unit offsets (CPU) and the kept offsets (CPU).  Image units take
        the image budget and video units the video budget."""
        cu = selection.offsets(units.counts)
        w = imp.compute(self, kw, am, visual, units.packed, units.counts, units.rows)
        is_video = visual.video_units
        kinds = [False] * len(units.counts) if is_video is None else is_video.tolist()
        grids = None
        if self.spec.selector.needs_grid:
            pos = positions if positions.ndim == 3 else positions[None]
            grids = self.adapter.grids(units.counts, pos[:, units.slots[:, 0], units.slots[:, 1]])
        idx, cu_k = selection.select_items(units.packed, units.counts, [self.spec.budget(v) for v in kinds],
                                           self.spec.selector, grids, w=w)
        return idx.to(units.slots.device), cu, cu_k

    # ------------------------------------------------------------------ decode
    def _decode(self, kw: dict, past_len: int, st: _DecodeState) -> dict:
        x = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        if x is None:
            return kw
        bsz, q = x.shape[0], x.shape[1]
        if bsz != st.cols.bsz:
            raise ValueError(f"prune_visual_tokens: decode batch {bsz} != prefill batch {st.cols.bsz}")
        generated = past_len - st.cols.new_len          # tokens appended to the cache since the prefill
        if generated < 0:
            raise ValueError("prune_visual_tokens: cache shorter than the pruned prompt")
        full, pruned = st.orig_len + generated + q, st.cols.new_len + generated + q
        am = kw.get("attention_mask")
        if am is None:
            am = torch.ones(bsz, full, dtype=st.mask.dtype, device=st.mask.device)
        if not isinstance(am, torch.Tensor) or am.ndim != 2 or am.shape[1] not in (full, pruned):
            shape = tuple(am.shape) if isinstance(am, torch.Tensor) else type(am).__name__
            raise ValueError(f"prune_visual_tokens: a decode step needs a 2-D attention mask over the unpruned "
                             f"({full}) or the pruned ({pruned}) sequence, got {shape} (static caches are not "
                             "supported)")
        if am.shape[1] == full:
            kw["attention_mask"] = torch.cat([st.mask.to(am.dtype), am[:, st.orig_len:]], dim=1)
        for key in self.adapter.token_keys:
            t = kw.get(key)
            if t is not None and t.shape[-1] == full:
                kw[key] = torch.cat([st.cols.move(t[:, :st.orig_len], 0), t[:, st.orig_len:]], dim=1)
        versions.set_cache_position(kw, past_len, q)
        if kw.get("position_ids") is None:
            kw["position_ids"] = st.next_pos[..., None] + generated + torch.arange(q, device=st.next_pos.device)
        return kw


def enable_visual_token_pruning(model, *, keep_ratio: Optional[float] = None, k: Optional[int] = None,
                                method: str = "mmr", lam: Optional[float] = None,
                                importance: Union[str, None, torch.Tensor, Callable] = "norm",
                                backend: str = "auto", text_reduce: str = "max",
                                position_bias: Optional[torch.Tensor] = None,
                                video_k: Optional[int] = None, video_keep_ratio: Optional[float] = None,
                                video_unit: str = "video", **method_params) -> VisualTokenPruner:
    """Make ``model`` prune its visual tokens once per prefill until ``.remove()``.

    Every argument is checked here, with the messages of :func:`mmrprune.select`; on any
    error the model is left as it was.

    Args:
        model: a model of a supported family (docs/integrations.md): LLaVA-1.5
            (``LlavaForConditionalGeneration``), LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL,
            Gemma 3, InternVL, Qwen3-VL or Qwen3-VL-MoE (the ``...ForConditionalGeneration`` classes), on a
            transformers release of the tested
            window (:data:`mmrprune.integrations.hf.versions.REQUIREMENT`).
        keep_ratio / k: at most one; the budget of each image (see :func:`mmrprune.select`).
            Neither: images are merged unpruned (a video budget must then be given).
        video_k / video_keep_ratio: at most one; the budget of each video (``video_unit=
            "video"``: one selection over all its frames) or of each frame of it
            (``video_unit="frame"``).  Neither: videos are merged unpruned.  Families that
            prune videos: Qwen2-VL, Qwen2.5-VL, Qwen3-VL (docs/integrations.md).
        method, lam, backend, **method_params: as :func:`mmrprune.select`; ``d2pruner``'s
            ``grid`` is each image's own patch grid, taken from the model.
        importance: where the raw importance ``w`` comes from:

            * ``"norm"`` (default): L2 norm of each projected visual token;
            * ``"cls"``: [CLS]-to-patch attention of the vision tower at the feature
              layer (LLaVA; the vision tower must run eager attention);
            * ``"debiased_cls"``: ``"cls"`` divided by ``position_bias``
              (see :func:`mmrprune.importance.estimate_position_bias`);
            * ``"text"``: cosine relevance to the prompt's text-token embeddings,
              ``text_reduce="max"`` or ``"mean"`` over text tokens;
            * ``None`` / ``"none"``: no importance (pure diversity for ``mmr``);
            * a float tensor or NumPy array ``[T]``: one score per visual token of the
              packed batch (all images, in order);
            * a callable ``fn(image_features: list[Tensor], context: dict) -> Tensor[T] | list[Tensor]``,
              ``context`` holding ``input_ids``, ``attention_mask``, ``image_rows``,
              ``inputs_embeds`` and ``model``.
    """
    return _enable(model, 2, keep_ratio=keep_ratio, k=k, method=method, lam=lam, importance=importance,
                   backend=backend, text_reduce=text_reduce, position_bias=position_bias, video_k=video_k,
                   video_keep_ratio=video_keep_ratio, video_unit=video_unit, **method_params)


def _enable(model, stacklevel, *, keep_ratio, k, method, lam, importance, backend, text_reduce, position_bias,
            video_k, video_keep_ratio, video_unit, _release_checked=False, **method_params) -> VisualTokenPruner:
    """:func:`enable_visual_token_pruning`; its warnings name the user's line, ``stacklevel`` frames above
    the caller of this function (as :func:`warnings.warn` counts)."""
    fam = family_of(model)
    release = versions.installed()
    tested = _release_checked or versions.check(release, fam)
    importance, position_bias = imp.check(importance, position_bias, text_reduce, stacklevel=stacklevel + 1)
    spec = selection.spec(k=k, keep_ratio=keep_ratio, video_k=video_k, video_keep_ratio=video_keep_ratio,
                          method=method, lam=lam, backend=backend, importance=importance, importance_names=imp.NAMES,
                          device=model.get_input_embeddings().weight.device.type, stacklevel=stacklevel + 1,
                          **method_params)
    video_unit = _check_video_budget(fam, spec, video_unit)
    if spec.selector.needs_grid:
        fam.check_grids()
    if isinstance(importance, str) and importance in imp.CLS_NAMES and not fam.cls_importance:
        from .families import FAMILIES
        able = ", ".join(f.name for f in FAMILIES if f.cls_importance)
        raise ValueError(f"importance: {importance!r} reads the [CLS] attention of the vision tower, which this "
                         f"integration does for {able} models only, not {type(model).__name__}; use 'norm', "
                         "'text', a tensor or a callable")
    if getattr(model, "_mmrprune_pruner", None) is not None:
        raise RuntimeError("prune_visual_tokens: pruning is already enabled on this model")
    if not tested:
        _self_check(model, fam, release, stacklevel + 1)
    pruner = VisualTokenPruner(model=model, family=fam.name, spec=spec, importance=importance,
                               text_reduce=text_reduce, position_bias=position_bias, video_unit=video_unit,
                               adapter=fam(model, video_unit=video_unit),
                               _sig_params=tuple(inspect.signature(model.forward).parameters))
    handles = []
    try:
        if isinstance(importance, str) and importance in imp.CLS_NAMES:
            handles += pruner.adapter.record_cls_attention()
        handles.append(model.register_forward_pre_hook(pruner._hook, with_kwargs=True))
        handles.append(model.register_forward_hook(pruner._after, with_kwargs=True))
    except BaseException:
        for h in handles:
            h.remove()
        raise
    pruner._handles = handles
    model._mmrprune_pruner = pruner
    return pruner


def _check_video_budget(fam, spec: selection.Spec, video_unit):
    """``video_unit`` checked; None when videos stay unpruned."""
    if video_unit not in Family.VIDEO_UNITS:
        raise ValueError(f"video_unit: expected one of {Family.VIDEO_UNITS} (one budget per video, or per frame), "
                         f"got {video_unit!r}")
    if not spec.videos.prunes:
        return None
    if not fam.videos:
        from .families import FAMILIES
        able = ", ".join(f.name for f in FAMILIES if f.videos) or "none"
        raise ValueError(f"video_k / video_keep_ratio: {fam.name} models take no videos this integration prunes; "
                         f"families that prune videos: {able}")
    if fam.videos_transformers:
        from packaging.specifiers import SpecifierSet
        if versions.installed() not in SpecifierSet(fam.videos_transformers):
            raise RuntimeError(f"prune_visual_tokens: {fam.name} videos are not pruned on transformers "
                               f"{versions.installed()}, whose model cannot run them (video budgets need "
                               f"transformers{fam.videos_transformers}); images are")
    return video_unit


def _self_check(model, fam, installed: str, stacklevel: int) -> None:
    """A release newer than the window: the self-check on a tiny model of the family, and
    one warning per model class and release when it passes."""
    from . import selfcheck

    def enable(tiny, **options):
        return _enable(tiny, 1, **{**_DEFAULTS, **options, "_release_checked": True})

    seconds = selfcheck.verify(model, fam, installed, enable)
    if seconds is not None:
        warnings.warn(f"prune_visual_tokens: transformers {installed} is newer than the releases this integration is "
                      f"tested on ({versions.specifier()}); its self-check on a tiny {fam.name} model passed "
                      f"({seconds:.1f} s: pruned prefill against the masked unpruned forward, one cached decode "
                      "step against the uncached recompute), so pruning proceeds", UserWarning,
                      stacklevel=stacklevel + 1)


_DEFAULTS = {name: p.default for name, p in inspect.signature(enable_visual_token_pruning).parameters.items()
             if p.kind is p.KEYWORD_ONLY}


def prune_visual_tokens(model, **kwargs) -> VisualTokenPruner:
    """:func:`enable_visual_token_pruning` (same arguments), for use as a context manager:
    pruning is on from this call, and leaving the block removes it.

        with prune_visual_tokens(model, keep_ratio=0.25, method="mmr", lam=0.5, importance="norm") as p:
            out = model.generate(**inputs)
        print(p.last["orig_len"], "->", p.last["pruned_len"])

    Without ``with`` it works as ``enable`` / ``disable``: ``p = prune_visual_tokens(model,
    k=8)`` prunes every later prefill until ``p.remove()``."""
    return _enable(model, 2, **{**_DEFAULTS, **kwargs})
