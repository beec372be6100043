"""Visual-token pruning inside vLLM (a ``vllm.general_plugins`` plugin).

Turn it on with one environment variable, read when the engine starts::

    MMRPRUNE_VLLM="k=64,video_k=512,method=mmr" vllm serve Qwen/Qwen3-VL-8B-Instruct

Unset (or empty) the plugin does nothing at all: vLLM runs exactly as without it.
Keys (comma separated ``key=value``; parsed by :mod:`mmrprune.integrations.vllm_config`):

* ``k`` *or* ``keep_ratio``: tokens kept per image, ``min(k, N)`` or
  ``max(1, round_half_even(keep_ratio * N))`` (:func:`mmrprune.reference.budget`);
  ``video_k`` *or* ``video_keep_ratio``: the same per video, over all its frames.  At least one
  budget; a modality without one is not pruned.  vLLM fixes an item's placeholder count when it
  tokenises the prompt, before the vision tower runs, so a budget depends only on the item's
  token count ``N``.
* ``method`` (default ``mmr``), ``lam`` (the method's default unless given), ``backend``
  (default ``auto``) and d2pruner's ``pivot_ratio``, ``alpha``, ``tau``, ``radius``: as
  :func:`mmrprune.select`; d2pruner's grid is each image's own merged patch grid.
* ``importance``: ``norm`` (default; L2 norm of each merged visual token) or ``none``.

A bad value raises ``ValueError`` naming ``MMRPRUNE_VLLM`` while the engine starts, and so does
``--video-pruning-rate`` (vLLM's own video pruning) together with the plugin.

Supported: ``Qwen2_5_VLForConditionalGeneration`` and ``Qwen3VLForConditionalGeneration``,
images and videos; tested with the vLLM versions in :data:`_vllm_interfaces.TESTED`.  On any
vLLM, :func:`register` first checks every vLLM interface the plugin relies on
(:mod:`mmrprune.integrations._vllm_interfaces`) and refuses to start if one is missing or changed.

How it works.  :func:`register` replaces vLLM's classes by subclasses (one module per family:
``_vllm_qwen25``, ``_vllm_qwen3``) that (1) expand each item's placeholder to its budget,
(2) select the kept rows of the merged features with :func:`mmrprune.select_varlen` (one call
per encoder batch and modality, :mod:`mmrprune.integrations.selection`), and (3) give every kept
token its original M-RoPE position through vLLM's ``recompute_mrope_positions`` step, the one
vLLM's own EVS video pruning uses (:mod:`mmrprune.integrations._vllm_common`).  Text after an
item continues the unpruned numbering, as in the HF integration (:mod:`mmrprune.integrations.hf`).
"""
from __future__ import annotations

import collections
import os
from typing import Optional

from .vllm_config import ENV, PruneConfig, parse_config

__all__ = ["ENV", "PruneConfig", "parse_config", "register", "active_config", "recent_selections"]

# The latest selections of this process (newest last), one dict per encoder batch and modality:
# ``modality``, ``lengths`` (tokens per item), ``grids`` ((t, h, w) merged grid per item) and
# ``kept`` (per item, the kept token indices counted from its first token).  For inspection.
recent_selections: collections.deque = collections.deque(maxlen=256)

_config: Optional[PruneConfig] = None


def active_config() -> Optional[PruneConfig]:
    """The configuration :func:`register` installed in this process (``None``: plugin off)."""
    return _config


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group; vLLM calls it in every process.

    Does nothing unless ``MMRPRUNE_VLLM`` is set; then validates it, checks the installed vLLM's
    interfaces (both raising at engine start) and registers the pruning classes."""
    global _config
    config = parse_config(os.environ.get(ENV))
    if config is None:
        return
    from vllm import ModelRegistry
    from vllm.platforms import current_platform

    from ._vllm_interfaces import check
    check(on_cpu=current_platform.is_cpu())
    # the classes themselves, not lazy "module:Class" strings: vLLM inspects a lazy class in a
    # fresh interpreter (~25 s on a 2-core machine); importing them here happens only when on
    from . import _vllm_qwen3, _vllm_qwen25
    from ._vllm_runner import install_runner_fix
    for family, model, processor in ((_vllm_qwen25, _vllm_qwen25.MMRPruneQwen2_5_VL,
                                      _vllm_qwen25.MMRPruneQwen2_5_VLProcessor),
                                     (_vllm_qwen3, _vllm_qwen3.MMRPruneQwen3VL, _vllm_qwen3.MMRPruneQwen3VLProcessor)):
        model.mmrprune_config = processor.mmrprune_config = config
        model.mmrprune_record = recent_selections
        ModelRegistry.register_model(family.ARCHITECTURE, model)
    install_runner_fix()
    _config = config
