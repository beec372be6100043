"""Visual-token pruning inside vLLM (a ``vllm.general_plugins`` plugin).

Turn it on with one environment variable, read when the engine starts::

    MMRPRUNE_VLLM="k=64,video_k=512,method=mmr" vllm serve Qwen/Qwen3-VL-8B-Instruct

Unset (or empty) the plugin does nothing at all: vLLM runs exactly as without it.  Before
starting an engine, ``python -m mmrprune.integrations.vllm check`` tells whether the installed
vLLM passes the plugin's interface check, and which model runner and models it would use.

Keys (comma separated ``key=value``; parsed by :mod:`mmrprune.integrations.vllm.config`):

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

A bad value raises ``ValueError`` naming ``MMRPRUNE_VLLM`` while the engine starts, and so do
vLLM's own pruning settings (``--video-pruning-rate``, ``--video-pruning-method``, and any image
pruning setting of the installed vLLM) together with the plugin, and a ``backend`` that cannot
run on the engine's device.

Supported: the architectures of :data:`MODELS` that the installed vLLM has (Qwen2.5-VL,
Qwen3-VL, and from the vLLM releases that have them Qwen3.5 and Qwen3.5-MoE), images and
videos.  On any vLLM, :func:`register` first chooses the model runner the engine will use
(:mod:`.runner`) and checks every vLLM interface the plugin relies on with that runner
(:mod:`.interfaces`); it refuses to start if one is missing or changed.

How it works.  :func:`register` replaces vLLM's classes by subclasses (one module per model:
:mod:`.qwen2_5_vl`, :mod:`.qwen3_vl`, :mod:`.qwen3_5`) that (1) expand each item's placeholder
to its budget, (2) select the kept rows of the merged features with
:func:`mmrprune.select_varlen` (one call per encoder batch and modality,
:mod:`mmrprune.integrations.selection`), and (3) give every kept token its original M-RoPE
position through vLLM's ``recompute_mrope_positions`` step, the one vLLM's own EVS video pruning
uses (:mod:`.common`).  Text after an item continues the unpruned numbering, as in the HF
integration (:mod:`mmrprune.integrations.hf`).
"""
from __future__ import annotations

import collections
import os
from typing import Optional

from .config import ENV, PruneConfig, parse_config

__all__ = ["ENV", "PruneConfig", "parse_config", "register", "active_config", "recent_selections", "MODELS"]

# architecture -> the module of this package that prunes it
MODELS = {"Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl", "Qwen3VLForConditionalGeneration": "qwen3_vl",
          "Qwen3_5ForConditionalGeneration": "qwen3_5", "Qwen3_5MoeForConditionalGeneration": "qwen3_5"}

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

    Does nothing unless ``MMRPRUNE_VLLM`` is set; then validates it, chooses the model runner,
    checks the installed vLLM's interfaces (all raising at engine start) and registers the
    pruning classes."""
    global _config
    config = parse_config(os.environ.get(ENV))
    if config is None:
        return
    from vllm import ModelRegistry

    from . import interfaces, runner
    choice = runner.choose(pin=True)
    interfaces.check(choice)
    # the classes themselves, not lazy "module:Class" strings: vLLM inspects a lazy class in a
    # fresh interpreter (~25 s on a 2-core machine); importing them here happens only when on
    classes = [entry for module in interfaces.model_modules() for entry in module.classes()]
    for arch, model, processor in classes:
        model.mmrprune_config = processor.mmrprune_config = config
        model.mmrprune_record = recent_selections
        model.mmrprune_runner = choice.name
        ModelRegistry.register_model(arch, model)
    runner.install(choice, [model for _, model, _ in classes])
    _config = config
