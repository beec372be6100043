"""Drop-in visual-token pruning for model libraries.

``mmrprune.integrations.prune_visual_tokens(model, keep_ratio=0.25)`` works on the
Hugging Face transformers LLaVA (1.5 family), Qwen2-VL / Qwen2.5-VL and Qwen3-VL models.
transformers is imported lazily: importing this package does not import it.
"""
from __future__ import annotations

__all__ = ["prune_visual_tokens", "enable_visual_token_pruning", "VisualTokenPruner", "prefill_flops"]


def __getattr__(name):
    if name in __all__:
        from . import hf
        return getattr(hf, name)
    raise AttributeError(f"module 'mmrprune.integrations' has no attribute {name!r}")
