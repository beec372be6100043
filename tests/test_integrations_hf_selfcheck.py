"""The self-check that replaces the blanket refusal of transformers releases newer than the
tested window (mmrprune/integrations/hf/selfcheck.py): on the installed release with a faked
newer version string it passes for every family, with one warning naming the window; with one
of the conventions it covers broken on purpose, it refuses and says what differed."""
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mmrprune.integrations import enable_visual_token_pruning  # noqa: E402
from mmrprune.integrations.hf import selfcheck, versions  # noqa: E402

from hf_families import (GEMMA3, INTERNVL, LLAVA, LLAVA_NEXT, LLAVA_ONEVISION, QWEN2_5_VL, QWEN2_VL,  # noqa: E402
                         QWEN3_VL, QWEN3_VL_MOE, one_thread)  # noqa: F401

IMAGE_SPECS = (LLAVA, QWEN2_VL, QWEN2_5_VL, QWEN3_VL, QWEN3_VL_MOE, GEMMA3, INTERNVL, LLAVA_NEXT, LLAVA_ONEVISION)


@pytest.fixture(scope="module")
def llava():
    return LLAVA.build()


@pytest.fixture
def newer(monkeypatch):
    """A release past the window, and no remembered pass."""
    monkeypatch.setattr(versions, "installed", lambda: "5.26.0")
    monkeypatch.setattr(selfcheck, "_PASSED", {})


@pytest.mark.parametrize("spec", IMAGE_SPECS, ids=lambda s: s.name)
def test_a_newer_release_passes_the_self_check_with_one_warning(spec, newer):
    model = spec.build()
    batch = spec.batch(model)
    with torch.no_grad():
        want = model(**batch).logits
    with pytest.warns(UserWarning, match=f"transformers 5.26.0 is newer than the releases this integration is "
                                         f"tested on \\({versions.specifier()}\\); its self-check") as record:
        p = enable_visual_token_pruning(model, k=100_000)
    assert len(record) == 1 and record[0].filename == __file__
    with torch.no_grad():                 # keep-all: the user's model is pruned as usual
        got = model(**batch).logits
    p.remove()
    am = batch["attention_mask"].bool()
    assert torch.allclose(got[am], want[am], atol=1e-5)
    import warnings
    with warnings.catch_warnings():       # the pass is remembered: no second check, no second warning
        warnings.simplefilter("error")
        enable_visual_token_pruning(model, k=2).remove()


def test_a_broken_cache_convention_is_refused(llava, newer, monkeypatch):
    """generate passes the KV cache under a name the integration does not know (as 5.25 did):
    the cached decode step no longer matches the uncached recompute."""
    monkeypatch.setattr(versions, "CACHE_KEYS", ("kv_cache",))
    with pytest.raises(RuntimeError, match="5.26.0 is newer .* self-check on a tiny llava model failed: .*decode") \
            as exc:
        enable_visual_token_pruning(llava, k=2)
    assert "pip install 'transformers" in str(exc.value) and not getattr(llava, "_mmrprune_pruner", None)


def test_a_broken_feature_convention_is_refused(llava, newer, monkeypatch):
    """get_image_features returns its items in another order: the pruned prefill no longer
    matches the masked unpruned forward."""
    per_item = versions.per_item
    monkeypatch.setattr(versions, "per_item", lambda out: per_item(out)[::-1])
    with pytest.raises(RuntimeError, match="self-check on a tiny llava model failed: the pruned prefill's logits "
                                           "differ from the masked unpruned forward's by"):
        enable_visual_token_pruning(llava, k=2)


def test_a_family_without_a_probe_is_refused(llava, newer, monkeypatch):
    monkeypatch.setattr(selfcheck, "PROBES", {})
    with pytest.raises(RuntimeError, match="llava models have no self-check"):
        enable_visual_token_pruning(llava, k=2)


def test_a_prerelease_of_the_next_release_is_newer(monkeypatch):
    assert versions.check("5.26.0.dev0") is False and versions.check("6.0.0") is False
    assert versions.check(versions.floor()) is True
    with pytest.raises(RuntimeError, match="outside"):
        versions.check("4.57.5")
    assert sys.modules["transformers"].__version__ == versions.installed()
