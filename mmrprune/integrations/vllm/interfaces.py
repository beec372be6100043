"""The vLLM interfaces mmrprune's plugin relies on, checked when the engine starts.

The plugin subclasses vLLM's Qwen2.5-VL, Qwen3-VL and Qwen3.5 classes, overrides some of their
methods, calls others and changes one step of the model runner (:mod:`.runner`).  :func:`check`
verifies, on whatever vLLM is installed, that each of them still exists with the signature the
plugin was written against, and that the hooks it overrides are still called where vLLM called
them; it refuses with one message naming the vLLM version, the runner and every difference.
Each runner has its own list (:data:`RUNNERS`); a model's list is checked where the installed
vLLM has that model (:data:`MODELS`).  It cannot see a change of behaviour behind an unchanged
signature: :data:`TESTED` lists the versions whose behaviour the tests ran, :data:`CHECKED` those
whose interfaces CI checked without running an engine.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import warnings
from dataclasses import dataclass
from typing import Optional

from .config import ENV

TESTED = ("0.32.0",)
CHECKED = ("0.33.0", "0.34.0")

_MODELS = "vllm.model_executor.models."
_EMBEDS = "self, image_embeds_split, image_input"
_VIDEO_EMBEDS = "self, video_embeds_split, video_input"
_MROPE = "self, input_tokens, mm_features"
_RECOMPUTE = "self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens"
_PROMPT_UPDATES = "self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs"
_STATE_INIT = "self, vllm_config, model, encoder_cache, device"


@dataclass(frozen=True)
class Interface:
    """``target`` (``module:qualified.name``) must exist; ``params`` is its expected signature
    (``None``: existence only); ``called_from`` (``module:qualified.name``) must still call it;
    ``own`` means the attribute must be defined by that very class, not inherited; ``mentions``:
    names the target's source must still contain (attributes it sets or reads);
    ``subclass_of`` (``module:Class``): the target class must still derive from it."""
    target: str
    use: str
    params: Optional[str] = None
    called_from: Optional[str] = None
    own: bool = False
    mentions: tuple = ()
    subclass_of: Optional[str] = None


def _family(module: str, model: str, processor: str, info: str, dummy: str, extra=(), subclass_of=None) -> tuple:
    m = _MODELS + module + ":"
    return (
        Interface(m + model, "subclassed", subclass_of=subclass_of),
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


def _qwen3_extra(model: str, module: str, deepstack: bool) -> list:
    """What the Qwen3-VL pruning code (shared by Qwen3.5) calls on the model."""
    fed = ((model + "._compute_deepstack_embeds", "fed our rows", "self, inputs_embeds, multimodal_embeddings, "
            "is_multimodal", _MODELS + module + ":" + model + ".embed_input_ids") if deepstack else
           # no DeepStack: the stripped rows are merged as they are
           (model + ".embed_input_ids", "fed our rows", "self, input_ids, multimodal_embeddings=, *, is_multimodal=",
            None))
    return [("Qwen3VLMultiModalProcessor.get_video_repl", "called",
             "*, tokens_per_frame, timestamps, tokenizer, vision_start_token_id, vision_end_token_id, "
             "video_token_id, select_token_id=", None),
            # with DeepStack, vLLM splits our rows into main and DeepStack columns there
            fed,
            (model + ".get_language_model", "called", "self", None)]


_QWEN3_5 = _MODELS + "qwen3_5:"
MODELS = {   # module of this package -> (vLLM module that must exist for it to apply, interfaces)
    "qwen2_5_vl": (_MODELS + "qwen2_5_vl", _family(
        "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLMultiModalProcessor",
        "Qwen2_5_VLProcessingInfo", "Qwen2_5_VLDummyInputsBuilder",
        [("Qwen2_5_VLForConditionalGeneration.iter_mm_grid_thw", "called", "self, mm_features", None)])),
    "qwen3_vl": (_MODELS + "qwen3_vl", _family(
        "qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLMultiModalProcessor", "Qwen3VLProcessingInfo",
        "Qwen3VLDummyInputsBuilder", _qwen3_extra("Qwen3VLForConditionalGeneration", "qwen3_vl", True))),
    # Qwen3.5 reuses Qwen3-VL's processor and pruning code: it must still be a Qwen3-VL
    "qwen3_5": (_MODELS + "qwen3_5", _family(
        "qwen3_5", "Qwen3_5ForConditionalGeneration", "Qwen3VLMultiModalProcessor", "Qwen3_5ProcessingInfo",
        "Qwen3VLDummyInputsBuilder", _qwen3_extra("Qwen3_5ForConditionalGeneration", "qwen3_5", False),
        subclass_of=_MODELS + "qwen3_vl:Qwen3VLForConditionalGeneration") + (
        Interface(_QWEN3_5 + "Qwen3_5ForConditionalGeneration.__init__", "read after it",
                  mentions=("self._tokenizer", "self.visual_dim", "self.multimodal_config")),
        Interface(_QWEN3_5 + "Qwen3_5MoeForConditionalGeneration", "subclassed",
                  subclass_of=_QWEN3_5 + "Qwen3_5ForConditionalGeneration"),
        Interface(_QWEN3_5 + "Qwen3_5MoeForConditionalGeneration.__init__", "extended", "self, *, vllm_config, prefix="),
        Interface(_QWEN3_5 + "Qwen3_5MoeProcessingInfo", "registered with the processor"))),
}
COMMON = (
    Interface("vllm:ModelRegistry.register_model", "called", "model_arch, model_cls"),
    Interface("vllm.multimodal:MULTIMODAL_REGISTRY.register_processor", "called",
              "processor, *, info, dummy_inputs"),
    Interface("vllm.multimodal.processing:PromptReplacement", "constructed", "modality, target, replacement"),
    Interface(_MODELS + "interfaces:supports_multimodal_pruning", "called", "model"),
    Interface("vllm.config.multimodal:MultiModalConfig.is_multimodal_pruning_enabled", "called", "self"),
)


def _recompute_called_by(caller: str) -> Interface:
    """The runner method that hands each prefill chunk's media rows to recompute_mrope_positions."""
    return Interface(_MODELS + "interfaces:SupportsMultiModalPruning.recompute_mrope_positions",
                     "called by the runner", _RECOMPUTE, caller)


_V1 = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
_V2_STATES = "vllm.v1.worker.gpu.model_states"
_CPU_STATES = "vllm.v1.worker.cpu.model_states"
_STATE_ATTRS = ("self.encoder_cache", "self.inputs_embeds_size", "self.model")


def _v2_states(states: str, pruning: str) -> tuple:
    """A V2 runner's model states: DefaultModelState creates (or not) the MultiModalPruner,
    which hands the media rows to recompute_mrope_positions."""
    return (
        Interface(f"{states}.default:DefaultModelState.__init__", "extended", _STATE_INIT, own=True,
                  mentions=("self.mm_pruner", "self.rope_state")),
        Interface(f"{states}.default:DefaultModelState", "its mm_pruner called", mentions=("self.mm_pruner.recompute",)),
        Interface(f"{states}.interface:ModelState.__init__", "read after it", _STATE_INIT, mentions=_STATE_ATTRS),
        Interface(f"{pruning}:MultiModalPruner", "constructed", "model, rope_state, encoder_cache, inputs_embeds_size"),
        _recompute_called_by(f"{pruning}:MultiModalPruner.recompute"),
    )


RUNNERS = {   # (runner name, device) -> interfaces
    ("v1", "cpu"): (
        Interface(f"{_V1}.get_model", "called", "self"),
        _recompute_called_by(f"{_V1}._gather_mm_embeddings"),
        Interface("vllm.v1.worker.cpu_model_runner:CPUModelRunner.load_model", "wrapped", "self, load_dummy_weights=",
                  own=True),
    ),
    ("v1", "gpu"): (
        Interface(f"{_V1}.get_model", "called", "self"),
        Interface(f"{_V1}.load_model", "wrapped", "self, load_dummy_weights=, *, model=", own=True),
        _recompute_called_by(f"{_V1}._gather_mm_embeddings"),
    ),
    ("v2", "gpu"): _v2_states(_V2_STATES, _V2_STATES + ".mm_pruning") + (
        Interface(f"{_V2_STATES}:resolve_model_state_cls", "asks the model for its state class", "vllm_config, model",
                  mentions=("get_model_state_cls",)),
        Interface(f"{_V2_STATES}.mamba_hybrid:MambaHybridModelState.__init__", "extended (Qwen3.5)", _STATE_INIT,
                  own=True),
    ),
    ("v2-cpu", "cpu"): _v2_states(_CPU_STATES, "vllm.v1.worker.cpu.mm_pruning") + (
        Interface("vllm.v1.worker.cpu.model_runner:CPUModelRunner", "runs these model states"),
    ),
}
# the CPU V2 runner of vLLM releases without CPU model states is the GPU V2 runner's subclass
RUNNERS[("v2", "cpu")] = RUNNERS[("v2", "gpu")] + (
    Interface("vllm.v1.worker.cpu.model_runner:CPUModelRunner", "runs the V2 GPU runner's model states",
              subclass_of="vllm.v1.worker.gpu.model_runner:GPUModelRunner"),
)


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def available_models() -> list:
    """This package's model modules whose vLLM model the installed vLLM has."""
    return [name for name, (module, _) in MODELS.items() if _exists(module)]


def model_modules() -> list:
    return [importlib.import_module(f"{__package__}.{name}") for name in available_models()]


def interfaces_for(runner) -> tuple:
    """Every interface the plugin relies on with ``runner`` (:class:`.runner.Runner`)."""
    return COMMON + sum((MODELS[name][1] for name in available_models()), ()) + RUNNERS[(runner.name, runner.device)]


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
        if it.subclass_of is not None:
            try:
                base = _resolve(it.subclass_of)[2]
            except (ImportError, AttributeError) as exc:
                out.append(f"{it.subclass_of} (the base of {name}) is missing: {type(exc).__name__}: {exc}")
                continue
            if not (inspect.isclass(obj) and issubclass(obj, base)):
                out.append(f"{it.target} ({it.use}) no longer derives from {it.subclass_of}")
                continue
        if it.mentions:
            try:
                source = inspect.getsource(obj)
            except (OSError, TypeError) as exc:
                out.append(f"{it.target} ({it.use}): its source cannot be read: {exc}")
                continue
            gone = [m for m in it.mentions if m not in source]
            if gone:
                out.append(f"{it.target} ({it.use}) no longer mentions {', '.join(gone)}")
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


def check(runner) -> None:
    """Refuse (``RuntimeError``) unless every interface the plugin relies on with ``runner`` is
    as expected."""
    import vllm
    found = problems(interfaces_for(runner))
    if found:
        lines = "\n  - ".join(found)
        raise RuntimeError(f"{ENV} is set, but mmrprune's vLLM plugin cannot run on vllm {vllm.__version__} with the "
                           f"{runner.name} model runner on {runner.device} ({runner.why}): these vLLM interfaces it "
                           f"relies on are missing or changed:\n  - {lines}\n"
                           f"Tested with vllm {', '.join(TESTED)}; interfaces checked on {', '.join(CHECKED)}. "
                           f"Unset {ENV} to run vLLM without pruning.")
    if vllm.__version__ not in TESTED:
        warnings.warn(f"mmrprune's vLLM plugin was tested with vllm {', '.join(TESTED)}, not {vllm.__version__}; "
                      "every vLLM interface it relies on is present with the expected signature, but a change "
                      "of behaviour behind them would go unnoticed", UserWarning, stacklevel=2)
