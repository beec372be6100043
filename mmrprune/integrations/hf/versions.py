"""The transformers releases the HF integration is tested on, and the calling conventions of
transformers' family-independent code that changed inside that window.

Tested on transformers 4.57.6 and 5.0.0 to 5.25.0 (``.ci/hf_matrix.sh`` runs the floor, 5.0,
5.17 and 5.19; the main environment 5.25; docs/integrations.md), every adapter's marked
"version-dependent calls" included.

``REQUIREMENT`` is the one statement of the window: the ``hf`` extra of setup.py and
scripts/setup.sh read it from this file, ``.ci/hf_matrix.sh`` tests its floor, and
:func:`check` refuses older releases when pruning is enabled.  The upper bound is the newest
release tested: a later release is let through only after a self-check on a tiny model of the
user's family passes (:mod:`.selfcheck`), with one warning naming the window.  Widening the
window means running ``.ci/hf_matrix.sh`` on the new release first.

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


def installed() -> str:
    """The installed transformers release (one place to read it, so a test can fake another)."""
    import transformers

    return transformers.__version__


def upper() -> str:
    """The first release past the window (``<`` bound of :data:`REQUIREMENT`)."""
    return specifier().split("<")[1].split(",")[0]


def install_hint() -> str:
    """How to get a tested release: commands that work wherever mmrprune came from (it is
    installed from a clone, not from the package index)."""
    return (f"install a tested release with pip install 'transformers{specifier()}' (or, in the mmrprune "
            "clone, pip install -e '.[hf]')")


def check(installed: str, family=None) -> bool:
    """Whether ``installed`` lies in the tested window (narrowed by ``family``'s own
    ``transformers`` specifier, if it states one): True inside; False for a release newer
    than the window that the family's own specifier allows (the caller runs the self-check,
    :mod:`.selfcheck`); anything else is refused, naming the window."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    narrower = getattr(family, "transformers", "")
    window = specifier() + ("," + narrower if narrower else "")
    try:
        version = Version(installed)
        if version in SpecifierSet(window, prereleases=True):
            return True
        newer = Version(version.base_version) >= Version(upper()) and \
            (not narrower or version in SpecifierSet(narrower, prereleases=True))
    except InvalidVersion:
        newer = False
    if newer:
        return False
    what = f"{family.name} models are" if narrower else "this integration is"
    raise RuntimeError(f"prune_visual_tokens: transformers {installed} is outside the releases {what} tested on "
                       f"({window}); {install_hint()}")


# ----------------------------------------------------------------------------- calling conventions
# The KV cache reaches a model's forward as ``cache=`` from 5.25 on and as ``past_key_values=``
# in 4.57-5.24.
CACHE_KEYS = ("cache", "past_key_values")


def cache_of(call_or_output):
    """The KV cache of a forward call's keyword arguments or of its output (a ModelOutput or a
    tuple), or None."""
    if isinstance(call_or_output, dict):           # keyword arguments, or a ModelOutput
        # looked up among the keys present: 5.25's ModelOutput.get maps the old name onto
        # ``cache`` and logs a deprecation for it
        present = call_or_output.keys()
        found = [call_or_output[key] for key in CACHE_KEYS if key in present]
    else:
        found = list(call_or_output) if isinstance(call_or_output, tuple) else []
    for cache in found:
        if cache is not None and hasattr(cache, "get_seq_length"):
            return cache
    if isinstance(call_or_output, dict) and any(c is not None for c in found):
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


def next_position(positions, attention_mask):
    """The position id of the first generated token, ``[B]`` (or ``[R, B]`` for M-RoPE), for
    a model that numbers decode steps itself (generate passes none).  5.x continues from the
    prompt's last column (after a right-padded row's padding; not from its largest position,
    which 5.3-5.4 give Qwen2.5-VL images); 4.57 (the Qwen models' ``rope_deltas``) from the
    largest position of the prompt's tokens."""
    if installed().startswith("4."):
        valid = (attention_mask != 0).expand_as(positions)
        return positions.masked_fill(~valid, -1).amax(-1) + 1
    return positions[..., -1] + 1


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


def encoder_call(kw: dict, modality: str, compute):
    """The encoder output for the images (or videos) of a forward call: ``generate``'s
    precomputed one (5.19 and later), else ``compute(**output_kwargs())`` -- the model's
    ``get_image_features`` / ``get_video_features`` -- when the call brings pixels; None
    without that input."""
    out = encoder_output(kw, modality)
    if out is None and kw.get("pixel_values" if modality == "image" else "pixel_values_videos") is not None:
        out = compute(**output_kwargs())
    return out


def item_features(kw: dict, modality: str, compute):
    """Per image (or video), its [n_i, H] features (:func:`encoder_call`, split by
    :func:`per_item`), or None without that input."""
    out = encoder_call(kw, modality, compute)
    return None if out is None else per_item(out)


def per_item(out) -> list:
    """Per image (or video), its [n_i, H] features, from what ``get_*_features`` returned:
    the output's ``pooler_output`` in 5.0-5.25, the features themselves in 4.57."""
    return list(out.pooler_output if hasattr(out, "pooler_output") else out)
