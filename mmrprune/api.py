"""Public entry points: :func:`select`, :func:`select_varlen`, :func:`prune`.

NumPy in gives NumPy out; torch in gives torch out on the input's device.
Inputs are never modified.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import numpy as np
import torch

from . import dispatch, workspace
from .backends import check_tuning
from .reference import DEFAULT_LAM, LAM_METHODS, METHODS
from .validation import Request, check_flag, validate, warn_lam_ignored

ArrayLike = Union[torch.Tensor, np.ndarray]


def _run(request: Request, backend: str, workspace_limit=None, tuning=None) -> tuple[torch.Tensor, dict]:
    """``(indices [B, k_max], stats)``; a backend returns either the indices or ``(indices, stats)``.
    ``tuning`` (:func:`check_tuning`'s dict) reaches only a backend that lists the options."""
    batch = request.batch
    chosen = dispatch.loaded(dispatch.resolve_name(backend, batch.device.type, batch.method))
    tuning = tuning or check_tuning("auto", None)
    options = {name: v for name, v in tuning.items() if name in chosen.options}
    if not torch.compiler.is_compiling():  # checked once, eagerly; a traced graph was checked when first run
        workspace.check(chosen, batch, workspace_limit, sim=tuning["sim"], max_round=tuning["max_round"])
    out = chosen.select(batch, **options)
    out, stats = out if isinstance(out, tuple) else (out, {})
    if request.order == "position":
        out = _position_order(out)
    return out, stats


_UNSIGNED_SORT: dict = {}   # device type -> whether torch sorts uint64 there


def _sorts_uint64(device: torch.device) -> bool:
    if device.type not in _UNSIGNED_SORT:
        try:
            torch.sort(torch.zeros((1, 2), dtype=torch.uint64, device=device), dim=1)
            _UNSIGNED_SORT[device.type] = True
        except (RuntimeError, NotImplementedError, TypeError):
            _UNSIGNED_SORT[device.type] = False
    return _UNSIGNED_SORT[device.type]


def _position_order(out: torch.Tensor) -> torch.Tensor:
    """Each row ascending with its -1 padding last.  Read as uint64, -1 is the largest value,
    so one sort does it (one launch instead of five); a device or a tracer without uint64
    sorting takes the int64 route."""
    if not torch.compiler.is_compiling() and _sorts_uint64(out.device):
        return torch.sort(out.view(torch.uint64), dim=1).values.view(torch.int64)
    big = torch.iinfo(torch.int64).max
    out = torch.sort(torch.where(out < 0, big, out), dim=1).values
    return torch.where(out == big, -1, out)


def _lam(lam, method):
    """``None`` -> the default; a ``lam`` given to a method whose rule ignores it warns, since
    silently dropping it hides a mistake, while rejecting it would break generic callers."""
    if lam is None:
        return DEFAULT_LAM
    if method in METHODS and method not in LAM_METHODS:
        warn_lam_ignored(lam, method, stacklevel=3)
    return lam


def _to_user(t: torch.Tensor, numpy_in: bool):
    return t.cpu().numpy() if numpy_in else t


def select(features: ArrayLike, importance: Optional[ArrayLike] = None, *, k: Optional[int] = None,
           keep_ratio: Optional[float] = None, lam: Optional[float] = None, method: str = "mmr",
           lengths: Optional[ArrayLike] = None, order: str = "position", backend: str = "auto",
           check_finite: bool = True, return_stats: bool = False, workspace_limit=None,
           sim: str = "auto", max_round: Optional[int] = None, **method_params) -> ArrayLike:
    """Pick the visual tokens to keep, per image.

    Args:
        features: ``[N, D]`` or ``[B, N, D]`` tokens (float16/bfloat16/float32/float64).
        importance: raw importance ``w``, ``[N]`` / ``[B, N]``, or ``None`` (all zeros).
            Normalised per image to ``Imp = (w - min w) / (max w - min w + 1e-6)``.
        k / keep_ratio: exactly one.  ``k_b = min(k, N_b)`` or
            ``k_b = max(1, round_half_even(keep_ratio * N_b))``.
        lam: MMR trade-off in [0, 1] (default 0.5); ``score_i = lam * Imp_i - (1 - lam) * max_{j in S} sim(i, j)``.
            Only ``mmr`` and ``hybrid`` use it; given to another method it warns (``UserWarning``).
        method: ``mmr``, ``divprune``, ``topk``, ``fps``, ``hybrid``, ``dpp`` or ``d2pruner``.
        lengths: ``[B]`` valid tokens per image of a padded batch (positions ``>= lengths[b]`` are never picked).
        order: ``"position"`` (ascending token index) or ``"selection"`` (greedy order).
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"``, ``"torch"``, ``"numpy"`` or ``"cuda_emu"`` (the CUDA kernels on CPU tensors through an emulator; tests only).
        check_finite: reject NaN/Inf, features whose squared norms would overflow, importance whose
            per-image range overflows (and out-of-range ``lengths`` on accelerator input);
            ``False`` keeps the call free of host syncs (CUDA-graph capture).
        return_stats: also return a dict of what the backend measured while selecting
            (see Returns).
        workspace_limit: the most scratch memory the call may need, in bytes (an int, or a string
            such as ``"512M"``, ``"8G"``; ``"unlimited"``); a call past it raises
            ``mmrprune.workspace.WorkspaceLimitError`` before allocating anything.  Default: the
            environment variable ``MMRPRUNE_MAX_WORKSPACE``, else 4 GiB.  :func:`workspace_bytes`
            gives the estimate it is compared with.
        sim: kernel tuning of ``cuda``, ``cuda_emu`` and ``triton``: where the fused kernels read
            similarity rows: ``"auto"`` (a Gram matrix while it fits the kernel's bound, else
            rows), ``"gram"`` (always; may need more memory) or ``"rows"`` (recomputed from the
            features each step).  The picks are the same; backends without the choice ignore it.
        max_round: kernel tuning of the same backends' mmr/fps/hybrid/divprune kernels: the most
            picks one round may commit, ``None`` (the kernel's default, 8) or 1..8 (1: one
            pick per step).  The picks are the same; only ``stats["rounds"]`` and speed change.
        **method_params: ``d2pruner``'s ``pivot_ratio``, ``alpha``, ``tau``, ``radius``, ``grid``.

    Returns:
        int64 indices ``[k]`` for ``[N, D]`` input, else ``[B, k_max]`` with rows
        padded by -1 where ``k_b < k_max``.  ``k_max = min(k, N)`` for padded input
        with ``k`` (static, no host sync), else ``max_b k_b``.
        With ``return_stats=True``: ``(indices, stats)``.  ``stats["rounds"]`` (int64,
        ``[B]``, or a scalar for ``[N, D]`` input) is the number of sequential rounds each
        image took, on backends that select in exact multi-pick rounds (``triton``,
        ``cuda``, ``cuda_emu``, ``numpy``); a backend that does not count leaves the key out.

    Selection is not differentiable: features that require grad are read as detached
    values, and neither the indices nor the stats carry an autograd graph.
    """
    return_stats = check_flag(return_stats, "return_stats")
    tuning = check_tuning(sim, max_round)
    request = validate(features, importance, k=k, keep_ratio=keep_ratio, lam=_lam(lam, method), method=method,
                       lengths=lengths, order=order, check_finite=check_finite, method_params=method_params)
    out, stats = _run(request, backend, workspace_limit, tuning)
    if request.single_image:
        out = out[0]
    out = _to_user(out, request.numpy_in)
    if not return_stats:   # a backend may compute a statistic only when it is read
        return out
    if request.single_image:
        stats = {name: v[0] for name, v in stats.items()}
    return out, {name: _to_user(v, request.numpy_in) for name, v in stats.items()}


def _is_offsets(x) -> bool:
    """True for what looks like ``cu_seqlens`` (integer tensor, array or list), not importance."""
    if isinstance(x, torch.Tensor):
        return x.dtype in (torch.int32, torch.int64)
    if isinstance(x, np.ndarray):
        return x.dtype.kind in ("i", "u")
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(v, int) for v in x)


def select_varlen(features: ArrayLike, importance: Optional[ArrayLike] = None, cu_seqlens: ArrayLike = None, *,
                  k: Optional[int] = None, keep_ratio: Optional[float] = None, lam: Optional[float] = None,
                  method: str = "mmr", order: str = "position", backend: str = "auto",
                  check_finite: bool = True, return_stats: bool = False, workspace_limit=None,
                  sim: str = "auto", max_round: Optional[int] = None, **method_params):
    """Selection over a packed batch: image ``b`` is ``features[cu_seqlens[b]:cu_seqlens[b+1]]``.

    ``importance`` is ``[T]`` or ``None`` (all zeros), as in :func:`select`; ``cu_seqlens``
    is required (``select_varlen(features, None, cu_seqlens, ...)`` or ``cu_seqlens=...``).
    The other keywords are :func:`select`'s, except ``lengths``: the offsets are the images'
    boundaries.

    Returns ``(indices, cu_k)``: ``indices`` are flat int64 row indices *into the
    packed tensor* (so ``features[indices]`` gathers the kept tokens), image b's
    in ``indices[cu_k[b]:cu_k[b+1]]``; ``cu_k [B+1]`` int64.  Reading the budgets
    back makes this call synchronise with the device once.  With ``return_stats=True``:
    ``(indices, cu_k, stats)``, with ``stats`` as in :func:`select` (``stats["rounds"]``: ``[B]``).
    """
    if "lengths" in method_params:
        raise TypeError("lengths: select_varlen takes each image's length from cu_seqlens (image b is "
                        "features[cu_seqlens[b]:cu_seqlens[b+1]]); lengths is for padded [B, N, D] batches "
                        "in mmrprune.select")
    if cu_seqlens is None:  # else validate() would take the packed [T, D] tensor for one image
        hint = (" (the second positional argument is importance: did you mean "
                "select_varlen(features, None, cu_seqlens, ...)?)" if _is_offsets(importance) else "")
        raise TypeError("cu_seqlens: select_varlen needs the [B + 1] int offsets of the packed images, got None"
                        f"{hint}; for one image or a padded batch call mmrprune.select")
    return_stats = check_flag(return_stats, "return_stats")
    tuning = check_tuning(sim, max_round)
    request = validate(features, importance, k=k, keep_ratio=keep_ratio, lam=_lam(lam, method), method=method,
                       cu_seqlens=cu_seqlens, order=order, check_finite=check_finite, method_params=method_params)
    batch = request.batch
    local, stats = _run(request, backend, workspace_limit, tuning)
    kept = local >= 0
    flat = (local + batch.starts[:, None])[kept]
    cu_k = torch.zeros(batch.batch_size + 1, dtype=torch.int64, device=batch.device)
    cu_k[1:] = torch.cumsum(batch.ks, dim=0)
    out = _to_user(flat, request.numpy_in), _to_user(cu_k, request.numpy_in)
    if not return_stats:
        return out
    return *out, {name: _to_user(v, request.numpy_in) for name, v in stats.items()}


def prune(features: ArrayLike, importance: Optional[ArrayLike] = None, **kwargs):
    """``(kept_features, indices)``: :func:`select` in positional order, then the gather.

    ``kept_features`` is ``[k, D]`` or ``[B, k_max, D]``; rows whose index is -1
    (images with fewer than ``k_max`` kept tokens) are zeros.  Takes every
    keyword of :func:`select` except ``order``.  With ``return_stats=True``:
    ``(kept_features, indices, stats)``, ``stats`` as :func:`select` returns it.

    The gather is an ordinary torch op: for features that require grad, ``kept_features``
    carries the gradient to the kept rows (the indices themselves are not differentiable).
    """
    if "order" in kwargs:
        raise TypeError("prune: always gathers in positional order; it takes no 'order' argument")
    return_stats = check_flag(kwargs.pop("return_stats", False), "return_stats")
    idx, stats = select(features, importance, return_stats=True, **kwargs)
    if isinstance(features, np.ndarray):
        safe = np.where(idx < 0, 0, idx)
        kept = np.take_along_axis(features, safe[..., None], axis=-2)
        kept = np.where((idx < 0)[..., None], np.zeros((), features.dtype), kept)
    else:
        safe = idx.clamp_min(0)
        kept = torch.gather(features, -2, safe.unsqueeze(-1).expand(*safe.shape, features.shape[-1]))
        kept = kept.masked_fill((idx < 0).unsqueeze(-1), 0)
    return (kept, idx, stats) if return_stats else (kept, idx)


def _value_free(t):
    """A stand-in for a meta tensor that validation accepts: one zero expanded to its shape
    (no memory), read only for its shape and dtype since value checks are off."""
    if isinstance(t, torch.Tensor) and t.device.type == "meta":
        return torch.zeros((), dtype=t.dtype).expand(t.shape)
    return t


def workspace_bytes(features: ArrayLike, importance: Optional[ArrayLike] = None, *, k: Optional[int] = None,
                    keep_ratio: Optional[float] = None, lam: Optional[float] = None, method: str = "mmr",
                    lengths: Optional[ArrayLike] = None, cu_seqlens: Optional[ArrayLike] = None,
                    backend: str = "auto", sim: str = "auto", max_round: Optional[int] = None,
                    **method_params) -> int:
    """Scratch bytes :func:`select` (or, with ``cu_seqlens``, :func:`select_varlen`) would need
    for these arguments beyond its input and output: the estimate its workspace limit is checked
    against (``workspace_limit=``).  Nothing is selected and no device memory is allocated.

    ``features`` and ``importance`` may be meta tensors (``torch.empty(..., device="meta")``),
    to size a call before the data exists; ``backend`` must then be named (``"cuda"``,
    ``"triton"``, ``"cpu"``, ...), since "auto" picks by the data's device.  The estimate is the
    one a CUDA device would get (a meta tensor is taken as on a GPU).  ``sim`` changes it
    (a Gram matrix or not); ``max_round`` does not.  ``order``,
    ``check_finite`` and ``return_stats`` do not change it and are accepted and ignored."""
    for ignored in ("order", "check_finite", "return_stats", "workspace_limit"):
        method_params.pop(ignored, None)
    tuning = check_tuning(sim, max_round)
    meta = isinstance(features, torch.Tensor) and features.device.type == "meta"
    if meta and backend == "auto":
        raise ValueError("backend: name the backend for meta features (backend='auto' picks by the data's device)")
    request = validate(_value_free(features), _value_free(importance), k=k, keep_ratio=keep_ratio,
                       lam=DEFAULT_LAM if lam is None else lam, method=method, lengths=lengths,
                       cu_seqlens=cu_seqlens, check_finite=False, method_params=method_params)
    batch = request.batch
    if meta:   # the real tensor's layout (a contiguous meta tensor is not copied by the backends)
        x = features.unsqueeze(0) if (cu_seqlens is None and features.ndim == 2) else features
        batch = dataclasses.replace(batch, features=x, _cache={})
        name = backend
        if name not in dispatch.BACKENDS:
            raise ValueError(f"backend: expected one of {list(dispatch.BACKENDS)} for meta features, got {name!r}")
    else:
        name = dispatch.resolve(backend, batch.device.type, batch.method).name
    return workspace.estimate_bytes(name, batch, sim=tuning["sim"], max_round=tuning["max_round"])
