"""One-shot visual-token pruning for Hugging Face transformers VLMs.

    import mmrprune.integrations as mi
    with mi.prune_visual_tokens(model, keep_ratio=0.25, method="mmr", lam=0.5, importance="norm"):
        out = model.generate(**inputs, max_new_tokens=32)

Supported: ``LlavaForConditionalGeneration`` (llava-1.5 family) and
``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration``
(transformers 5.x).

How it works.  A forward *pre-hook* on the model rewrites the inputs of every
call that carries images on an empty cache (the prefill):

1. it embeds ``input_ids``, runs the vision tower + projector/merger
   (``get_image_features``) and scatters the image features into the image
   placeholder slots, exactly as the model would;
2. it computes the position ids of the *unpruned* sequence (LLaVA: what the model
   would use; Qwen: M-RoPE 3-D ids from ``get_rope_index``);
3. it selects the visual tokens to keep with :func:`mmrprune.select_varlen`, one
   segment per image (so several images per prompt and batch > 1 are one call);
4. it removes the dropped image columns from embeddings, attention mask, position
   ids (kept tokens keep their *original* positions) and labels, re-pads the rows
   to a common length (left padding unless the batch was right-padded), and calls
   the model with ``inputs_embeds`` / ``position_ids`` / ``attention_mask``.

The decoder never sees the dropped tokens: no attention maps are needed, and any
attention kernel (eager, SDPA, FlashAttention) works.  During decoding (cache not
empty, no new images) the hook maps the caller's attention mask -- which
``generate`` keeps at the unpruned length -- onto the pruned cache, and fills in
position ids that continue the original numbering when the caller gives none.

Returned ``logits`` (and ``hidden_states``) have the *pruned* prefill length.
Not supported: pruning video tokens (videos are merged, never pruned), chunked
prefill, assisted generation, continuing a cache that already holds a pruned
prompt with new images.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch

from .. import importance as imp_mod
from ..api import select_varlen

__all__ = ["prune_visual_tokens", "enable_visual_token_pruning", "VisualTokenPruner", "prefill_flops"]

_LLAVA = ("LlavaForConditionalGeneration",)
_QWEN = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
_IMPORTANCE_NAMES = ("norm", "cls", "debiased_cls", "text", "none")


def _family(model) -> str:
    names = {c.__name__ for c in type(model).__mro__}
    if names & set(_LLAVA):
        return "llava"
    if names & set(_QWEN):
        return "qwen"
    raise TypeError(f"prune_visual_tokens: unsupported model {type(model).__name__}; supported: "
                    f"{', '.join(_LLAVA + _QWEN)}")


def _past_length(past_key_values) -> int:
    if past_key_values is None:
        return 0
    if hasattr(past_key_values, "get_seq_length"):
        return int(past_key_values.get_seq_length())
    raise TypeError("prune_visual_tokens: past_key_values must be a transformers Cache")


def _call_filtered(fn: Callable, **kwargs):
    """Call ``fn`` with the keyword arguments its signature accepts."""
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


@dataclass
class _DecodeState:
    orig_len: int                 # prompt length before pruning
    pruned_len: int               # prompt length after pruning (= cache length after prefill)
    mask: torch.Tensor            # [B, pruned_len] attention mask of the pruned prompt
    next_pos: torch.Tensor        # [B] original position of the first generated token
    rope_rows: int                # 1 (LLaVA) or 3 (Qwen M-RoPE)


@dataclass
class VisualTokenPruner:
    """Handle returned by :func:`enable_visual_token_pruning`; ``remove()`` restores the model.

    ``last`` describes the latest pruned prefill: ``orig_len`` / ``pruned_len``
    (sequence lengths), ``visual_before`` / ``visual_after`` (visual tokens),
    ``kept_indices`` (flat indices into the packed image features, as returned by
    :func:`mmrprune.select_varlen`), ``cu_seqlens`` / ``cu_k``, ``kept_columns``
    (per row, the original sequence columns that survived, in order).
    """
    model: Any
    family: str
    k: Optional[int]
    keep_ratio: Optional[float]
    method: str
    lam: Optional[float]
    importance: Any
    backend: str
    text_reduce: str
    position_bias: Optional[torch.Tensor]
    method_params: dict
    last: Optional[dict] = None
    _state: Optional[_DecodeState] = None
    _handle: Any = None
    _sig_params: list = field(default_factory=list)
    _attn_store: list = field(default_factory=list)

    # ------------------------------------------------------------------ lifecycle
    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._state = None

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
        past_len = _past_length(kwargs.get("past_key_values"))
        # generate() runs get_image_features itself and passes the result as mm_encoder_outputs
        has_images = kwargs.get("pixel_values") is not None or \
            (kwargs.get("mm_encoder_outputs") or {}).get("image") is not None
        if past_len == 0:
            self._state = None
            if has_images:
                return (), self._prefill(kwargs)
            return (), kwargs
        if has_images:
            raise NotImplementedError("prune_visual_tokens: images on a non-empty cache (continuing a "
                                      "conversation with new images) is not supported")
        if self._state is not None:
            return (), self._decode(kwargs, past_len)
        return (), kwargs

    # ------------------------------------------------------------------ decode
    def _decode(self, kw: dict, past_len: int) -> dict:
        st = self._state
        x = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        if x is None:
            return kw
        bsz, q = x.shape[0], x.shape[1]
        if bsz != st.mask.shape[0]:
            raise ValueError(f"prune_visual_tokens: decode batch {bsz} != prefill batch {st.mask.shape[0]}")
        generated = past_len - st.pruned_len            # tokens appended to the cache since the prefill
        if generated < 0:
            raise ValueError("prune_visual_tokens: cache shorter than the pruned prompt")
        am = kw.get("attention_mask")
        dev = st.mask.device
        if am is None:
            tail = torch.ones(bsz, generated + q, dtype=st.mask.dtype, device=dev)
            kw["attention_mask"] = torch.cat([st.mask, tail], dim=1)
        elif am.ndim == 2 and am.shape[1] == st.orig_len + generated + q:
            kw["attention_mask"] = torch.cat([st.mask.to(am.dtype), am[:, st.orig_len:]], dim=1)
        if kw.get("position_ids") is None:
            pos = st.next_pos[:, None] + generated + torch.arange(q, device=dev)[None, :]
            if st.rope_rows > 1:
                pos = pos.unsqueeze(0).expand(st.rope_rows, -1, -1)
            kw["position_ids"] = pos
        return kw

    # ------------------------------------------------------------------ prefill
    def _prefill(self, kw: dict) -> dict:
        """The prefill call rewritten with the pruned prompt (steps 1-4 of the module docstring)."""
        prompt = self._embed_prompt(kw)
        positions = self._positions(kw, prompt.input_ids, prompt.embeds, prompt.am)   # [B, L] or [R, B, L]
        idx, cu, cu_k, img_pos = self._select_visual(prompt)
        cols = _kept_columns(prompt, idx, img_pos)
        new_embeds = _move_columns(prompt.embeds, cols, 0)
        new_am = prompt.am.new_zeros(cols.bsz, cols.new_len)
        new_am[cols.rows, cols.dest] = 1
        new_pos = _move_columns(positions, cols, 0, lead=positions.ndim - 2)
        labels = kw.get("labels")
        if labels is not None:
            kw["labels"] = _move_columns(labels, cols, -100)
        self._remember(prompt, positions, new_am, cols, idx, cu, cu_k)
        return _rewritten_call(kw, new_embeds, new_am, new_pos)

    def _embed_prompt(self, kw: dict) -> "_Prompt":
        """Embed ``input_ids`` and scatter the image (and video) features into their slots."""
        model = self.model
        input_ids = kw.get("input_ids")
        if input_ids is None:
            raise ValueError("prune_visual_tokens: the prefill needs input_ids (to find the image tokens)")
        if kw.get("inputs_embeds") is not None:
            raise ValueError("prune_visual_tokens: pass input_ids, not inputs_embeds, with images")
        bsz, seqlen = input_ids.shape
        embeds = model.model.get_input_embeddings()(input_ids)
        dev = embeds.device
        am = kw.get("attention_mask")
        if am is None:
            am = torch.ones(bsz, seqlen, dtype=torch.long, device=dev)
        if am.ndim != 2:
            raise ValueError("prune_visual_tokens: only 2-D attention masks are supported at the prefill")

        image_mask = input_ids == model.config.image_token_id
        feats, cls_attn = self._image_features(kw)
        feats = [f.to(dev, embeds.dtype) for f in feats]
        packed = torch.cat(feats, dim=0)
        n_img_tok = int(image_mask.sum())
        if n_img_tok != packed.shape[0]:
            raise ValueError(f"prune_visual_tokens: {n_img_tok} image tokens in input_ids but "
                             f"{packed.shape[0]} image features")
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), packed)
        embeds, video_mask = self._scatter_videos(kw, input_ids, embeds)
        return _Prompt(input_ids=input_ids, embeds=embeds, am=am, image_mask=image_mask,
                       visual_mask=image_mask | video_mask, feats=feats, packed=packed, cls_attn=cls_attn)

    def _scatter_videos(self, kw: dict, input_ids, embeds):
        """Video features in their slots (merged, never pruned), and the mask of those slots."""
        video_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        vout = (kw.get("mm_encoder_outputs") or {}).get("video")
        if vout is None and self.family == "qwen" and kw.get("pixel_values_videos") is not None:
            vout = self.model.model.get_video_features(kw["pixel_values_videos"], kw.get("video_grid_thw"),
                                                       return_dict=True)
        if vout is not None:
            vfeat = torch.cat(list(vout.pooler_output), dim=0).to(embeds.device, embeds.dtype)
            video_mask = input_ids == self.model.config.video_token_id
            embeds = embeds.masked_scatter(video_mask.unsqueeze(-1), vfeat)
        return embeds, video_mask

    def _select_visual(self, prompt: "_Prompt"):
        """The visual tokens to keep, one segment per image: flat indices into the packed features
        (on the device of ``img_pos``), the segment offsets ``cu``, ``cu_k`` and ``img_pos``, the
        [batch row, column] of every image token in feature order."""
        feats = prompt.feats
        lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.int64)
        cu = torch.zeros(len(feats) + 1, dtype=torch.int64)
        cu[1:] = torch.cumsum(lengths, 0)
        img_pos = prompt.image_mask.nonzero()                            # [T, 2] row-major = feature order
        img_rows = img_pos[cu[:-1].to(img_pos.device), 0]                # batch row of each image
        w = self._importance(prompt.packed, feats, prompt.cls_attn, prompt.embeds, prompt.input_ids, prompt.am,
                             prompt.visual_mask, img_rows)
        idx, cu_k = select_varlen(prompt.packed, w, cu.to(prompt.embeds.device), k=self.k,
                                  keep_ratio=self.keep_ratio, lam=self.lam, method=self.method,
                                  backend=self.backend, **self.method_params)
        return idx.to(img_pos.device), cu, cu_k, img_pos

    def _remember(self, prompt: "_Prompt", positions, new_am, cols: "_Columns", idx, cu, cu_k) -> None:
        """The state the decode steps need, and ``last`` (the report of this prefill)."""
        valid_pos = positions if positions.ndim == 3 else positions.unsqueeze(0)
        next_pos = valid_pos.amax(dim=(0, 2)) + 1                        # [B], unpruned numbering
        seqlen = prompt.input_ids.shape[1]
        self._state = _DecodeState(orig_len=seqlen, pruned_len=cols.new_len, mask=new_am, next_pos=next_pos,
                                   rope_rows=3 if self.family == "qwen" else 1)
        if self.family == "qwen":
            self.model.model.rope_deltas = (next_pos - new_am.long().sum(dim=1)).unsqueeze(1)
        kept_columns = [cols.src[cols.rows == b] for b in range(cols.bsz)]
        self.last = dict(orig_len=seqlen, pruned_len=cols.new_len, visual_before=int(prompt.packed.shape[0]),
                         visual_after=int(idx.numel()), kept_indices=idx, cu_seqlens=cu, cu_k=cu_k.cpu(),
                         kept_columns=kept_columns, right_padded=cols.right_padded)

    def _image_features(self, kw: dict):
        inner = self.model.model
        want_cls = self.importance in ("cls", "debiased_cls")
        if want_cls and self.family != "llava":
            raise ValueError("prune_visual_tokens: importance='cls' needs a vision tower with a [CLS] token; "
                             "Qwen2-VL's has none (use 'norm', 'text' or a tensor)")
        out = (kw.get("mm_encoder_outputs") or {}).get("image")
        if out is None:
            if self.family == "llava":
                out = inner.get_image_features(pixel_values=kw["pixel_values"],
                                               vision_feature_layer=kw.get("vision_feature_layer"),
                                               vision_feature_select_strategy=kw.get("vision_feature_select_strategy"),
                                               image_sizes=kw.get("image_sizes"), return_dict=True)
            else:
                out = inner.get_image_features(kw["pixel_values"], kw.get("image_grid_thw"), return_dict=True)
        feats = list(out.pooler_output)
        return feats, (self._llava_cls(kw, feats) if want_cls else None)

    # [CLS] attention: forward hooks on the vision tower's attention modules record the
    # attention probabilities of its latest run (ours, or generate()'s pre-encoding).
    def _install_attention_hooks(self):
        vt = self.model.model.vision_tower
        body = getattr(vt, "vision_model", vt)        # CLIPVisionModel wraps a transformer, or is one
        layers = getattr(getattr(body, "encoder", None), "layers", None)
        if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
            raise ValueError("prune_visual_tokens: importance='cls' supports CLIP-style vision towers "
                             "(encoder.layers[i].self_attn) only")
        self._attn_store = [None] * len(layers)

        def reset(module, args, kwargs):
            self._attn_store = [None] * len(layers)

        def make(i):
            def record(module, args, output):
                if isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor):
                    self._attn_store[i] = output[1].detach()
            return record

        hs = [vt.register_forward_pre_hook(reset, with_kwargs=True)]
        hs += [layer.self_attn.register_forward_hook(make(i)) for i, layer in enumerate(layers)]
        return hs

    def _llava_cls(self, kw, feats):
        cfg = self.model.config
        layer = kw.get("vision_feature_layer")
        layer = cfg.vision_feature_layer if layer is None else layer
        if not isinstance(layer, int):
            layer = layer[-1]
        # hidden_states[l] is the output of layer l (1-based); layer l's attention is store[l - 1]
        a = self._attn_store[layer] if layer < 0 else self._attn_store[layer - 1]
        if a is None:
            raise ValueError("prune_visual_tokens: importance='cls' needs the vision tower's attention "
                             "probabilities; load the model with attn_implementation='eager' (at least for "
                             "the vision tower)")
        strategy = kw.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
        w = imp_mod.cls_attention(a) if strategy == "default" else a.float()[:, :, 0, :].mean(dim=1)
        if w.shape[0] != len(feats) or any(w.shape[1] != f.shape[0] for f in feats):
            raise ValueError("prune_visual_tokens: [CLS] attention does not match the image features "
                             "(images split with image_sizes are not supported with importance='cls')")
        return w

    def _positions(self, kw, input_ids, embeds, am):
        pos = kw.get("position_ids")
        bsz, seqlen = input_ids.shape
        if pos is not None:
            if pos.shape[-1] != seqlen:
                raise ValueError(f"prune_visual_tokens: position_ids length {pos.shape[-1]} != {seqlen}")
            if pos.ndim == 2 and pos.shape[0] != bsz:
                pos = pos.expand(bsz, -1)
            return pos
        if self.family == "llava":
            return torch.arange(seqlen, device=embeds.device).unsqueeze(0).expand(bsz, -1)
        pos = _call_filtered(self.model.model.compute_3d_position_ids, input_ids=input_ids,
                             inputs_embeds=embeds, image_grid_thw=kw.get("image_grid_thw"),
                             video_grid_thw=kw.get("video_grid_thw"), attention_mask=am,
                             past_key_values=None, second_per_grid_ts=kw.get("second_per_grid_ts"),
                             mm_token_type_ids=kw.get("mm_token_type_ids"))
        if pos is None:
            raise ValueError("prune_visual_tokens: Qwen2-VL needs mm_token_type_ids (returned by the processor) "
                             "or explicit position_ids to compute M-RoPE positions")
        return pos

    def _importance(self, packed, feats, cls_attn, embeds, input_ids, am, visual_mask, img_rows):
        src = self.importance
        n = packed.shape[0]
        if src is None or (isinstance(src, str) and src == "none"):
            return None
        if isinstance(src, torch.Tensor):
            return imp_mod.passthrough(src.to(packed.device), n)
        if callable(src):
            out = src(feats, dict(input_ids=input_ids, attention_mask=am, image_rows=img_rows,
                                  inputs_embeds=embeds, model=self.model))
            if isinstance(out, (list, tuple)):
                out = torch.cat([torch.as_tensor(o, device=packed.device).reshape(-1) for o in out])
            return imp_mod.passthrough(torch.as_tensor(out, device=packed.device), n)
        if src == "norm":
            return imp_mod.token_norm(packed)
        if src == "cls":
            return cls_attn.reshape(-1).to(packed.device)
        if src == "debiased_cls":
            return imp_mod.debiased_attention(cls_attn.to(packed.device), self.position_bias.to(packed.device)
                                              ).reshape(-1)
        if src == "text":
            text_mask = (am != 0) & ~visual_mask
            ws = []
            for f, b in zip(feats, img_rows.tolist()):
                text = embeds[b][text_mask[b]]
                if text.shape[0] == 0:
                    raise ValueError(f"prune_visual_tokens: importance='text' but prompt {b} has no text tokens")
                ws.append(imp_mod.text_relevance(f, text, reduce=self.text_reduce))
            return torch.cat(ws)
        raise AssertionError(src)


@dataclass
class _Prompt:
    """A prefill's prompt with the image and video features in their slots."""
    input_ids: torch.Tensor       # [B, L]
    embeds: torch.Tensor          # [B, L, H]
    am: torch.Tensor              # [B, L] attention mask (all ones when the caller gave none)
    image_mask: torch.Tensor      # [B, L] image placeholder slots
    visual_mask: torch.Tensor     # [B, L] image or video slots
    feats: list                   # per image, [n_i, H] features
    packed: torch.Tensor          # [sum n_i, H]: feats concatenated (feature order = image-slot order)
    cls_attn: Optional[torch.Tensor]


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


def _kept_columns(prompt: _Prompt, idx, img_pos) -> _Columns:
    """Every non-image column and the selected image columns survive, old padding goes; rows are
    re-padded on the left unless the batch was right-padded."""
    am = prompt.am
    keep = ~prompt.image_mask
    keep[img_pos[idx, 0], img_pos[idx, 1]] = True
    keep &= am != 0
    n_keep = keep.sum(dim=1)
    new_len = int(n_keep.max())
    right_padded = bool((am[:, -1] == 0).any()) and not bool((am[:, 0] == 0).any())
    rank = torch.cumsum(keep.long(), dim=1) - 1
    offset = torch.zeros_like(n_keep) if right_padded else new_len - n_keep
    dest = rank + offset[:, None]
    b_i, l_i = keep.nonzero(as_tuple=True)
    return _Columns(rows=b_i, src=l_i, dest=dest[b_i, l_i], bsz=am.shape[0], new_len=new_len,
                    right_padded=right_padded)


def _move_columns(t: torch.Tensor, cols: _Columns, fill, lead: int = 0) -> torch.Tensor:
    """``t`` [*lead dims, B, L, ...] re-packed to [*lead dims, bsz, new_len, ...]: the kept columns
    moved to their destinations, every other entry ``fill``."""
    keep_lead = (slice(None),) * lead
    out = t.new_full(tuple(t.shape[:lead]) + (cols.bsz, cols.new_len) + tuple(t.shape[lead + 2:]), fill)
    out[keep_lead + (cols.rows, cols.dest)] = t[keep_lead + (cols.rows, cols.src)]
    return out


# Multimodal inputs the model would otherwise process again: the pruned call carries embeddings.
_MULTIMODAL_KEYS = ("input_ids", "pixel_values", "image_sizes", "vision_feature_layer",
                    "vision_feature_select_strategy", "image_grid_thw", "pixel_values_videos",
                    "video_grid_thw", "second_per_grid_ts", "mm_token_type_ids", "mm_encoder_outputs")


def _rewritten_call(kw: dict, embeds, am, positions) -> dict:
    for key in _MULTIMODAL_KEYS:
        kw.pop(key, None)
    kw["inputs_embeds"] = embeds
    kw["attention_mask"] = am
    kw["position_ids"] = positions
    return kw


def enable_visual_token_pruning(model, *, keep_ratio: Optional[float] = None, k: Optional[int] = None,
                                method: str = "mmr", lam: Optional[float] = None,
                                importance: Union[str, None, torch.Tensor, Callable] = "norm",
                                backend: str = "auto", text_reduce: str = "max",
                                position_bias: Optional[torch.Tensor] = None,
                                **method_params) -> VisualTokenPruner:
    """Make ``model`` prune its visual tokens once per prefill until ``.remove()``.

    Args:
        model: a ``LlavaForConditionalGeneration``, ``Qwen2VLForConditionalGeneration`` or
            ``Qwen2_5_VLForConditionalGeneration``.
        keep_ratio / k: exactly one; per image (see :func:`mmrprune.select`).
        method, lam, backend, **method_params: as :func:`mmrprune.select`.
        importance: where the raw importance ``w`` comes from:

            * ``"norm"`` (default): L2 norm of each projected visual token;
            * ``"cls"``: [CLS]-to-patch attention of the vision tower at the feature
              layer (LLaVA; the vision tower must run eager attention);
            * ``"debiased_cls"``: ``"cls"`` divided by ``position_bias``
              (see :func:`mmrprune.importance.estimate_position_bias`);
            * ``"text"``: cosine relevance to the prompt's text-token embeddings,
              ``text_reduce="max"`` or ``"mean"`` over text tokens;
            * ``None`` / ``"none"``: no importance (pure diversity for ``mmr``);
            * a tensor ``[T]``: one score per visual token of the packed batch (all images, in order);
            * a callable ``fn(image_features: list[Tensor], context: dict) -> Tensor[T] | list[Tensor]``,
              ``context`` holding ``input_ids``, ``attention_mask``, ``image_rows``,
              ``inputs_embeds`` and ``model``.
    """
    family = _family(model)
    if (k is None) == (keep_ratio is None):
        raise ValueError("prune_visual_tokens: give exactly one of k or keep_ratio")
    if isinstance(importance, str) and importance not in _IMPORTANCE_NAMES:
        raise ValueError(f"prune_visual_tokens: importance must be one of {_IMPORTANCE_NAMES}, a tensor, "
                         f"a callable or None; got {importance!r}")
    if importance == "debiased_cls":
        if position_bias is None:
            raise ValueError("prune_visual_tokens: importance='debiased_cls' needs position_bias "
                             "(mmrprune.importance.estimate_position_bias on a calibration batch)")
        position_bias = torch.as_tensor(position_bias)
    if text_reduce not in ("max", "mean"):
        raise ValueError(f"prune_visual_tokens: text_reduce must be 'max' or 'mean', got {text_reduce!r}")
    if getattr(model, "_mmrprune_pruner", None) is not None:
        raise RuntimeError("prune_visual_tokens: pruning is already enabled on this model")
    pruner = VisualTokenPruner(model=model, family=family, k=k, keep_ratio=keep_ratio, method=method, lam=lam,
                               importance=importance, backend=backend, text_reduce=text_reduce,
                               position_bias=position_bias, method_params=method_params)
    pruner._sig_params = list(inspect.signature(model.forward).parameters)
    handles = [model.register_forward_pre_hook(pruner._hook, with_kwargs=True)]
    if importance in ("cls", "debiased_cls"):
        if family != "llava":
            raise ValueError("prune_visual_tokens: importance='cls' needs a vision tower with a [CLS] token; "
                             "Qwen2-VL's has none (use 'norm', 'text' or a tensor)")
        handles += pruner._install_attention_hooks()

    class _Handle:
        def remove(self_inner):
            for h in handles:
                h.remove()
            model._mmrprune_pruner = None

    pruner._handle = _Handle()
    model._mmrprune_pruner = pruner
    return pruner


@contextlib.contextmanager
def prune_visual_tokens(model, **kwargs):
    """Context manager around :func:`enable_visual_token_pruning`; yields the :class:`VisualTokenPruner`.

        with prune_visual_tokens(model, keep_ratio=0.25, method="mmr", lam=0.5, importance="norm") as p:
            out = model.generate(**inputs)
        print(p.last["orig_len"], "->", p.last["pruned_len"])
    """
    pruner = enable_visual_token_pruning(model, **kwargs)
    try:
        yield pruner
    finally:
        pruner.remove()


def prefill_flops(text_config, seq_len: int) -> int:
    """Matmul FLOPs of one prefill of ``seq_len`` tokens through a Llama/Qwen2-style decoder.

    Per layer: q/k/v/o projections ``2 L h (2 h_q + 2 h_kv)``, gated MLP ``6 L h i``,
    causal attention scores + weighted sum counted dense ``4 L^2 h_q`` (SDPA computes the
    full square); plus the LM head on the last token only is ignored.  ``h_q = heads *
    head_dim``, ``h_kv = kv_heads * head_dim``.  The projection/MLP part is exactly
    proportional to ``seq_len``; attention grows with its square.
    """
    h = text_config.hidden_size
    heads = text_config.num_attention_heads
    kv = getattr(text_config, "num_key_value_heads", None) or heads
    hd = getattr(text_config, "head_dim", None) or h // heads
    hq, hkv = heads * hd, kv * hd
    inter = text_config.intermediate_size
    n = int(seq_len)
    per_layer = 2 * n * h * (2 * hq + 2 * hkv) + 6 * n * h * inter + 4 * n * n * hq
    return int(text_config.num_hidden_layers * per_layer)
