"""The transformers releases the HF integration is tested on, and the calling conventions of
transformers' family-independent code that changed inside that window.

``REQUIREMENT`` is the one statement of the window: the ``hf`` extra of setup.py and
scripts/setup.sh read it from this file, ``.ci/hf_matrix.sh`` tests its floor, and
:func:`check` refuses any other release when pruning is enabled.  The upper bound is the
newest release tested, so a later release is refused at enable time instead of being trusted
untested.  Widening the window means running ``.ci/hf_matrix.sh`` on the new release first.

This file imports nothing at module level: setup.py runs it on a machine that may not have
transformers (or torch) yet.
"""

REQUIREMENT = "transformers>=4.57.6,<5.26"


def specifier() -> str:
    """The version part of :data:`REQUIREMENT`, e.g. ``>=4.57.6,<5.26``."""
    return REQUIREMENT[len("transformers"):]


def floor() -> str:
    """The oldest release of the window (what ``.ci/hf_matrix.sh`` installs first)."""
    return specifier().split(">=")[1].split(",")[0]


def check(installed: str, family=None) -> None:
    """Refuse a transformers release outside the tested window (narrowed by ``family``'s own
    ``transformers`` specifier, if it states one), naming the window."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    narrower = getattr(family, "transformers", "")
    window = specifier() + ("," + narrower if narrower else "")
    try:
        ok = Version(installed) in SpecifierSet(window)
    except InvalidVersion:
        ok = False
    if not ok:
        what = f"{family.name} models are" if narrower else "this integration is"
        raise RuntimeError(f"prune_visual_tokens: transformers {installed} is outside the releases {what} "
                           f"tested on ({window}); install one of them with pip install 'transformers{window}'"
                           f" (or pip install 'mmrprune[hf]')")


# ----------------------------------------------------------------------------- calling conventions
# The KV cache reaches a model's forward as ``cache=`` from 5.25 on and as ``past_key_values=``
# in 4.57-5.24.
CACHE_KEYS = ("cache", "past_key_values")


def cache_of(call_or_output):
    """The KV cache of a forward call's keyword arguments or of its output (a ModelOutput or a
    tuple), or None."""
    if isinstance(call_or_output, dict):           # keyword arguments, or a ModelOutput
        found = [call_or_output.get(key) for key in CACHE_KEYS]
    else:
        found = list(call_or_output) if isinstance(call_or_output, tuple) else []
    for cache in found:
        if cache is not None and hasattr(cache, "get_seq_length"):
            return cache
    if isinstance(call_or_output, dict) and any(call_or_output.get(key) is not None for key in CACHE_KEYS):
        raise TypeError("prune_visual_tokens: the KV cache must be a transformers Cache")
    return None


def set_cache_position(kw: dict, start: int, length: int) -> None:
    """``generate`` in 4.57-5.3 passes ``cache_position`` (the unpruned token indices); the
    models then build the causal mask from it, so it must count the pruned cache.  5.4 and
    later pass none."""
    old = kw.get("cache_position")
    if old is not None:
        import torch

        kw["cache_position"] = torch.arange(start, start + length, dtype=old.dtype, device=old.device)


def encoder_output(kw: dict, modality: str):
    """The encoder output ``generate`` computed ahead of the prefill (5.19 and later pass
    ``mm_encoder_outputs={"image": ..., "video": ...}``), or None."""
    return (kw.get("mm_encoder_outputs") or {}).get(modality)


def output_kwargs() -> dict:
    """What a ``get_image_features`` / ``get_video_features`` call adds to return an output
    object: ``return_dict=True`` in 5.0-5.25; 4.57 returns the features themselves and its
    Qwen methods take no ``return_dict``."""
    import transformers

    return {} if transformers.__version__.startswith("4.") else {"return_dict": True}


def per_item(out) -> list:
    """Per image (or video), its [n_i, H] features, from what ``get_*_features`` returned:
    the output's ``pooler_output`` in 5.0-5.25, the features themselves in 4.57."""
    return list(out.pooler_output if hasattr(out, "pooler_output") else out)
