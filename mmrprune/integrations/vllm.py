"""Visual-token pruning inside vLLM (a ``vllm.general_plugins`` plugin).

Turn it on with one environment variable, read when the engine starts::

    MMRPRUNE_VLLM="k=64,method=mmr,lam=0.5,importance=norm" vllm serve Qwen/Qwen2.5-VL-7B-Instruct

Unset (or empty) the plugin does nothing at all: vLLM runs exactly as without it.
Keys (comma separated ``key=value``):

* ``k`` *or* ``keep_ratio`` (exactly one): tokens kept per image, ``min(k, N)`` or
  ``max(1, round_half_even(keep_ratio * N))`` (:func:`mmrprune.reference.budget`).  vLLM
  fixes an image's placeholder count when it tokenises the prompt, before the vision tower
  runs, so the budget can depend only on the image's token count ``N``.
* ``method`` (default ``mmr``), ``lam`` (default ``0.5``), ``backend`` (default ``auto``):
  as :func:`mmrprune.select`.
* ``importance``: ``norm`` (default; L2 norm of each merged visual token) or ``none``.
  These are the sources available where the plugin runs (on the vision tower's output,
  before the decoder sees the prompt's text).

A bad value raises ``ValueError`` naming ``MMRPRUNE_VLLM`` while the engine starts.

Supported: ``Qwen2_5_VLForConditionalGeneration`` images, vllm 0.32.x.  Videos pass through
unpruned (vLLM's own EVS still prunes them when ``video_pruning_rate`` is set).

How it works.  When enabled, :func:`register` replaces vLLM's Qwen2.5-VL class by a subclass
that (1) expands each image placeholder to the budget instead of ``N`` tokens, (2) selects the
kept rows of each image's merged features with :func:`mmrprune.select_varlen` (one call per
encoder batch) and appends each kept token's original (t, h, w) M-RoPE position, the format of
vLLM's own pruning path (EVS), and (3) lays out provisional positions for the shorter prompt.
vLLM's model runner then writes the kept tokens' original positions into the request with the
model's ``recompute_mrope_positions``, as it does for EVS; text after an image continues the
unpruned numbering, as in the HF integration (:mod:`mmrprune.integrations.hf`).
"""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from typing import Optional

ENV = "MMRPRUNE_VLLM"
ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
SUPPORTED_VLLM = "0.32."
_IMPORTANCE = ("norm", "none")
_KEYS = ("k", "keep_ratio", "method", "lam", "importance", "backend")

# The latest selections of this process (newest last): dicts with the per-image token counts,
# the kept indices into the packed features and cu_k.  For inspection and tests.
recent_selections: collections.deque = collections.deque(maxlen=256)


@dataclass(frozen=True)
class PruneConfig:
    """The validated ``MMRPRUNE_VLLM`` settings."""
    k: Optional[int] = None
    keep_ratio: Optional[float] = None
    method: str = "mmr"
    lam: float = 0.5
    importance: Optional[str] = "norm"
    backend: str = "auto"

    def tokens_kept(self, n: int) -> int:
        """Placeholder tokens of an image with ``n`` visual tokens."""
        from ..reference import budget
        return budget(n, self.k, self.keep_ratio)


def parse_config(text: Optional[str]) -> Optional[PruneConfig]:
    """``"k=64,method=mmr"`` -> :class:`PruneConfig`; ``None`` or blank -> ``None`` (plugin off)."""
    if text is None or not text.strip():
        return None
    from ..dispatch import BACKENDS
    from ..validation import check_budget, check_lam, check_method, check_method_params
    fields: dict = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or key not in _KEYS:
            raise ValueError(f"{ENV}: expected comma-separated key=value with keys {list(_KEYS)}, got {item.strip()!r}")
        if key in fields:
            raise ValueError(f"{ENV}: {key} given twice")
        fields[key] = value
    try:
        k = _number(fields, "k", int)
        keep_ratio = _number(fields, "keep_ratio", float)
        k, keep_ratio = check_budget(k, keep_ratio)
        method = check_method(fields.get("method", "mmr"))
        check_method_params(method, {})
        lam = check_lam(_number(fields, "lam", float, 0.5))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{ENV}={text!r}: {exc}") from None
    importance = fields.get("importance", "norm")
    if importance not in _IMPORTANCE:
        raise ValueError(f"{ENV}: importance must be one of {list(_IMPORTANCE)}, got {importance!r}")
    if method == "topk" and importance == "none":
        raise ValueError(f"{ENV}: method=topk ranks tokens by importance; importance=none would keep the "
                         "first k tokens of each image (use importance=norm)")
    backend = fields.get("backend", "auto")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"{ENV}: backend must be 'auto' or one of {list(BACKENDS)}, got {backend!r}")
    return PruneConfig(k=k, keep_ratio=keep_ratio, method=method, lam=lam,
                       importance=None if importance == "none" else importance, backend=backend)


def _number(fields, key, kind, default=None):
    if key not in fields:
        return default
    try:
        return kind(fields[key])
    except ValueError:
        raise ValueError(f"{key}: expected {'an int' if kind is int else 'a number'}, got {fields[key]!r}") from None


_config: Optional[PruneConfig] = None


def active_config() -> Optional[PruneConfig]:
    """The configuration :func:`register` installed in this process (``None``: plugin off)."""
    return _config


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group; vLLM calls it in every process.

    Does nothing unless ``MMRPRUNE_VLLM`` is set; then validates it (raising ``ValueError``
    at engine start) and registers the pruning Qwen2.5-VL class."""
    global _config
    config = parse_config(os.environ.get(ENV))
    if config is None:
        return
    import vllm
    if not vllm.__version__.startswith(SUPPORTED_VLLM):
        raise RuntimeError(f"{ENV} is set, but mmrprune's vLLM plugin supports vllm {SUPPORTED_VLLM}x only "
                           f"(found {vllm.__version__}); unset {ENV} to run without pruning")
    _config = config
    from vllm import ModelRegistry
    # the class itself, not a lazy "module:Class" string: vLLM inspects a lazy class in a fresh
    # interpreter (~25 s on a 2-core machine); importing it here only happens when pruning is on
    from ._vllm_qwen import MMRPruneQwen2_5_VL
    ModelRegistry.register_model(ARCHITECTURE, MMRPruneQwen2_5_VL)
    from ._vllm_runner import install_runner_fix
    install_runner_fix()
