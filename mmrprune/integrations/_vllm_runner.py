"""The one change mmrprune makes to vLLM's model runners (vllm 0.32.x only).

vLLM rewrites a request's M-RoPE positions after its encoder ran (``recompute_mrope_positions``)
only when the runner's ``is_multimodal_pruning_enabled`` flag is set.  In vllm 0.32:

* ``GPUModelRunner.load_model`` sets it from ``video_pruning_rate > 0`` alone, so a model that
  prunes images with video pruning off would keep the positions of the placeholder layout;
* ``CPUModelRunner.load_model`` overrides that method and never sets the flag at all, a vLLM
  bug that also breaks EVS video pruning on CPU (the runner then feeds the 4 position channels
  to the decoder as embedding columns).

After the runner's own ``load_model`` we set the flag by vLLM's rule, extended by one case: the
loaded model is mmrprune's pruning class.  Nothing else changes, and other models get exactly
vLLM's GPU rule.  Guarded by version (the caller checks vllm 0.32.x) and applied once.
"""
from __future__ import annotations

_MARK = "_mmrprune_pruning_flag"


def _set_pruning_flag(runner) -> None:
    from vllm.model_executor.models.interfaces import supports_multimodal_pruning
    model = runner.get_model()
    mm_config = runner.model_config.multimodal_config
    runner.is_multimodal_pruning_enabled = bool(supports_multimodal_pruning(model) and (
        getattr(model, "mmrprune_prunes_images", False)
        or (mm_config is not None and mm_config.is_multimodal_pruning_enabled())))


def _wrap(cls) -> None:
    original = cls.__dict__.get("load_model")
    if original is None or getattr(original, _MARK, False):
        return

    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        _set_pruning_flag(self)
        return result

    setattr(load_model, _MARK, True)
    load_model.__wrapped__ = original
    load_model.__doc__ = original.__doc__
    cls.load_model = load_model


def install_runner_fix() -> None:
    from vllm.platforms import current_platform
    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
        _wrap(CPUModelRunner)
    else:  # not run in this project's tests (no GPU): unverified
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
        _wrap(GPUModelRunner)
