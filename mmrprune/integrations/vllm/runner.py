"""Which vLLM model runner the plugin works with, and the one change it makes to it.

vLLM calls a pruning model's ``recompute_mrope_positions`` (and strips the position columns
the model appends to its embeddings) only where it thinks pruning is on, and it thinks so from
its own video pruning settings alone.  For mmrprune's classes the runner must do the same:

* ``v2``: the V2 model runner with the model states of ``vllm/v1/worker/gpu/model_states``
  (the GPU runner of every supported vLLM; the CPU V2 runner of vLLM releases that reuse those
  states).  A model may name its own state class (``get_model_state_cls``); mmrprune's classes
  name a subclass of the state vLLM would have used (``DefaultModelState``, or
  ``MambaHybridModelState`` for the hybrid Qwen3.5) that adds vLLM's ``MultiModalPruner``.
  No vLLM code is patched.
* ``v2-cpu``: the CPU V2 runner with its own model states (``vllm/v1/worker/cpu``), which
  refuses a model's own state class; its ``DefaultModelState.__init__`` is wrapped to add the
  CPU ``MultiModalPruner`` for mmrprune's classes.
* ``v1``: the V1 runners set ``is_multimodal_pruning_enabled`` in ``load_model``;
  ``CPUModelRunner`` overrides ``load_model`` and never sets the flag (a vLLM bug that also
  breaks EVS video pruning on CPU).  Their ``load_model`` is wrapped to set the flag by vLLM's
  rule, extended by one case: the loaded model is an mmrprune pruning class.

Where a vLLM has both runners, the plugin chooses one explicitly (:func:`choose`): the one
``VLLM_USE_V2_MODEL_RUNNER`` asks for, else V2 where vLLM can run it (it needs Triton, which
on CPU means a Triton with a CPU backend), else V1; it then sets ``VLLM_USE_V2_MODEL_RUNNER``
so the engine runs the runner whose interfaces were checked, and each pruning model verifies
at load time that it did.  Other models get exactly vLLM's behaviour.  Each wrapper is applied once.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

from .config import ENV

V2_ENV = "VLLM_USE_V2_MODEL_RUNNER"
_MARK = "_mmrprune_wrapped"
_V1_MODULE = {"cpu": "vllm.v1.worker.cpu_model_runner", "gpu": "vllm.v1.worker.gpu_model_runner"}
_CPU_STATES = "vllm.v1.worker.cpu.model_states"


@dataclass(frozen=True)
class Runner:
    """``name``: ``v1``, ``v2`` or ``v2-cpu`` (module docstring); ``device``: ``cpu`` or
    ``gpu``; ``why``: how it was chosen, for messages."""
    name: str
    device: str
    why: str

    @property
    def v2(self) -> bool:
        return self.name != "v1"


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:          # a parent package is missing
        return False


def choose(pin: bool = False, on_cpu=None) -> Runner:
    """The runner the engine will use; ``pin``: set ``VLLM_USE_V2_MODEL_RUNNER`` to it where
    vLLM has both and the user did not choose (the engine then cannot pick the other)."""
    if on_cpu is None:
        from vllm.platforms import current_platform
        on_cpu = current_platform.is_cpu()
    device = "cpu" if on_cpu else "gpu"
    v2 = "v2-cpu" if on_cpu and _exists(_CPU_STATES) else "v2"
    if not _exists(_V1_MODULE[device]):
        return Runner(v2, device, "the only model runner of this vLLM")
    raw = os.environ.get(V2_ENV)
    if raw is not None and raw.strip():
        try:
            wanted = bool(int(raw))
        except ValueError:
            raise ValueError(f"{ENV}: {V2_ENV}={raw!r} is not 0 or 1; set it to 0 (V1 model runner) or 1 (V2), or "
                             "unset it") from None
        return Runner(v2 if wanted else "v1", device, f"{V2_ENV}={raw.strip()}")
    from vllm.triton_utils import HAS_TRITON
    name, why = (v2, "vLLM has both runners and Triton") if HAS_TRITON else (
        "v1", "vLLM has both runners; V2 needs Triton" + (" with a CPU backend" if on_cpu else "") +
        ", which is not installed")
    if pin:
        os.environ[V2_ENV] = "1" if name != "v1" else "0"
        why += f"; the plugin set {V2_ENV}={os.environ[V2_ENV]}"
    return Runner(name, device, why)


def verify(model, vllm_config) -> None:
    """At model load: the engine runs the runner :func:`choose` chose (vLLM can override the
    environment, e.g. for features only one runner has)."""
    chosen = getattr(model, "mmrprune_runner", None)
    uses_v2 = getattr(vllm_config, "use_v2_model_runner", None)
    if chosen is None or uses_v2 is None:
        return
    if bool(uses_v2) != (chosen != "v1"):
        raise RuntimeError(f"{ENV}: mmrprune's vLLM plugin checked and prepared the {chosen} model runner, but this "
                           f"engine runs the {'V2' if uses_v2 else 'V1'} runner (vLLM overrode {V2_ENV}); set "
                           f"{V2_ENV}={1 if uses_v2 else 0} before starting, or unset {ENV}")


# ----------------------------------------------------------------------------- the changes
def _ours(model) -> bool:
    return bool(getattr(model, "mmrprune_prunes", False))


def _wrap(cls, name: str, after) -> None:
    original = cls.__dict__[name]
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        after(self)
        return result

    setattr(wrapper, _MARK, True)
    setattr(cls, name, wrapper)


def _set_v1_flag(runner) -> None:
    from vllm.model_executor.models.interfaces import supports_multimodal_pruning
    model = runner.get_model()
    mm_config = runner.model_config.multimodal_config
    runner.is_multimodal_pruning_enabled = bool(supports_multimodal_pruning(model) and (
        _ours(model) or (mm_config is not None and mm_config.is_multimodal_pruning_enabled())))


def _add_pruner(state, pruner_cls) -> None:
    encoder_cache = getattr(state, "encoder_cache", None)      # set only for multimodal models
    if state.mm_pruner is None and _ours(state.model) and state.rope_state is not None and encoder_cache is not None:
        state.mm_pruner = pruner_cls(state.model, state.rope_state, encoder_cache, state.inputs_embeds_size)


@functools.lru_cache(maxsize=None)
def pruning_state(base):
    """``base`` (a V2 model state class) that also creates vLLM's ``MultiModalPruner`` for
    mmrprune's classes, which vLLM creates only when its own video pruning is on."""
    from vllm.v1.worker.gpu.model_states.mm_pruning import MultiModalPruner

    def __init__(self, vllm_config, model, encoder_cache, device):
        base.__init__(self, vllm_config, model, encoder_cache, device)
        _add_pruner(self, MultiModalPruner)
    return type(f"MMRPrune{base.__name__}", (base,), {"__init__": __init__, "__module__": __name__})


def get_model_state_cls(model):
    """The V2 runner's model-state hook, bound to mmrprune's classes when the runner is ``v2``:
    the state vLLM would have chosen for the model (hybrid or default), plus the pruner."""
    if getattr(model, "is_hybrid", False):
        from vllm.v1.worker.gpu.model_states.mamba_hybrid import MambaHybridModelState as base
    else:
        from vllm.v1.worker.gpu.model_states.default import DefaultModelState as base
    return pruning_state(base)


def install(runner: Runner, classes=()) -> None:
    """Make ``runner`` reposition mmrprune's classes (module docstring); ``classes``: the
    pruning model classes registered with vLLM."""
    if runner.name == "v1":
        if runner.device == "cpu":
            from vllm.v1.worker.cpu_model_runner import CPUModelRunner as V1Runner
        else:   # not run in this project's tests (no GPU): unverified
            from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1Runner
        _wrap(V1Runner, "load_model", _set_v1_flag)
    elif runner.name == "v2-cpu":   # checked against vLLM 0.34's sources; no CPU V2 engine runs here
        from vllm.v1.worker.cpu.mm_pruning import MultiModalPruner
        from vllm.v1.worker.cpu.model_states.default import DefaultModelState
        _wrap(DefaultModelState, "__init__", functools.partial(_add_pruner, pruner_cls=MultiModalPruner))
    for cls in classes:
        if runner.name == "v2":
            cls.get_model_state_cls = get_model_state_cls
        elif "get_model_state_cls" in cls.__dict__:    # a runner that refuses the hook
            del cls.get_model_state_cls
