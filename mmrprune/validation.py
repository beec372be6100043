"""Argument checks shared by every backend (docs/contract.md, "Bad input").

Every message names the argument, what was expected and what was received.
Shape, dtype and device checks never touch tensor values.  The NaN/Inf scan,
and the magnitude checks that keep the norms and the importance normalisation
from overflowing (:func:`feature_limit`; docs/api.md, "Size and value limits"), run
only with ``check_finite=True``.  Range checks of ``lengths`` /
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
from .reference import D2PRUNER_DEFAULTS, LAM_METHODS, METHODS, budget

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
ORDERS = ("position", "selection")
# k beyond any token count means "keep every token" (k_b = min(k, N_b)); capping it keeps the
# int64 arithmetic of the budgets exact for k = 2**63 and beyond
K_CAP = 2**62
# d2pruner: a radius beyond any grid side links every pair of tokens; capped to what int64 kernels take
RADIUS_CAP = 2**31 - 1
METHOD_PARAMS = {m: {} for m in METHODS}
METHOD_PARAMS["d2pruner"] = dict(D2PRUNER_DEFAULTS)


@dataclass
class Request:
    """A validated call: the batch plus what is needed to shape the answer."""
    batch: SelectionBatch
    numpy_in: bool
    single_image: bool
    order: str


DESCRIBE_CHARS = 80  # a message quotes at most this much of a value's repr


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"torch.Tensor(shape={tuple(x.shape)}, dtype={x.dtype}, device={x.device})"
    if isinstance(x, np.ndarray):
        return f"numpy.ndarray(shape={x.shape}, dtype={x.dtype})"
    text = repr(x)
    if len(text) > DESCRIBE_CHARS:  # a list of features would otherwise print whole (~100 KB)
        size = f", {len(x)} items" if isinstance(x, (list, tuple, dict, set)) else ""
        text = f"{text[:DESCRIBE_CHARS]}... ({len(text)} characters{size})"
    return f"{type(x).__name__} {text}"


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
    lam = _scalar(lam, "lam", "a real number in [0, 1]", real=True)
    if not (0.0 <= lam <= 1.0):  # also rejects NaN
        raise ValueError(f"lam: expected a value in [0, 1], got {lam}")
    return lam


_LAM_WARNED: set = set()   # call sites already told that their lam is ignored


def warn_lam_ignored(lam, method: str, stacklevel: int) -> None:
    """Warn that ``method`` ignores ``lam``, once per call site (the caller ``stacklevel``
    frames up): a loop or a test suite calling from one line would otherwise repeat it on every
    call and bury other warnings, and the default warning filter's own once-per-line memory is
    reset by every ``warnings.catch_warnings`` block (pytest opens one per test)."""
    import sys
    import warnings

    frame = sys._getframe(stacklevel)
    site = (frame.f_code.co_filename, frame.f_lineno)
    if site in _LAM_WARNED:
        return
    _LAM_WARNED.add(site)
    warnings.warn(f"lam={lam!r} is ignored by method={method!r}: only {' and '.join(LAM_METHODS)} use lam "
                  f"(said once per call site)", UserWarning, stacklevel=stacklevel + 1)


def check_flag(value, name: str) -> bool:
    """An on/off argument (``check_finite``, ``return_stats``): ``True``/``False`` or a NumPy
    bool, as a Python bool.  Nothing else: ``"no"`` or ``1`` would be a guess at what was meant."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool (True or False), got {_describe(value)}")
    return bool(value)


def _scalar(value, name: str, expected: str, real: bool):
    """A scalar as a Python number: a Python or NumPy number, or a 0-d tensor or array (read on
    the host: one sync for an accelerator tensor); an int unless ``real``, which also takes
    floating values and returns a float.  Bools are neither counts nor ratios."""
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
        if isinstance(value, np.ndarray):
            ok = value.dtype.kind in ("iuf" if real else "iu")
        else:
            ok = not (value.is_complex() or value.dtype == torch.bool or value.is_meta
                      or (value.is_floating_point() and not real))
        if ok:
            return float(value.item()) if real else int(value.item())
    elif (isinstance(value, numbers.Real if real else numbers.Integral)
          and not isinstance(value, (bool, np.bool_))):
        return float(value) if real else int(value)
    hint = ("; a tensor or array must be 0-d (one value)"
            if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim > 0 else "")
    raise TypeError(f"{name}: expected {expected}, got {_describe(value)}{hint}")


def check_budget(k, keep_ratio) -> tuple[int | None, float | None]:
    if (k is None) == (keep_ratio is None):
        raise ValueError(f"exactly one of k or keep_ratio must be given, got k={k!r}, keep_ratio={keep_ratio!r}")
    if k is not None:
        k = _scalar(k, "k", "an int >= 1 (a Python int, a NumPy integer or a 0-d integer tensor)", real=False)
        if k < 1:
            raise ValueError(f"k: expected an int >= 1, got {k}")
        return min(k, K_CAP), None
    r = _scalar(keep_ratio, "keep_ratio", "a float in (0, 1]", real=True)
    if not (0.0 < r <= 1.0):  # also rejects NaN
        raise ValueError(f"keep_ratio: expected a value in (0, 1], got {r!r}")
    return None, r


def _call_keywords() -> set:
    """The keyword-only arguments (``lam``, ``keep_ratio``, ...) of the public call being
    validated, where a misspelt one lands in ``**method_params``: read from that call's frame
    on the stack (the innermost ``mmrprune.api`` function), since this lower layer may not import
    the API, and a copied list would go stale."""
    import sys
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") != "mmrprune.api":
        frame = frame.f_back
    if frame is None:
        return set()
    code = frame.f_code
    return set(code.co_varnames[code.co_argcount:code.co_argcount + code.co_kwonlyargcount])


def _did_you_mean(unknown: list, method: str) -> str:
    """``"; did you mean lam= (for lamda=)?"``: the near names among the call's own keywords and
    this method's parameters, and which other method takes a parameter given to the wrong one."""
    import difflib
    known = _call_keywords() | set(METHOD_PARAMS[method])
    near, elsewhere = [], []
    for name in unknown:
        owners = [m for m, p in METHOD_PARAMS.items() if name in p]
        if owners:
            elsewhere.append(f"{name}= belongs to method {' and '.join(map(repr, owners))}")
            continue
        match = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        if match:
            near.append(f"{match[0]}= (for {name}=)")
    return (f"; did you mean {' and '.join(near)}?" if near else "") + \
        "".join(f"; {e}" for e in elsewhere)


def check_method_params(method: str, params: dict) -> dict:
    allowed = METHOD_PARAMS[method]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        hint = f"it takes {sorted(allowed)}" if allowed else "it takes none of its own"
        raise TypeError(f"method {method!r} got unexpected parameter(s) {unknown}; {hint}"
                        f"{_did_you_mean(unknown, method)}")
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
        merged["radius"] = min(int(radius), RADIUS_CAP)
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
NUMPY_FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def _check_dense(t: torch.Tensor, name: str):
    """Strided tensors with data only: nested, sparse and meta tensors are named, not crashed on."""
    if t.is_nested:
        raise TypeError(f"{name}: nested tensors are not supported; pass a padded [B, N, D] tensor with lengths, "
                        "or a packed [T, D] tensor to select_varlen")
    if t.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}; call .to_dense() first")
    if t.device.type == "meta":
        raise ValueError(f"{name}: is on the meta device, which holds no values; pass a CPU or CUDA tensor")


def _as_tensor(x, name: str, numpy_in: bool):
    """A float features/importance argument as a torch tensor outside autograd (NumPy input: a
    zero-copy view when it can be one), with its dtype checked under the caller's own dtype names."""
    if isinstance(x, torch.Tensor):
        if numpy_in:
            raise TypeError(f"{name}: features is a numpy array, so {name} must be one too; got {_describe(x)}")
        _check_dense(x, name)
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: expected a float16, bfloat16, float32 or float64 tensor, got dtype {x.dtype}")
        # selection is not differentiable: every backend reads the values only, and out= and in-place
        # ops on a tensor that requires grad are refused by autograd (a view: nothing is copied)
        return x.detach()
    if isinstance(x, np.ndarray):
        if not numpy_in:
            raise TypeError(f"{name}: features is a torch.Tensor, so {name} must be one too; got {_describe(x)}")
        if x.dtype.type not in NUMPY_FLOAT_DTYPES:  # numpy has no bfloat16; float128 etc. torch cannot take
            raise TypeError(f"{name}: expected a float16, float32 or float64 array, got dtype {x.dtype}")
        if not x.flags.writeable or not x.flags.c_contiguous or x.dtype.byteorder == ">":
            x = np.array(x, dtype=x.dtype.newbyteorder("="), copy=True, order="C")
        return torch.from_numpy(x)
    raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {_describe(x)}")


def _check_float(t: torch.Tensor, name: str):
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float16, bfloat16, float32 or float64 tensor, got dtype {t.dtype}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32  # as SelectionBatch.compute_dtype


def feature_limit(dtype: torch.dtype, dim: int) -> float:
    """Largest accepted ``|x|`` of features: ``sqrt(max / D) / 2`` of the compute dtype
    (float64 for float64 input, float32 otherwise), so that ``||x||^2`` cannot overflow
    (it stays below a quarter of the dtype's maximum).  Cosine similarity does not depend
    on scale, so larger inputs lose nothing by being divided down before the call."""
    return math.sqrt(torch.finfo(_compute_dtype(dtype)).max / dim) / 2


def _value_scan(t: torch.Tensor) -> torch.Tensor:
    """``[2]`` float64 ``(min, max)`` of ``t`` on its device (NaN anywhere makes both NaN)."""
    # per row first: a reduction over every element copies a non-contiguous (expanded,
    # strided) tensor whole, before any workspace check could refuse the call
    row_lo, row_hi = torch.aminmax(t, dim=-1)
    return torch.stack((row_lo.amin(), row_hi.amax())).to(torch.float64)


def _span_finite(batch: SelectionBatch) -> torch.Tensor:
    """0-d bool on the device: per non-empty image, ``max w - min w`` is finite in the compute
    dtype (else ``Imp`` is NaN).  A mask, not a boolean index, which would read back its size."""
    _, lo, hi = batch._importance_range()
    return torch.where(batch.lengths > 0, torch.isfinite(hi - lo), True).all()


def _check_range(lo: float, hi: float, t: torch.Tensor, name: str, limit: float | None = None):
    """The NaN/Inf (and, with ``limit``, magnitude) verdict on a scan read back by :func:`_check_scans`."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name}: contains {bad} NaN/Inf value(s); clean the input or pass check_finite=False "
                         "to skip this check (results on non-finite input are then undefined)")
    big = max(-lo, hi)
    if limit is not None and big > limit:
        raise ValueError(f"{name}: largest |value| is {big:.3g}, above the accepted {limit:.3g} "
                         f"(sqrt(max / D) / 2 of {_compute_dtype(t.dtype)}, D={t.shape[-1]}): the squared norms "
                         "would overflow; divide the features by a constant first (cosine similarity, and so "
                         "the selection, does not change)")


def _check_scans(batch: SelectionBatch, grid_check) -> None:
    """check_finite=True: features and importance scanned for NaN/Inf and magnitude, and the
    importance's per-image span, read back to the host together (one sync for accelerator input)
    and judged in the order the errors are documented (features, importance, ``grid_check()``,
    the span)."""
    x, w = batch.features, batch.weights
    parts = [_value_scan(x)]
    if w is not None:
        parts += [_value_scan(w), _span_finite(batch).to(torch.float64).reshape(1)]
    found = torch.cat(parts).tolist()
    _check_range(found[0], found[1], x, "features", feature_limit(x.dtype, x.shape[-1]))
    if w is not None:
        _check_range(found[2], found[3], w, "importance")
    grid_check()
    if w is not None and not found[4]:
        _, lo, hi = batch._importance_range()
        raise ValueError(f"importance: max - min over an image overflows {batch.compute_dtype} "
                         f"(largest span {float((hi.double() - lo.double())[batch.lengths > 0].max()):.3g}), "
                         "so it cannot be normalised; shift or scale the importance first (only its order "
                         "within each image matters to Imp)")


def _index_tensor(x, name: str, numpy_in: bool, device, length: int | None):
    if isinstance(x, (list, tuple)):
        try:
            x = torch.as_tensor(x) if len(x) else torch.zeros(0, dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise TypeError(f"{name}: expected a list of int64 values, got {_describe(x)} ({exc})") from None
    elif isinstance(x, np.ndarray):
        if x.dtype.kind != "i" or x.dtype.itemsize not in (4, 8):
            raise TypeError(f"{name}: expected an int32 or int64 array, got dtype {x.dtype}")
        # native byte order, contiguous and writable: torch takes nothing else without a copy or a warning
        x = torch.from_numpy(np.array(x, dtype=x.dtype.newbyteorder("="), copy=True, order="C"))
    elif isinstance(x, torch.Tensor):
        _check_dense(x, name)
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


# (device, B, N, k_b) -> [3, B] int64 (lengths, starts, ks) of a padded batch without lengths
_UNIFORM: dict = {}
UNIFORM_CACHE = 64   # entries kept (a few hundred bytes each); the oldest goes first


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _uniform_segments(device: torch.device, bsz: int, n: int, k_b: int):
    """``(lengths, starts, ks)`` of a padded batch whose images all have ``n`` tokens and keep
    ``k_b``: read-only views of one tensor per shape, built once and kept, so that a repeated
    eager call spends none of its few device launches on constants.  Tracing and CUDA-graph
    capture build them with device ops instead (a capture records kernels without running them,
    so a tensor made there holds nothing until replay and must not be kept)."""
    if torch.compiler.is_compiling() or _capturing(device):
        starts = torch.arange(bsz, dtype=torch.int64, device=device) * n
        return (torch.full((bsz,), n, dtype=torch.int64, device=device), starts,
                torch.full((bsz,), k_b, dtype=torch.int64, device=device))
    key = (device, bsz, n, k_b)
    t = _UNIFORM.get(key)
    if t is None:
        # kept across calls, so not an inference tensor even when first made under inference_mode
        with torch.inference_mode(False):
            t = torch.tensor([[n] * bsz, list(range(0, bsz * n, n)), [k_b] * bsz], dtype=torch.int64).to(device)
        while len(_UNIFORM) >= UNIFORM_CACHE:
            _UNIFORM.pop(next(iter(_UNIFORM)))
        _UNIFORM[key] = t
    return t[0], t[1], t[2]


def _features(features, packed: bool):
    """``(x, numpy_in)``: the features as a tensor, with dtype and shape checked."""
    numpy_in = isinstance(features, np.ndarray)
    x = _as_tensor(features, "features", numpy_in)
    if packed:
        if x.ndim != 2:
            raise ValueError(f"features: select_varlen expects packed [T, D] features, got shape {tuple(x.shape)}")
    elif x.ndim not in (2, 3):
        raise ValueError(f"features: expected [N, D] or [B, N, D], got shape {tuple(x.shape)}")
    if x.shape[-2] == 0:
        raise ValueError(f"features: needs at least one token (N >= 1), got shape {tuple(x.shape)}")
    if x.shape[-1] == 0 or (x.ndim == 3 and x.shape[0] == 0):
        raise ValueError(f"features: every dimension must be non-empty, got shape {tuple(x.shape)}")
    return x, numpy_in


def _importance(importance, x: torch.Tensor, numpy_in: bool):
    """The importance as a tensor shaped like ``features[..., 0]`` on its device, or None."""
    if importance is None:
        return None
    w = _as_tensor(importance, "importance", numpy_in)
    _check_float(w, "importance")
    want = tuple(x.shape[:-1])
    if tuple(w.shape) != want:
        raise ValueError(f"importance: expected shape {list(want)} to match features {tuple(x.shape)}, "
                         f"got {tuple(w.shape)}")
    if w.device != x.device:
        raise ValueError(f"importance: on {w.device}, but features are on {x.device}")
    return w


def _value_checks(device: torch.device, check_finite: bool) -> tuple[bool, bool]:
    """``(check_ranges, check_nan)``: ranges of lengths / cu_seqlens guard the kernels' memory
    accesses, so they are always checked where that costs no device sync (CPU); NaN/Inf and
    magnitudes only when asked (check_finite).  Value checks on accelerator input force a host
    sync: none while tracing."""
    if torch.compiler.is_compiling():
        return False, False
    return check_finite or device.type == "cpu", check_finite


def _packed_segments(x, cu_seqlens, numpy_in: bool, check_ranges: bool):
    """``(lengths, starts)`` of a packed batch from its offsets ``cu_seqlens``."""
    cu = _index_tensor(cu_seqlens, "cu_seqlens", numpy_in, x.device, None)
    if cu.shape[0] < 2:
        raise ValueError(f"cu_seqlens: expected [B + 1] entries with B >= 1, got {cu.shape[0]}")
    if check_ranges:
        cu_host = cu.cpu()
        total = x.shape[0]
        if int(cu_host[0]) != 0 or int(cu_host[-1]) != total or bool((cu_host[1:] < cu_host[:-1]).any()):
            raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to T={total}, "
                             f"got {cu_host.tolist() if cu_host.numel() <= 16 else 'a tensor that is not'}")
    return (cu[1:] - cu[:-1]).contiguous(), cu[:-1].contiguous()


def _padded_segments(x, lengths, numpy_in: bool, check_ranges: bool):
    """``(lengths, starts)`` of a padded ``[B, N, D]`` batch with ``lengths`` given."""
    bsz, n = x.shape[0], x.shape[1]
    lens = _index_tensor(lengths, "lengths", numpy_in, x.device, bsz)
    if check_ranges:
        lh = lens.cpu()
        if bool(((lh < 0) | (lh > n)).any()):
            raise ValueError(f"lengths: expected values in [0, N={n}], got {lh.tolist() if bsz <= 16 else 'out-of-range values'}")
    return lens, _uniform_segments(x.device, bsz, n, 0)[1]


def _check_grid(params: dict, lens: torch.Tensor):
    """d2pruner's ``grid=(h, w)`` must cover every non-empty image exactly."""
    h, gw = params["grid"]
    bad = [int(v) for v in lens.cpu().tolist() if v > 0 and v != h * gw]
    if bad:
        raise ValueError(f"grid: (h, w)={params['grid']} covers {h * gw} tokens, but images have {sorted(set(bad))} valid tokens")


def validate(features, importance, *, k, keep_ratio, lam, method, lengths=None, cu_seqlens=None,
             order="position", check_finite=True, method_params=None) -> Request:
    """Check every argument and build the :class:`Request` (see docs/contract.md)."""
    method = check_method(method)
    order = check_order(order)
    lam = check_lam(lam)
    # unknown names first: a misspelt keep_ratio= would otherwise read as "no budget given"
    params = check_method_params(method, dict(method_params or {}))
    k, keep_ratio = check_budget(k, keep_ratio)
    check_finite = check_flag(check_finite, "check_finite")

    packed = cu_seqlens is not None
    x, numpy_in = _features(features, packed)
    w = _importance(importance, x, numpy_in)
    check_ranges, check_nan = _value_checks(x.device, check_finite)

    single = (not packed) and x.ndim == 2
    if single:
        x = x.unsqueeze(0)
        w = w.unsqueeze(0) if w is not None else None
        if lengths is not None:
            raise ValueError("lengths: only valid with batched [B, N, D] features")

    if packed:
        lens, starts = _packed_segments(x, cu_seqlens, numpy_in, check_ranges)
        n_padded = None
    elif lengths is None:
        n_padded = x.shape[1]
        lens = None
    else:
        lens, starts = _padded_segments(x, lengths, numpy_in, check_ranges)
        n_padded = x.shape[1]

    if lens is None:   # every image whole: the budgets are Python ints
        k_max = budget(n_padded, k, keep_ratio)
        lens, starts, ks = _uniform_segments(x.device, x.shape[0], n_padded, k_max)
    else:
        ks, k_max = _budgets(lens, k, keep_ratio, n_padded, lengths is not None)
    batch = SelectionBatch(features=x, weights=w, lengths=lens, starts=starts, ks=ks, k_max=k_max,
                           packed=packed, method=method, lam=lam, params=params)

    def grid_check():
        if method == "d2pruner" and params["grid"] is not None and check_ranges:
            _check_grid(params, lens)

    if check_nan:
        _check_scans(batch, grid_check)
    else:
        grid_check()
    return Request(batch=batch, numpy_in=numpy_in, single_image=single, order=order)
