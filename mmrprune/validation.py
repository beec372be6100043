"""Argument checks shared by every backend (docs/contract.md, "Bad input").

Every message names the argument, what was expected and what was received.
Shape, dtype and device checks never touch tensor values.  The NaN/Inf scan
runs only with ``check_finite=True``.  Range checks of ``lengths`` /
``cu_seqlens`` (which keep the kernels' memory accesses in bounds) always run
on CPU input, where they cost no device sync, and on accelerator input only
with ``check_finite=True``: with ``check_finite=False`` an accelerator call
makes no host sync and can be captured in a CUDA graph.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from .batch import SelectionBatch
from .reference import D2PRUNER_DEFAULTS, METHODS, budget

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
ORDERS = ("position", "selection")
METHOD_PARAMS = {m: {} for m in METHODS}
METHOD_PARAMS["d2pruner"] = dict(D2PRUNER_DEFAULTS)


@dataclass
class Request:
    """A validated call: the batch plus what is needed to shape the answer."""
    batch: SelectionBatch
    numpy_in: bool
    single_image: bool
    order: str


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"torch.Tensor(shape={tuple(x.shape)}, dtype={x.dtype}, device={x.device})"
    if isinstance(x, np.ndarray):
        return f"numpy.ndarray(shape={x.shape}, dtype={x.dtype})"
    return f"{type(x).__name__} {x!r}"


# ---------------------------------------------------------------------------- scalars
def check_method(method) -> str:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")
    return method


def check_order(order) -> str:
    if not isinstance(order, str) or order not in ORDERS:
        raise ValueError(f"order: expected one of {list(ORDERS)}, got {order!r}")
    return order


def check_lam(lam) -> float:
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
        raise TypeError(f"lam: expected a real number in [0, 1], got {_describe(lam)}")
    lam = float(lam)
    if not (0.0 <= lam <= 1.0):  # also rejects NaN
        raise ValueError(f"lam: expected a value in [0, 1], got {lam}")
    return lam


def check_budget(k, keep_ratio) -> tuple[int | None, float | None]:
    if (k is None) == (keep_ratio is None):
        raise ValueError(f"exactly one of k or keep_ratio must be given, got k={k!r}, keep_ratio={keep_ratio!r}")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"k: expected an int >= 1, got {_describe(k)}")
        if k < 1:
            raise ValueError(f"k: expected an int >= 1, got {k}")
        return int(k), None
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, numbers.Real):
        raise TypeError(f"keep_ratio: expected a float in (0, 1], got {_describe(keep_ratio)}")
    r = float(keep_ratio)
    if not (0.0 < r <= 1.0):
        raise ValueError(f"keep_ratio: expected a value in (0, 1], got {keep_ratio!r}")
    return None, r


def check_method_params(method: str, params: dict) -> dict:
    allowed = METHOD_PARAMS[method]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        hint = f"it takes {sorted(allowed)}" if allowed else "it takes none"
        raise TypeError(f"method {method!r} got unexpected parameter(s) {unknown}; {hint}")
    merged = {**allowed, **params}
    if method == "d2pruner":
        for name in ("pivot_ratio", "alpha"):
            v = merged[name]
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (0.0 <= float(v) <= 1.0):
                raise ValueError(f"{name}: expected a value in [0, 1], got {v!r}")
            merged[name] = float(v)
        tau = merged["tau"]
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not math.isfinite(tau):
            raise ValueError(f"tau: expected a finite real number, got {tau!r}")
        merged["tau"] = float(tau)
        radius = merged["radius"]
        if isinstance(radius, bool) or not isinstance(radius, numbers.Integral) or radius < 0:
            raise ValueError(f"radius: expected an int >= 0, got {radius!r}")
        merged["radius"] = int(radius)
        grid = merged["grid"]
        if grid is not None:
            ok = (isinstance(grid, (tuple, list)) and len(grid) == 2
                  and all(isinstance(g, numbers.Integral) and not isinstance(g, bool) and g >= 1 for g in grid))
            if not ok:
                raise ValueError(f"grid: expected (h, w) with positive ints, got {grid!r}")
            merged["grid"] = (int(grid[0]), int(grid[1]))
        elif merged["alpha"] < 1.0:
            raise ValueError("grid: d2pruner with alpha < 1 needs the patch grid=(h, w) "
                             "for its spatial term; pass grid=(h, w) or alpha=1.0")
    return merged


# ---------------------------------------------------------------------------- tensors
def _as_tensor(x, name: str, numpy_in: bool):
    if isinstance(x, torch.Tensor):
        if numpy_in:
            raise TypeError(f"{name}: features is a numpy array, so {name} must be one too; got {_describe(x)}")
        return x
    if isinstance(x, np.ndarray):
        if not numpy_in:
            raise TypeError(f"{name}: features is a torch.Tensor, so {name} must be one too; got {_describe(x)}")
        if x.dtype.kind not in "fiub":
            raise TypeError(f"{name}: unsupported numpy dtype {x.dtype}")
        if not x.flags.writeable or not x.flags.c_contiguous or x.dtype.byteorder == ">":
            x = np.array(x, dtype=x.dtype.newbyteorder("="), copy=True, order="C")
        return torch.from_numpy(x)
    raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {_describe(x)}")


def _check_float(t: torch.Tensor, name: str):
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float16, bfloat16, float32 or float64 tensor, got dtype {t.dtype}")


def _check_finite(t: torch.Tensor, name: str):
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name}: contains {bad} NaN/Inf value(s); clean the input or pass check_finite=False "
                         "to skip this check (results on non-finite input are then undefined)")


def _index_tensor(x, name: str, numpy_in: bool, device, length: int | None):
    if isinstance(x, (list, tuple)):
        x = torch.as_tensor(x) if len(x) else torch.zeros(0, dtype=torch.int64)
    elif isinstance(x, np.ndarray) or isinstance(x, torch.Tensor):
        x = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    else:
        raise TypeError(f"{name}: expected an int32/int64 tensor, array or list, got {_describe(x)}")
    if x.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name}: expected int32 or int64, got dtype {x.dtype}")
    if x.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D tensor, got shape {tuple(x.shape)}")
    if length is not None and x.shape[0] != length:
        raise ValueError(f"{name}: expected {length} entries, got {x.shape[0]}")
    if isinstance(x, torch.Tensor) and x.device != device and not numpy_in:
        if x.device.type != "cpu":
            raise ValueError(f"{name}: on {x.device}, but features are on {device}")
    return x.to(device=device, dtype=torch.int64)


def _budgets(lengths: torch.Tensor, k, keep_ratio, n_padded: int | None, lengths_given: bool):
    """Per-image budgets ``ks`` and the output width ``k_max`` (see docs/contract.md, "Inputs").

    The width is known without reading ``lengths`` for padded input with ``k``
    (``min(k, N)``) or without ``lengths``; otherwise it is ``max_b ks[b]``,
    which reads the budgets on the host."""
    if k is not None:
        ks = torch.clamp(lengths, max=k)
    else:
        want = torch.round(lengths.to(torch.float64) * keep_ratio).to(torch.int64)  # half-even
        ks = torch.where(lengths > 0, torch.minimum(torch.clamp(want, min=1), lengths), 0)
    if n_padded is not None and (k is not None or not lengths_given):
        width = budget(n_padded, k, keep_ratio)
    else:
        width = int(ks.max().item())
    return ks, width


def validate(features, importance, *, k, keep_ratio, lam, method, lengths=None, cu_seqlens=None,
             order="position", check_finite=True, method_params=None) -> Request:
    """Check every argument and build the :class:`Request` (see docs/contract.md)."""
    method = check_method(method)
    order = check_order(order)
    lam = check_lam(lam)
    k, keep_ratio = check_budget(k, keep_ratio)
    params = check_method_params(method, dict(method_params or {}))
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite: expected a bool, got {_describe(check_finite)}")

    numpy_in = isinstance(features, np.ndarray)
    x = _as_tensor(features, "features", numpy_in)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"features: expected a float16, bfloat16, float32 or float64 "
                        f"{'array' if numpy_in else 'tensor'}, got dtype {x.dtype}")
    packed = cu_seqlens is not None
    if packed:
        if x.ndim != 2:
            raise ValueError(f"features: select_varlen expects packed [T, D] features, got shape {tuple(x.shape)}")
    elif x.ndim not in (2, 3):
        raise ValueError(f"features: expected [N, D] or [B, N, D], got shape {tuple(x.shape)}")
    if x.shape[-2] == 0:
        raise ValueError(f"features: needs at least one token (N >= 1), got shape {tuple(x.shape)}")
    if x.shape[-1] == 0 or (x.ndim == 3 and x.shape[0] == 0):
        raise ValueError(f"features: every dimension must be non-empty, got shape {tuple(x.shape)}")
    device = x.device
    # ranges of lengths / cu_seqlens guard the kernels' memory accesses: always checked
    # where that costs no device sync (CPU); NaN/Inf only when asked (check_finite)
    check_values = check_finite or device.type == "cpu"
    check_nan = check_finite
    # value checks on accelerator input force a host sync: skip them while tracing
    if torch.compiler.is_compiling():
        check_values = check_nan = False

    w = None
    if importance is not None:
        w = _as_tensor(importance, "importance", numpy_in)
        _check_float(w, "importance")
        want = tuple(x.shape[:-1])
        if tuple(w.shape) != want:
            raise ValueError(f"importance: expected shape {list(want)} to match features {tuple(x.shape)}, "
                             f"got {tuple(w.shape)}")
        if w.device != device:
            raise ValueError(f"importance: on {w.device}, but features are on {device}")

    single = (not packed) and x.ndim == 2
    if single:
        x = x.unsqueeze(0)
        w = w.unsqueeze(0) if w is not None else None
        if lengths is not None:
            raise ValueError("lengths: only valid with batched [B, N, D] features")

    n_padded = None
    if packed:
        cu = _index_tensor(cu_seqlens, "cu_seqlens", numpy_in, device, None)
        if cu.shape[0] < 2:
            raise ValueError(f"cu_seqlens: expected [B + 1] entries with B >= 1, got {cu.shape[0]}")
        if check_values:
            cu_host = cu.cpu()
            total = x.shape[0]
            if int(cu_host[0]) != 0 or int(cu_host[-1]) != total or bool((cu_host[1:] < cu_host[:-1]).any()):
                raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to T={total}, "
                                 f"got {cu_host.tolist() if cu_host.numel() <= 16 else 'a tensor that is not'}")
        starts = cu[:-1].contiguous()
        lens = (cu[1:] - cu[:-1]).contiguous()
    else:
        bsz, n = x.shape[0], x.shape[1]
        n_padded = n
        if lengths is None:
            lens = torch.full((bsz,), n, dtype=torch.int64, device=device)
        else:
            lens = _index_tensor(lengths, "lengths", numpy_in, device, bsz)
            if check_values:
                lh = lens.cpu()
                if bool(((lh < 0) | (lh > n)).any()):
                    raise ValueError(f"lengths: expected values in [0, N={n}], got {lh.tolist() if bsz <= 16 else 'out-of-range values'}")
        starts = torch.arange(bsz, dtype=torch.int64, device=device) * n

    if check_nan:
        _check_finite(x, "features")
        if w is not None:
            _check_finite(w, "importance")

    if method == "d2pruner" and params["grid"] is not None and check_values:
        h, gw = params["grid"]
        lh = lens.cpu()
        bad = [int(v) for v in lh.tolist() if v > 0 and v != h * gw]
        if bad:
            raise ValueError(f"grid: (h, w)={params['grid']} covers {h * gw} tokens, but images have {sorted(set(bad))} valid tokens")

    ks, k_max = _budgets(lens, k, keep_ratio, n_padded, lengths is not None)
    batch = SelectionBatch(features=x, weights=w, lengths=lens, starts=starts, ks=ks, k_max=k_max,
                           packed=packed, method=method, lam=lam, params=params)
    return Request(batch=batch, numpy_in=numpy_in, single_image=single, order=order)
