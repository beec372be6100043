"""The ``importance=`` argument of the HF integration: checked when pruning is enabled,
turned into one score per prunable visual token at every pruned prefill."""
from __future__ import annotations

import warnings

import numpy as np
import torch

from ... import importance as imp_mod
from ...validation import NUMPY_FLOAT_DTYPES, _check_dense, _check_float, _describe

NAMES = ("norm", "cls", "debiased_cls", "text", "none")
CLS_NAMES = ("cls", "debiased_cls")
SCORES = "a float torch.Tensor or NumPy array"
ACCEPTED = (f"one of {', '.join(map(repr, NAMES))}, None, {SCORES} [T] (one score per visual token of the "
            "batch) or a callable fn(image_features, context) returning one")


def _scores(x, name: str, source: str) -> torch.Tensor:
    """``x`` as a dense float tensor (shape not checked); errors name ``name`` and say what
    ``source`` gave ("got", "the callable returned")."""
    if isinstance(x, np.ndarray):
        if x.dtype.type not in NUMPY_FLOAT_DTYPES:
            raise TypeError(f"{name}: expected {SCORES}; {source} a NumPy array of dtype {x.dtype}")
        return torch.from_numpy(np.array(x, dtype=x.dtype.newbyteorder("="), copy=True))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected {SCORES}; {source} {_describe(x)}")
    _check_dense(x, name)
    _check_float(x, name)
    return x


def check(importance, position_bias, text_reduce, stacklevel: int = 2):
    """``(importance, position_bias)`` checked for enabling: a name, None, a score tensor
    (its length is checked at the prefill, when the token count is known) or a callable.  A
    ``position_bias`` that ``importance`` does not read warns (``stacklevel`` frames up)."""
    if isinstance(importance, str):
        if importance not in NAMES:
            raise ValueError(f"importance: expected {ACCEPTED}; got {importance!r}")
    elif isinstance(importance, (torch.Tensor, np.ndarray)):
        importance = _scores(importance, "importance", "got")
        if importance.ndim != 1:
            raise ValueError(f"importance: expected a 1-D tensor [T] (one score per visual token of the batch), "
                             f"got shape {tuple(importance.shape)}")
    elif importance is not None and not callable(importance):
        raise TypeError(f"importance: expected {ACCEPTED}; got {_describe(importance)}")
    if text_reduce not in ("max", "mean"):
        raise ValueError(f"text_reduce: expected 'max' or 'mean', got {text_reduce!r}")
    if isinstance(importance, str) and importance == "debiased_cls":
        if position_bias is None:
            raise ValueError("position_bias: importance='debiased_cls' needs it "
                             "(mmrprune.importance.estimate_position_bias on a calibration batch)")
        position_bias = _scores(position_bias, "position_bias", "got")
    elif position_bias is not None:
        shown = repr(importance) if isinstance(importance, str) or importance is None else type(importance).__name__
        warnings.warn(f"position_bias is ignored by importance={shown}: only importance='debiased_cls' reads it",
                      UserWarning, stacklevel=stacklevel + 1)
        position_bias = None
    return importance, position_bias


def compute(pruner, kw: dict, am: torch.Tensor, visual, packed: torch.Tensor, counts: list,
            unit_rows: torch.Tensor):
    """Raw importance ``w`` [T] of the packed prunable tokens (``None``: no importance).

    ``counts`` holds the tokens of each budget unit (packed in order), ``unit_rows`` the
    batch row of each unit, ``am`` the prompt's 2-D attention mask."""
    src = pruner.importance
    n = packed.shape[0]
    if src is None or (isinstance(src, str) and src == "none"):
        return None
    if isinstance(src, torch.Tensor):
        return imp_mod.passthrough(src.to(packed.device), n)
    if src == "norm":
        return imp_mod.token_norm(packed)
    if src in CLS_NAMES:
        w = pruner.adapter.cls_attention(kw, visual).to(packed.device)
        if src == "cls":
            return w
        bias = pruner.position_bias.to(packed.device)
        return imp_mod.debiased_attention(w.view(len(counts), -1), bias).reshape(-1)
    if src == "text":
        return _text(packed, counts, unit_rows, visual, am, pruner.text_reduce)
    out = src(list(packed.split(counts)), dict(input_ids=kw["input_ids"], attention_mask=am, image_rows=unit_rows,
                                               inputs_embeds=visual.embeds, model=pruner.model))
    return imp_mod.passthrough(_callable_scores(out, counts).to(packed.device), n)


def _text(packed, counts, unit_rows, visual, am, reduce):
    """Relevance of each unit's tokens to the text tokens of its own prompt."""
    text_mask = (am != 0) & ~visual.visual
    ws = []
    for f, b in zip(packed.split(counts), unit_rows.tolist()):
        text = visual.embeds[b][text_mask[b]]
        if text.shape[0] == 0:
            raise ValueError(f"prune_visual_tokens: importance='text' but prompt {b} has no text tokens")
        ws.append(imp_mod.text_relevance(f, text, reduce=reduce))
    return torch.cat(ws)


def _callable_scores(out, counts: list) -> torch.Tensor:
    """What a user's callable returned, as one flat score tensor."""
    what = "the callable returned"
    if isinstance(out, (list, tuple)):
        if len(out) != len(counts):
            raise ValueError(f"importance: {what} {len(out)} items; expected a tensor [T] or one tensor per "
                             f"image ({len(counts)} images)")
        parts = [_scores(o, "importance", f"{what} a list holding") for o in out]
        bad = [(i, tuple(p.shape)) for i, (p, c) in enumerate(zip(parts, counts)) if p.numel() != c]
        if bad:
            i, shape = bad[0]
            raise ValueError(f"importance: {what} shape {shape} for image {i}, which has {counts[i]} tokens")
        return torch.cat([p.reshape(-1).to(parts[0].device) for p in parts])
    return _scores(out, "importance", what)
