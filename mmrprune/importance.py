"""Importance sources: the raw ``w`` that :func:`mmrprune.select` normalises per image.

Every function here returns a float32 tensor (NumPy in gives NumPy out) with one
score per visual token; larger means "keep me".  The selection normalises it to
``Imp = (w - min w) / (max w - min w + 1e-6)`` per image, so any positive scale
of a source gives the same selection.

* :func:`token_norm`          L2 norm of each token (no extra inputs, works everywhere).
* :func:`cls_attention`       [CLS]-to-patch attention of a ViT layer (CLIP-style towers).
* :func:`text_relevance`      cosine of each visual token to the prompt's text embeddings
                              (CDPruner-style conditional relevance), ``max`` or ``mean`` over text tokens.
* :func:`estimate_position_bias` / :func:`debiased_attention`
                              D²Pruner-style debiasing: attention divided by the average
                              attention each *position* receives over a calibration batch.
* :func:`passthrough`         a user tensor, checked for shape and finiteness.
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray]

__all__ = ["token_norm", "cls_attention", "text_relevance", "estimate_position_bias",
           "debiased_attention", "passthrough"]


def _as_tensor(x: ArrayLike, name: str) -> tuple[torch.Tensor, bool]:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x), True
    if isinstance(x, torch.Tensor):
        return x, False
    raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _float(t: torch.Tensor, name: str) -> torch.Tensor:
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    return t.float() if t.dtype != torch.float64 else t


def _out(t: torch.Tensor, numpy_in: bool):
    t = t.float()
    return t.cpu().numpy() if numpy_in else t


def token_norm(features: ArrayLike) -> ArrayLike:
    """``w_i = ||x_i||_2`` over the last dim: ``[..., N, D] -> [..., N]`` (accumulated in float32)."""
    x, np_in = _as_tensor(features, "features")
    if x.ndim < 2:
        raise ValueError(f"token_norm: features must be [..., N, D], got shape {tuple(x.shape)}")
    return _out(torch.linalg.vector_norm(_float(x, "features"), dim=-1), np_in)


def cls_attention(attn: ArrayLike, *, cls_index: int = 0, head_reduce: str = "mean") -> ArrayLike:
    """[CLS]-to-patch attention of one ViT layer.

    Args:
        attn: attention probabilities ``[B, heads, 1+N, 1+N]`` (or ``[heads, 1+N, 1+N]``),
            e.g. ``vision_tower(..., output_attentions=True).attentions[layer]``.
        cls_index: row/column of the [CLS] token (0 for CLIP/SigLIP-with-CLS towers).
        head_reduce: ``"mean"`` (default, as FasterVLM/VisionZip) or ``"max"`` over heads.

    Returns:
        ``[B, N]`` (or ``[N]``): attention the [CLS] query pays to each patch, the [CLS]
        column itself removed, patches in their original order.
    """
    a, np_in = _as_tensor(attn, "attn")
    single = a.ndim == 3
    if single:
        a = a.unsqueeze(0)
    if a.ndim != 4 or a.shape[-1] != a.shape[-2] or a.shape[-1] < 2:
        raise ValueError(f"cls_attention: attn must be [B, heads, 1+N, 1+N] with N >= 1, got {tuple(a.shape)}")
    n1 = a.shape[-1]
    if not -n1 <= cls_index < n1:
        raise ValueError(f"cls_attention: cls_index {cls_index} out of range for {n1} tokens")
    cls_index %= n1
    row = _float(a, "attn")[:, :, cls_index, :]                      # [B, H, 1+N]
    keep = [i for i in range(n1) if i != cls_index]
    row = row[..., keep]
    if head_reduce == "mean":
        w = row.mean(dim=1)
    elif head_reduce == "max":
        w = row.amax(dim=1)
    else:
        raise ValueError(f"cls_attention: head_reduce must be 'mean' or 'max', got {head_reduce!r}")
    return _out(w[0] if single else w, np_in)


def text_relevance(visual: ArrayLike, text: ArrayLike, *, reduce: str = "max",
                   text_mask: Optional[ArrayLike] = None) -> ArrayLike:
    """Relevance of each visual token to the prompt (CDPruner-style conditional importance).

    ``w_i = reduce_j cos(v_i, t_j)`` over the text tokens ``t_j`` of the same prompt,
    both taken in the language model's embedding space (visual tokens *after* the
    projector/merger, text tokens from the LLM's input embedding table).

    Args:
        visual: ``[N, D]`` or ``[B, N, D]``.
        text: ``[M, D]`` or ``[B, M, D]`` (same ``D``).
        reduce: ``"max"`` (default: a token matters if it matches *any* prompt word) or
            ``"mean"`` (average agreement with the whole prompt, CDPruner's choice).
        text_mask: optional ``[M]`` / ``[B, M]`` bool, True for real text tokens (padding,
            chat-template tokens you want to ignore -> False).  Every row needs one True.

    Returns:
        ``[N]`` or ``[B, N]`` cosines in ``[-1, 1]``.
    """
    v, np_in = _as_tensor(visual, "visual")
    t, _ = _as_tensor(text, "text")
    single = v.ndim == 2
    if single:
        v = v.unsqueeze(0)
    if t.ndim == 2:
        t = t.unsqueeze(0).expand(v.shape[0], -1, -1)
    if v.ndim != 3 or t.ndim != 3 or v.shape[0] != t.shape[0] or v.shape[-1] != t.shape[-1]:
        raise ValueError(f"text_relevance: visual [B, N, D] and text [B, M, D] must agree, got "
                         f"{tuple(visual.shape)} and {tuple(text.shape)}")
    if t.shape[1] == 0:
        raise ValueError("text_relevance: no text tokens")
    vn = torch.nn.functional.normalize(_float(v, "visual"), dim=-1, eps=1e-12)
    tn = torch.nn.functional.normalize(_float(t, "text").to(vn.device, vn.dtype), dim=-1, eps=1e-12)
    cos = vn @ tn.transpose(1, 2)                                    # [B, N, M]
    if text_mask is None:
        m = torch.ones(cos.shape[0], cos.shape[2], dtype=torch.bool, device=cos.device)
    else:
        m, _ = _as_tensor(text_mask, "text_mask")
        m = m.to(device=cos.device, dtype=torch.bool)
        if m.ndim == 1:
            m = m.unsqueeze(0).expand(cos.shape[0], -1)
        if m.shape != (cos.shape[0], cos.shape[2]):
            raise ValueError(f"text_relevance: text_mask must be [B, M] = {(cos.shape[0], cos.shape[2])}, "
                             f"got {tuple(m.shape)}")
        if not bool(m.any(dim=1).all()):
            raise ValueError("text_relevance: every prompt needs at least one unmasked text token")
    m3 = m.unsqueeze(1)                                              # [B, 1, M]
    if reduce == "max":
        w = cos.masked_fill(~m3, float("-inf")).amax(dim=-1)
    elif reduce == "mean":
        w = (cos * m3).sum(dim=-1) / m3.sum(dim=-1)
    else:
        raise ValueError(f"text_relevance: reduce must be 'max' or 'mean', got {reduce!r}")
    return _out(w[0] if single else w, np_in)


def _attention_rows(attn: torch.Tensor, name: str) -> torch.Tensor:
    """Accept ``[B, N]`` scores or ``[B, heads, 1+N, 1+N]`` maps (-> [CLS] attention)."""
    if attn.ndim == 4:
        attn = cls_attention(attn)
    if attn.ndim != 2 or attn.shape[1] == 0:
        raise ValueError(f"{name}: expected [B, N] attention scores or [B, heads, 1+N, 1+N] maps, "
                         f"got {tuple(attn.shape)}")
    return _float(attn, name)


def estimate_position_bias(attn_batch: ArrayLike, *, eps: float = 1e-12) -> ArrayLike:
    """Positional-bias profile of an attention source, from a calibration batch (D²Pruner).

    Attention-based importance is biased towards some *positions* whatever the image
    shows (e.g. late tokens for a causal LLM query, borders/corners for some ViTs).
    The profile is the attention each position receives on average over many images:
    every sample is first normalised to sum 1 (so images weigh equally), the samples are
    averaged, and the profile is scaled to mean 1.

    Args:
        attn_batch: ``[B, N]`` attention scores (B calibration images, same N) or
            ``[B, heads, 1+N, 1+N]`` ViT maps (reduced with :func:`cls_attention`).

    Returns:
        ``[N]`` profile with mean 1, to pass to :func:`debiased_attention`.
    """
    a, np_in = _as_tensor(attn_batch, "attn_batch")
    a = _attention_rows(a, "estimate_position_bias")
    if not torch.isfinite(a).all() or bool((a < 0).any()):
        raise ValueError("estimate_position_bias: attention must be finite and non-negative")
    a = a / a.sum(dim=1, keepdim=True).clamp_min(eps)
    prof = a.mean(dim=0)
    prof = prof / prof.mean().clamp_min(eps)
    return _out(prof, np_in)


def debiased_attention(attn: ArrayLike, position_bias: ArrayLike, *, eps: float = 1e-6) -> ArrayLike:
    """D²Pruner-style debiased importance: ``w_i = a_i / (bias_i + eps)``.

    Args:
        attn: ``[N]``, ``[B, N]`` scores or ``[B, heads, 1+N, 1+N]`` maps.
        position_bias: ``[N]`` profile from :func:`estimate_position_bias` (any positive scale).
        eps: guard for positions that never received attention during calibration.
    """
    a, np_in = _as_tensor(attn, "attn")
    b, _ = _as_tensor(position_bias, "position_bias")
    single = a.ndim == 1
    a = _attention_rows(a.unsqueeze(0) if single else a, "debiased_attention")
    b = _float(b, "position_bias").to(a.device)
    if b.ndim != 1 or b.shape[0] != a.shape[1]:
        raise ValueError(f"debiased_attention: position_bias must be [N] = [{a.shape[1]}], got {tuple(b.shape)}")
    if bool((b < 0).any()) or not torch.isfinite(b).all():
        raise ValueError("debiased_attention: position_bias must be finite and non-negative")
    w = a / (b.to(a.dtype) + eps)
    return _out(w[0] if single else w, np_in)


def passthrough(importance: ArrayLike, n: int) -> torch.Tensor:
    """A user-supplied importance, checked: 1-D, ``n`` finite floating-point entries."""
    t, _ = _as_tensor(importance, "importance")
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"importance: expected a 1-D tensor of {n} scores (one per visual token), "
                         f"got shape {tuple(t.shape)}")
    t = _float(t, "importance")
    if not torch.isfinite(t).all():
        raise ValueError("importance: contains NaN or Inf")
    return t
