"""One-shot visual-token pruning for Hugging Face transformers VLMs.

    import mmrprune.integrations as mi
    with mi.prune_visual_tokens(model, keep_ratio=0.25, method="mmr", lam=0.5, importance="norm"):
        out = model.generate(**inputs, max_new_tokens=32)

The families (one adapter each, :mod:`.family` states the interface) are listed in
:data:`.families.FAMILIES`; the tested transformers releases in :data:`.versions.REQUIREMENT`.
:mod:`.core` holds the hook and the sequence surgery shared by every family.

Returned ``logits`` (and ``hidden_states``) of a pruned prefill have the *pruned* length.
Videos are pruned with a video budget by the families that say so (``Family.videos``).
Not supported: chunked prefill, assisted generation, static caches, continuing a cache that
already holds a pruned prompt with new images.
"""
from .core import VisualTokenPruner, enable_visual_token_pruning, prune_visual_tokens
from .flops import prefill_flops

__all__ = ["prune_visual_tokens", "enable_visual_token_pruning", "VisualTokenPruner", "prefill_flops"]
