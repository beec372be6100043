"""The changes mmrprune makes to vLLM's model runners.

vLLM calls a model's ``recompute_mrope_positions`` (and strips the position columns its pruning
models append to their embeddings) only where it thinks pruning is on, and it thinks so from
``video_pruning_rate > 0`` alone:

* V1 runners set ``is_multimodal_pruning_enabled`` in ``load_model``.  ``GPUModelRunner`` uses
  vLLM's rule; ``CPUModelRunner`` overrides ``load_model`` and never sets the flag at all (a vLLM
  bug that also breaks EVS video pruning on CPU).  After the runner's own ``load_model`` we set
  the flag by vLLM's rule, extended by one case: the loaded model is an mmrprune pruning class.
* The V2 runner (vLLM's default on GPU) creates its ``MultiModalPruner`` in
  ``DefaultModelState.__init__`` by the same rule; we create it for mmrprune's classes too.

Other models get exactly vLLM's behaviour.  Each wrapper is applied once.
"""
from __future__ import annotations

import functools

_MARK = "_mmrprune_wrapped"


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


def _add_v2_pruner(state) -> None:  # not run in this project's tests (no GPU): unverified
    from vllm.v1.worker.gpu.model_states.mm_pruning import MultiModalPruner
    encoder_cache = getattr(state, "encoder_cache", None)      # set only for multimodal models
    if state.mm_pruner is None and _ours(state.model) and state.rope_state is not None and encoder_cache is not None:
        state.mm_pruner = MultiModalPruner(state.model, state.rope_state, encoder_cache, state.inputs_embeds_size)


def install_runner_fix() -> None:
    from vllm.platforms import current_platform
    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
        _wrap(CPUModelRunner, "load_model", _set_v1_flag)
        return
    # not run in this project's tests (no GPU): unverified
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    _wrap(GPUModelRunner, "load_model", _set_v1_flag)
    _wrap(DefaultModelState, "__init__", _add_v2_pruner)
