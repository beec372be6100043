"""The plugin's check of the vLLM interfaces it relies on, on the installed vLLM (in-process).

A changed vLLM is faked by monkeypatching one of those interfaces; ``register()`` (what vLLM
runs at engine start) must then refuse with a message naming the vLLM version and the change."""
import pytest

pytest.importorskip("vllm", reason="vllm is not installed here; run `bash scripts/setup_vllm.sh`")

import vllm  # noqa: E402
from vllm.model_executor.models import qwen2_5_vl, qwen3_vl  # noqa: E402
from vllm.v1.worker import cpu_model_runner  # noqa: E402

from mmrprune.integrations import _vllm_interfaces as interfaces  # noqa: E402
from mmrprune.integrations import vllm as plugin  # noqa: E402

QWEN25 = qwen2_5_vl.Qwen2_5_VLForConditionalGeneration
QWEN3 = qwen3_vl.Qwen3VLForConditionalGeneration


def test_installed_vllm_has_every_interface():
    assert vllm.__version__ in interfaces.TESTED
    assert interfaces.problems(interfaces.COMMON + interfaces.QWEN25 + interfaces.QWEN3 + interfaces.CPU_RUNNER
                               + interfaces.GPU_RUNNER) == []


def _refusal(monkeypatch):
    monkeypatch.setenv(plugin.ENV, "k=8")
    monkeypatch.setattr(plugin, "_config", None)      # each test starts from an unregistered plugin
    with pytest.raises(RuntimeError) as exc:
        plugin.register()
    message = str(exc.value)
    assert f"cannot run on vllm {vllm.__version__}" in message and "Tested with vllm 0.32.0" in message
    assert plugin.active_config() is None
    return message


def test_changed_signature_is_refused(monkeypatch):
    def postprocess(self, image_embeds_split, image_input, extra):   # a new required parameter
        return image_embeds_split
    monkeypatch.setattr(QWEN25, "_postprocess_image_embeds_evs", postprocess)
    message = _refusal(monkeypatch)
    assert ("vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration._postprocess_image_embeds_evs "
            "(overridden) takes (self, image_embeds_split, image_input, extra), expected "
            "(self, image_embeds_split, image_input)") in message


def test_missing_method_is_refused(monkeypatch):
    monkeypatch.delattr(qwen3_vl.Qwen3VLMultiModalProcessor, "get_video_repl")
    assert "Qwen3VLMultiModalProcessor.get_video_repl (called) is missing" in _refusal(monkeypatch)


def test_hook_no_longer_called_is_refused(monkeypatch):
    def embed_multimodal(self, **kwargs):     # a vLLM that stopped post-processing the embeddings
        return self._process_image_input(kwargs)
    monkeypatch.setattr(QWEN3, "embed_multimodal", embed_multimodal)
    message = _refusal(monkeypatch)
    assert "Qwen3VLForConditionalGeneration.embed_multimodal no longer calls _postprocess_image_embeds_evs" in message
    assert "no longer calls _postprocess_video_embeds_evs" in message


def test_runner_method_moved_to_a_base_class_is_refused(monkeypatch):
    # the CPU runner must define load_model itself: the plugin wraps that very method
    monkeypatch.delattr(cpu_model_runner.CPUModelRunner, "load_model")
    assert "CPUModelRunner.load_model (wrapped) is no longer defined by CPUModelRunner itself" in _refusal(monkeypatch)


def test_untested_version_with_every_interface_warns(monkeypatch):
    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    with pytest.warns(UserWarning, match="tested with vllm 0.32.0, not 0.99.0"):
        interfaces.check(on_cpu=True)


def test_signature_spelling():
    def f(self, a, b=1, *args, c, d=2, **kw):
        pass

    def g(*, x, y=0):
        pass
    assert interfaces.signature(f) == "self, a, b=, *args, c, d=, **kw"
    assert interfaces.signature(g) == "*, x, y="
