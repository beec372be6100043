"""The supported model families: one adapter each (see :mod:`.family`)."""
from __future__ import annotations

from .family import Family
from .llava import Llava
from .qwen2_vl import Qwen2VL
from .llava_next import LlavaNext, LlavaOnevision
from .gemma3 import Gemma3
from .internvl import InternVL
from .qwen3_vl import Qwen3_5, Qwen3VL

FAMILIES: tuple = (Llava, LlavaNext, LlavaOnevision, Qwen2VL, Gemma3, InternVL, Qwen3VL, Qwen3_5)


def family_of(model) -> type[Family]:
    """The adapter class covering ``model``, by the class names in its MRO."""
    names = {c.__name__ for c in type(model).__mro__}
    for fam in FAMILIES:
        if names & set(fam.model_classes):
            return fam
    supported = ", ".join(name for fam in FAMILIES for name in fam.model_classes)
    raise TypeError(f"prune_visual_tokens: unsupported model {type(model).__name__}; supported: {supported}")
