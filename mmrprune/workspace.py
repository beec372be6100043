"""Workspace estimate and limit: a call that would need more scratch memory than the
limit fails up front with the bytes it needs, instead of being OOM-killed half way.

The dominant buffer is DPP's greedy-MAP state, ``N x k`` Cholesky rows per image
(inherent to the incremental Cholesky): at N = 100,000 and k = 25,000 that is
10 GB in float32, from a 25 MB input.  Each backend says what it allocates beyond the input
and the output, per call (its ``Backend.workspace``); this module only asks it and compares.

The limit is a call's ``workspace_limit=`` argument; without it, the environment variable
``MMRPRUNE_MAX_WORKSPACE`` (read at every call), else ``DEFAULT_LIMIT_BYTES`` (4 GiB).
:func:`mmrprune.workspace_bytes` says what a call needs before making it.  Accepted
(an int of bytes too, for the argument), case and surrounding spaces aside:

* a byte count: a decimal number (digits, with an optional fraction) and an optional
  binary suffix ``K``, ``M``, ``G`` or ``T`` (``KiB``/``KB`` and so on too), e.g.
  ``8589934592``, ``512M``, ``1.5G``; at least 1 byte and at most ``MAX_LIMIT_BYTES``,
  fractions of a byte rounded down;
* ``unlimited``: no limit, the only spelling of it.

Anything else (``inf``, ``1e9``, ``0``, ``-1``, ``0.5``, a number past 2**63) raises a
``ValueError`` that names the variable and these forms.
"""
from __future__ import annotations

import os
import re
from fractions import Fraction

from . import dispatch
from .backends import Backend
from .batch import SelectionBatch

ENV_VAR = "MMRPRUNE_MAX_WORKSPACE"
UNLIMITED = "unlimited"
DEFAULT_LIMIT_BYTES = 4 << 30
MAX_LIMIT_BYTES = 2**63 - 1        # what an int64 byte count holds; far past any machine
_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_BYTE_COUNT = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?:(?P<unit>[KMGT])I?)?B?", re.IGNORECASE | re.ASCII)
_MAX_DIGITS = 40      # no number this long is a limit (and Python refuses to parse > 4300 digits)
_QUOTED_CHARS = 40    # a message quotes at most this much of the variable's value


class WorkspaceLimitError(MemoryError):
    """The call would need more scratch memory than the workspace limit allows."""


def parse_limit(raw: str) -> int | None:
    """``MMRPRUNE_MAX_WORKSPACE``'s value as bytes (None: unlimited); see the module docstring."""
    text = raw.strip()
    if text.lower() == UNLIMITED:
        return None
    match = _BYTE_COUNT.fullmatch(text)
    value = 0
    if match and len(match["number"]) <= _MAX_DIGITS:   # longer is past MAX_LIMIT_BYTES anyway
        value = int(Fraction(match["number"]) * _SUFFIX[(match["unit"] or "").upper()])
    if not 1 <= value <= MAX_LIMIT_BYTES:
        shown = repr(raw) if len(raw) <= _QUOTED_CHARS else f"{raw[:_QUOTED_CHARS]!r}... ({len(raw)} characters)"
        raise ValueError(f"{ENV_VAR}: expected a byte count of at least 1 byte (digits with an optional K, M, G "
                         f"or T suffix, e.g. 8589934592, 512M or 1.5G; at most {MAX_LIMIT_BYTES}) or "
                         f"'{UNLIMITED}' for no limit; got {shown}")
    return value


def limit_bytes(limit=None) -> int | None:
    """The workspace limit in bytes (None: unlimited): a call's ``workspace_limit`` (a positive
    int, a byte-count string as the variable takes, or ``"unlimited"``), else
    ``MMRPRUNE_MAX_WORKSPACE``, else :data:`DEFAULT_LIMIT_BYTES`."""
    if limit is None:
        raw = os.environ.get(ENV_VAR, "")
        return DEFAULT_LIMIT_BYTES if not raw.strip() else parse_limit(raw)
    if isinstance(limit, bool) or not isinstance(limit, (int, str)):
        raise TypeError(f"workspace_limit: expected a byte count (int or a string such as '512M') or "
                        f"'{UNLIMITED}', got {type(limit).__name__}")
    if isinstance(limit, int):
        if not 1 <= limit <= MAX_LIMIT_BYTES:
            raise ValueError(f"workspace_limit: expected at least 1 byte and at most {MAX_LIMIT_BYTES}, got {limit}")
        return limit
    try:
        return parse_limit(limit)
    except ValueError as exc:
        raise ValueError(str(exc).replace(f"{ENV_VAR}:", "workspace_limit:", 1)) from None


def backend_of(backend) -> Backend:
    """``backend`` itself, or the :class:`~mmrprune.backends.Backend` of that name (imported, not
    checked for availability: an estimate needs no device)."""
    if isinstance(backend, Backend):
        return backend
    found, why = dispatch.load(backend)
    if found is None:
        raise ValueError(f"backend {backend!r}: {why}")
    return found


def estimate_bytes(backend, batch: SelectionBatch, sim: str = "auto", max_round=None) -> int:
    """Scratch bytes ``backend`` (a name or a :class:`~mmrprune.backends.Backend`) allocates for
    ``batch`` beyond its input and output: the backend's own ``workspace`` (an upper estimate of
    the large buffers; per-call constants of a few KB are left out; every copy of the input
    counts), sized as on the backend's device whatever ``batch``'s is.  ``sim`` and
    ``max_round`` are the call's tuning, passed to a backend that takes them.  A method the
    backend does not implement is a ``ValueError``."""
    chosen = backend_of(backend)
    ok, why = chosen.supports(batch, any_device=True)
    if not ok:
        raise ValueError(why)
    return chosen.workspace_bytes(batch, sim=sim, max_round=max_round)


def _human(nbytes: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} B"


def check(backend, batch: SelectionBatch, limit=None, sim: str = "auto", max_round=None) -> None:
    """Raise :class:`WorkspaceLimitError` when ``backend`` would need more than the limit
    (:func:`limit_bytes` of ``limit``)."""
    limit = limit_bytes(limit)
    if limit is None:
        return
    chosen = backend_of(backend)
    need = estimate_bytes(chosen, batch, sim, max_round)
    backend = chosen.name
    if need > limit:
        raise WorkspaceLimitError(
            f"workspace: backend {backend!r} would need about {_human(need)} ({need} bytes) of scratch memory "
            f"for method {batch.method!r} with B={batch.batch_size}, N={batch.max_length()}, D={batch.dim}, "
            f"k={batch.k_max}, above the limit of {_human(limit)} ({limit} bytes); raise the limit with the "
            f"argument workspace_limit= (e.g. workspace_limit='32G' or '{UNLIMITED}') or the environment variable "
            f"{ENV_VAR} (its default), or lower k, or split the batch")
