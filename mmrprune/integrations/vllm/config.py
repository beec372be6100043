"""``MMRPRUNE_VLLM``: parsing and validation of the vLLM plugin's settings (no vLLM import).

``"k=64,video_k=256,method=mmr"`` -> :class:`PruneConfig`.  See :mod:`mmrprune.integrations.vllm`
for what each key means.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Optional

from ...dispatch import BACKENDS
from ...reference import LAM_METHODS
from ...validation import K_CAP, check_budget, check_lam, check_method, check_method_params
from ..selection import IMPORTANCE_SOURCES, Budget, Selector

ENV = "MMRPRUNE_VLLM"
_BUDGET_KEYS = ("k", "keep_ratio", "video_k", "video_keep_ratio")
# d2pruner's parameters; its grid is each image's own patch grid, never a setting
_D2PRUNER_KEYS = ("pivot_ratio", "alpha", "tau", "radius")
KEYS = _BUDGET_KEYS + ("method", "lam", "importance", "backend") + _D2PRUNER_KEYS
_SHOWN = 40   # a message quotes at most this many characters of a value


@dataclass(frozen=True)
class PruneConfig:
    """The validated ``MMRPRUNE_VLLM`` settings: a budget per modality and one selector."""
    images: Budget = field(default_factory=Budget)
    videos: Budget = field(default_factory=Budget)
    selector: Selector = field(default_factory=Selector)


def _shown(value: str) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else f"{text[:_SHOWN]}... ({len(value)} characters)"


def parse_config(text: Optional[str]) -> Optional[PruneConfig]:
    """``None`` or blank -> ``None`` (plugin off); otherwise the :class:`PruneConfig`, or a
    ``ValueError`` that names ``MMRPRUNE_VLLM``, the key and what is accepted."""
    if text is None or not text.strip():
        return None
    fields = _fields(text)
    try:
        return _validated(fields)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{ENV}: {exc}") from None


def _fields(text: str) -> dict:
    fields: dict = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or key not in KEYS:
            hint = (" (d2pruner's grid is each image's own patch grid, set by the plugin)"
                    if key == "grid" else "")
            raise ValueError(f"{ENV}: expected comma-separated key=value with keys {list(KEYS)}, "
                             f"got {_shown(item.strip())}{hint}")
        if key in fields:
            raise ValueError(f"{ENV}: {key} given twice")
        fields[key] = value
    return fields


def _validated(fields: dict) -> PruneConfig:
    budgets = {what: _budget(fields, prefix) for prefix, what in (("", "images"), ("video_", "videos"))}
    if not (budgets["images"].prunes or budgets["videos"].prunes):
        raise ValueError("nothing to prune: give k or keep_ratio (tokens kept per image) and/or "
                         "video_k or video_keep_ratio (tokens kept per video)")
    method = check_method(fields.get("method", "mmr"))
    lam = None
    if "lam" in fields:
        lam = check_lam(_real(fields, "lam"))
        if method not in LAM_METHODS:
            warnings.warn(f"{ENV}: lam={lam} is ignored by method={method!r}: only {' and '.join(LAM_METHODS)} "
                          "use lam", UserWarning, stacklevel=4)
            lam = None
    params = {key: (_int if key == "radius" else _real)(fields, key) for key in _D2PRUNER_KEYS if key in fields}
    # the grid is supplied per image at selection time; validate the rest as if it were given
    checked = check_method_params(method, {**params, "grid": (1, 1)} if method == "d2pruner" else params)
    if method == "d2pruner":
        checked.pop("grid")
        params = checked
        if budgets["videos"].prunes and checked["alpha"] < 1.0:
            raise ValueError("video_k/video_keep_ratio with method=d2pruner needs alpha=1.0: its spatial term "
                             f"is defined on one image's patch grid, not across a video's frames "
                             f"(got alpha={checked['alpha']})")
    importance = fields.get("importance", "norm")
    if importance not in IMPORTANCE_SOURCES:
        raise ValueError(f"importance must be one of {list(IMPORTANCE_SOURCES)}, got {_shown(importance)}")
    if method == "topk" and importance == "none":
        raise ValueError("method=topk ranks tokens by importance; importance=none would keep the first k tokens "
                         "of each item (use importance=norm)")
    backend = fields.get("backend", "auto")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {list(BACKENDS)}, got {_shown(backend)}")
    return PruneConfig(images=budgets["images"], videos=budgets["videos"],
                       selector=Selector(method=method, lam=lam, backend=backend, importance=importance,
                                         params=params))


def _budget(fields: dict, prefix: str) -> Budget:
    k_key, ratio_key = prefix + "k", prefix + "keep_ratio"
    if k_key in fields and ratio_key in fields:
        raise ValueError(f"give one of {k_key} or {ratio_key}, not both")
    k, ratio = _int(fields, k_key), _real(fields, ratio_key)
    if k is None and ratio is None:
        return Budget()
    try:
        return Budget(*check_budget(k, ratio))
    except (TypeError, ValueError) as exc:   # name the key given and echo the value as typed
        key = k_key if k is not None else ratio_key
        reason = str(exc).split(": ", 1)[1].rsplit(", got ", 1)[0]
        raise ValueError(f"{key}: {reason}, got {_shown(fields[key])[1:-1]}") from None


# One rule for every number: plain decimal digits, an optional sign, and for reals a decimal point
# and exponent.  Python's int() and float() also take "1_000", "inf", "nan" and non-ASCII digits;
# a setting spelled so is refused rather than read as something the user did not type.
_INT = re.compile(r"[+-]?[0-9]+")
_REAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_SPELLING = "plain decimal digits, no '_' separators"


def _int(fields: dict, key: str) -> Optional[int]:
    if key not in fields:
        return None
    value = fields[key]
    if not _INT.fullmatch(value):
        raise ValueError(f"{key}: expected an int ({_SPELLING}), got {_shown(value)}")
    digits = value.lstrip("+-").lstrip("0") or "0"
    if len(digits) > 19:   # Python refuses to parse ints of > 4300 digits; any such k means every token
        if value.startswith("-"):
            raise ValueError(f"{key}: expected an int >= 1, got {_shown(value)[1:-1]}")
        return K_CAP
    return int(value)


def _real(fields: dict, key: str) -> Optional[float]:
    if key not in fields:
        return None
    value = fields[key]
    if not _REAL.fullmatch(value):
        raise ValueError(f"{key}: expected a number ({_SPELLING}; a decimal point and exponent allowed), "
                         f"got {_shown(value)}")
    return float(value)


def check_backend(selector: Selector, device_type: str) -> None:
    """Refuse, when the engine starts, a ``backend`` that cannot run on the engine's device
    (e.g. ``backend=cuda`` on a CPU-only vLLM), saying why."""
    from ...dispatch import resolve
    try:
        resolve(selector.backend, device_type, selector.method)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"{ENV}: backend={selector.backend} cannot run on this vLLM engine, whose tensors are on "
                         f"{device_type}: {exc}. Use backend=auto, or a backend of {list(BACKENDS)} that runs on "
                         f"{device_type}") from None
