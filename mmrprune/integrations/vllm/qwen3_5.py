"""mmrprune's pruning subclasses of vLLM's Qwen3.5 and Qwen3.5-MoE (images and videos).

vLLM's Qwen3.5 models are Qwen3-VL subclasses (a hybrid language model behind Qwen3-VL's vision
tower, DeepStack and video layout) registered with Qwen3-VL's own multimodal processor, so the
Qwen3-VL pruning (:mod:`.qwen3_vl`) applies unchanged; the interface check verifies that they
still derive from Qwen3-VL.
"""
from __future__ import annotations

from vllm.model_executor.models.qwen3_5 import (Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration,
                                                Qwen3_5MoeProcessingInfo, Qwen3_5ProcessingInfo)
from vllm.model_executor.models.qwen3_vl import Qwen3VLDummyInputsBuilder
from vllm.multimodal import MULTIMODAL_REGISTRY

from .qwen3_vl import MMRPruneQwen3VLProcessor, Qwen3VLPruning

ARCHITECTURES = ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")


@MULTIMODAL_REGISTRY.register_processor(MMRPruneQwen3VLProcessor, info=Qwen3_5ProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class MMRPruneQwen3_5(Qwen3VLPruning, Qwen3_5ForConditionalGeneration):
    """Qwen3.5 whose image and video embeddings are pruned by mmrprune."""


@MULTIMODAL_REGISTRY.register_processor(MMRPruneQwen3VLProcessor, info=Qwen3_5MoeProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class MMRPruneQwen3_5Moe(Qwen3VLPruning, Qwen3_5MoeForConditionalGeneration):
    """Qwen3.5-MoE whose image and video embeddings are pruned by mmrprune."""


def classes() -> list:
    """``(architecture, model class, processor class)`` of each model this module prunes."""
    return [(ARCHITECTURES[0], MMRPruneQwen3_5, MMRPruneQwen3VLProcessor),
            (ARCHITECTURES[1], MMRPruneQwen3_5Moe, MMRPruneQwen3VLProcessor)]
