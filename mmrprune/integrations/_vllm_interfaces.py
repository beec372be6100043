"""The vLLM interfaces mmrprune's plugin relies on, checked when the engine starts.

The plugin subclasses vLLM's Qwen2.5-VL and Qwen3-VL classes, overrides some of their methods,
calls others and wraps two runner methods.  :func:`check` verifies, on whatever vLLM is
installed, that each of them still exists with the signature the plugin was written against,
and that the hooks it overrides are still called where vLLM called them; it refuses with one
message naming the vLLM version and every difference.  It cannot see a change of behaviour
behind an unchanged signature: :data:`TESTED` lists the versions whose behaviour the tests ran.
"""
from __future__ import annotations

import importlib
import inspect
import warnings
from dataclasses import dataclass
from typing import Optional

from .vllm_config import ENV

TESTED = ("0.32.0",)

_MODELS = "vllm.model_executor.models."
_EMBEDS = "self, image_embeds_split, image_input"
_VIDEO_EMBEDS = "self, video_embeds_split, video_input"
_MROPE = "self, input_tokens, mm_features"
_RECOMPUTE = "self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens"
_PROMPT_UPDATES = "self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs"


@dataclass(frozen=True)
class Interface:
    """``target`` (``module:qualified.name``) must exist; ``params`` is its expected signature
    (``None``: existence only); ``called_from`` (``module:qualified.name``) must still call it;
    ``own`` means the attribute must be defined by that very class, not inherited."""
    target: str
    use: str
    params: Optional[str] = None
    called_from: Optional[str] = None
    own: bool = False


def _family(module: str, model: str, processor: str, info: str, dummy: str, extra=()) -> tuple:
    m = _MODELS + module + ":"
    return (
        Interface(m + model, "subclassed"),
        Interface(m + model + ".__init__", "extended", "self, *, vllm_config, prefix="),
        Interface(m + model + "._postprocess_image_embeds_evs", "overridden", _EMBEDS, m + model + ".embed_multimodal"),
        Interface(m + model + "._postprocess_video_embeds_evs", "overridden", _VIDEO_EMBEDS,
                  m + model + ".embed_multimodal"),
        Interface(m + model + ".get_mrope_input_positions", "overridden", _MROPE),
        Interface(m + model + ".recompute_mrope_positions", "overridden", _RECOMPUTE),
        Interface(m + processor + "._get_prompt_updates", "overridden", _PROMPT_UPDATES),
        Interface(m + info, "registered with the processor"),
        Interface(m + dummy, "registered with the processor"),
    ) + tuple(Interface(m + target, use, params, called) for target, use, params, called in extra)


QWEN25 = _family("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLMultiModalProcessor",
                 "Qwen2_5_VLProcessingInfo", "Qwen2_5_VLDummyInputsBuilder",
                 [("Qwen2_5_VLForConditionalGeneration.iter_mm_grid_thw", "called", "self, mm_features", None)])
QWEN3 = _family("qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLMultiModalProcessor",
                "Qwen3VLProcessingInfo", "Qwen3VLDummyInputsBuilder", [
                    ("Qwen3VLMultiModalProcessor.get_video_repl", "called",
                     "*, tokens_per_frame, timestamps, tokenizer, vision_start_token_id, vision_end_token_id, "
                     "video_token_id, select_token_id=", None),
                    # vLLM splits our rows into main and DeepStack columns there
                    ("Qwen3VLForConditionalGeneration._compute_deepstack_embeds", "fed our rows",
                     "self, inputs_embeds, multimodal_embeddings, is_multimodal",
                     _MODELS + "qwen3_vl:Qwen3VLForConditionalGeneration.embed_input_ids"),
                    ("Qwen3VLForConditionalGeneration.get_language_model", "called", "self", None)])
COMMON = (
    Interface("vllm:ModelRegistry.register_model", "called", "model_arch, model_cls"),
    Interface("vllm.multimodal:MULTIMODAL_REGISTRY.register_processor", "called",
              "processor, *, info, dummy_inputs"),
    Interface("vllm.multimodal.processing:PromptReplacement", "constructed", "modality, target, replacement"),
    Interface(_MODELS + "interfaces:supports_multimodal_pruning", "called", "model"),
    Interface("vllm.config.multimodal:MultiModalConfig.is_multimodal_pruning_enabled", "called", "self"),
    Interface("vllm.v1.worker.gpu_model_runner:GPUModelRunner.get_model", "called", "self"),
)


def _recompute_called_by(runner: str) -> Interface:
    """The runner method that hands each prefill chunk's media rows to recompute_mrope_positions."""
    return Interface(_MODELS + "interfaces:SupportsMultiModalPruning.recompute_mrope_positions",
                     "called by the runner", _RECOMPUTE, runner)


CPU_RUNNER = (
    _recompute_called_by("vllm.v1.worker.gpu_model_runner:GPUModelRunner._gather_mm_embeddings"),
    Interface("vllm.v1.worker.cpu_model_runner:CPUModelRunner.load_model", "wrapped", "self, load_dummy_weights=",
              own=True),
)
GPU_RUNNER = (
    Interface("vllm.v1.worker.gpu_model_runner:GPUModelRunner.load_model", "wrapped",
              "self, load_dummy_weights=, *, model=", own=True),
    Interface("vllm.v1.worker.gpu.model_states.default:DefaultModelState.__init__", "wrapped",
              "self, vllm_config, model, encoder_cache, device", own=True),
    Interface("vllm.v1.worker.gpu.model_states.mm_pruning:MultiModalPruner", "constructed",
              "model, rope_state, encoder_cache, inputs_embeds_size"),
    _recompute_called_by("vllm.v1.worker.gpu_model_runner:GPUModelRunner._gather_mm_embeddings"),
    _recompute_called_by("vllm.v1.worker.gpu.model_states.mm_pruning:MultiModalPruner.recompute"),
)


def signature(obj) -> str:
    """``obj``'s parameters as ``"self, a, *, b="`` (names, kinds, which have defaults)."""
    parts, keyword_only = [], False
    for p in inspect.signature(obj).parameters.values():
        if p.kind is p.KEYWORD_ONLY and not keyword_only:
            parts.append("*")
        keyword_only = keyword_only or p.kind in (p.KEYWORD_ONLY, p.VAR_POSITIONAL)
        name = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        parts.append(name + ("=" if p.default is not p.empty else ""))
    return ", ".join(parts)


def _resolve(target: str):
    module, _, qualname = target.partition(":")
    obj = importlib.import_module(module)
    owner = None
    for name in qualname.split("."):
        owner, obj = obj, getattr(obj, name)
    return owner, qualname.split(".")[-1], obj


def problems(interfaces) -> list:
    """One line per interface that is missing or differs."""
    out = []
    for it in interfaces:
        try:
            owner, name, obj = _resolve(it.target)
        except (ImportError, AttributeError) as exc:
            out.append(f"{it.target} ({it.use}) is missing: {type(exc).__name__}: {exc}")
            continue
        if it.own and name not in vars(owner):
            out.append(f"{it.target} ({it.use}) is no longer defined by {owner.__name__} itself")
            continue
        if it.params is not None:
            try:
                got = signature(obj)
            except (TypeError, ValueError):
                got = "<no signature>"
            if got != it.params:
                out.append(f"{it.target} ({it.use}) takes ({got}), expected ({it.params})")
                continue
        if it.called_from is not None:
            try:
                source = inspect.getsource(_resolve(it.called_from)[2])
            except (ImportError, AttributeError, OSError, TypeError) as exc:
                out.append(f"{it.called_from} (which calls {name}) is missing: {exc}")
                continue
            if name not in source:
                out.append(f"{it.called_from} no longer calls {name} ({it.use})")
    return out


def check(on_cpu: bool) -> None:
    """Refuse (``RuntimeError``) unless every interface the plugin relies on is as expected."""
    import vllm
    interfaces = COMMON + QWEN25 + QWEN3 + (CPU_RUNNER if on_cpu else GPU_RUNNER)
    found = problems(interfaces)
    if found:
        lines = "\n  - ".join(found)
        raise RuntimeError(f"{ENV} is set, but mmrprune's vLLM plugin cannot run on vllm {vllm.__version__}: "
                           f"these vLLM interfaces it relies on are missing or changed:\n  - {lines}\n"
                           f"Tested with vllm {', '.join(TESTED)}. Unset {ENV} to run vLLM without pruning.")
    if vllm.__version__ not in TESTED:
        warnings.warn(f"mmrprune's vLLM plugin was tested with vllm {', '.join(TESTED)}, not {vllm.__version__}; "
                      "every vLLM interface it relies on is present with the expected signature, but a change "
                      "of behaviour behind them would go unnoticed", UserWarning, stacklevel=2)
