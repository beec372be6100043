"""``MMRPRUNE_VLLM``: parsing and validation of the vLLM plugin's settings (no vLLM import).

``"k=64,video_k=256,method=mmr"`` -> :class:`PruneConfig`.  See :mod:`mmrprune.integrations.vllm`
for what each key means.
"""
from __future__ import annotations

import re
from typing import Optional

from ...dispatch import BACKENDS
from ...validation import K_CAP
from ..selection import Selector, Spec, spec

ENV = "MMRPRUNE_VLLM"
_BUDGET_KEYS = ("k", "keep_ratio", "video_k", "video_keep_ratio")
# d2pruner's parameters; its grid is each image's own patch grid, never a setting
_D2PRUNER_KEYS = ("pivot_ratio", "alpha", "tau", "radius")
KEYS = _BUDGET_KEYS + ("method", "lam", "importance", "backend") + _D2PRUNER_KEYS
_NUMBER_KEYS = _BUDGET_KEYS + ("lam",) + _D2PRUNER_KEYS
_INT_KEYS = ("k", "video_k", "radius")
_SHOWN = 40   # a message quotes at most this many characters of a value


# The validated settings: the integrations' shared spec (a budget per modality and one selector);
# this module only turns the variable's text into the spec's arguments.
PruneConfig = Spec


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
    for prefix in ("", "video_"):
        if prefix + "k" in fields and prefix + "keep_ratio" in fields:
            raise ValueError(f"give one of {prefix}k or {prefix}keep_ratio, not both")
    for key in ("method", "importance", "backend"):   # longer than any name: refused before it is quoted
        if len(fields.get(key, "")) > _SHOWN:
            raise ValueError(f"{key}: no such {key}: {_shown(fields[key])}")
    numbers = {key: (_int if key in _INT_KEYS else _real)(fields, key) for key in _NUMBER_KEYS if key in fields}
    try:
        return spec(k=numbers.get("k"), keep_ratio=numbers.get("keep_ratio"), video_k=numbers.get("video_k"),
                    video_keep_ratio=numbers.get("video_keep_ratio"), method=fields.get("method", "mmr"),
                    lam=numbers.get("lam"), backend=fields.get("backend", "auto"),
                    importance=fields.get("importance", "norm"), warn_prefix=f"{ENV}: ", stacklevel=3,
                    **{key: numbers[key] for key in _D2PRUNER_KEYS if key in numbers})
    except (TypeError, ValueError) as exc:
        message = str(exc)
        key = message.split(": ", 1)[0]
        if key in _BUDGET_KEYS and key in fields and ", got " in message:   # echo the value as typed
            message = f"{message.rsplit(', got ', 1)[0]}, got {_shown(fields[key])[1:-1]}"
        raise type(exc)(message) from None


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
