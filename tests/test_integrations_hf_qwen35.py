"""Qwen3.5 and Qwen3.5-MoE: a hybrid decoder (Gated-DeltaNet linear attention and full
attention), so the masked-forward check of the other families does not apply: masking a key
hides it from attention, but a linear-attention layer still folds it into its state.  The
reference here is the unpruned model's language model run on the kept tokens only, with
their original position ids -- built from the unpruned forward's own inputs and the kept
columns, without the integration's code.  Also: keep-all reproduces the unpruned logits and
generate, and the pruned cached generate equals the uncached recompute; images and videos."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen3_5ForConditionalGeneration"):
    pytest.skip(f"transformers {transformers.__version__} has no Qwen3.5", allow_module_level=True)

from packaging.specifiers import SpecifierSet  # noqa: E402

from mmrprune.integrations import enable_visual_token_pruning, prune_visual_tokens  # noqa: E402
from mmrprune.integrations.hf.qwen3_vl import Qwen3_5  # noqa: E402

from hf_check import check_cached_generate, language_model, recording  # noqa: E402
from hf_families import (QWEN_IMAGE, QWEN_VIDEO, QWEN_VISION_END, QWEN_VISION_START, FamilySpec,  # noqa: E402
                         _append, _qwen3_units, one_thread, qwen3_video_batch, qwen_batch,  # noqa: F401
                         with_video_budget)

# Releases that ship Qwen3.5 but predate the family's tested window refuse it at enable time:
# there only the refusal is tested.
IN_WINDOW = SpecifierSet(Qwen3_5.transformers).contains(transformers.__version__)


@pytest.fixture(autouse=True)
def _family_window(request):
    if not IN_WINDOW and "refused" not in request.node.name:
        pytest.skip(f"transformers {transformers.__version__} is outside Qwen3.5's tested releases "
                    f"({Qwen3_5.transformers}): enabling is refused there")


def build_qwen35(moe: bool = False):
    """One linear-attention and one full-attention layer (the user's model mixes both)."""
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, head_dim=16,
                num_key_value_heads=1, vocab_size=64, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                pad_token_id=0, layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
                                 "mrope_section": [2, 3, 3], "mrope_interleaved": True})
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                    shared_expert_intermediate_size=16)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16)
    ids = dict(image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_VISION_START,
               vision_end_token_id=QWEN_VISION_END)
    if moe:
        from transformers import Qwen3_5MoeConfig as Config, Qwen3_5MoeForConditionalGeneration as Model
    else:
        from transformers import Qwen3_5Config as Config, Qwen3_5ForConditionalGeneration as Model
    return Model(Config(vision_config=vision, text_config=text, **ids)).eval()


PLACEHOLDERS = (QWEN_IMAGE, QWEN_VIDEO, QWEN_VISION_START, QWEN_VISION_END)
EXTEND = lambda b, t: _append(b, t, "mm_token_type_ids")      # noqa: E731
SPECS = [FamilySpec(name="qwen3_5", build=build_qwen35, batch=qwen_batch,
                    prunable=lambda b: b["input_ids"] == QWEN_IMAGE,
                    image_tokens=lambda b: (b["image_grid_thw"].prod(-1) // 4).tolist(), extend=EXTEND,
                    placeholders=PLACEHOLDERS),
         FamilySpec(name="qwen3_5_moe", build=lambda: build_qwen35(moe=True), batch=qwen_batch,
                    prunable=lambda b: b["input_ids"] == QWEN_IMAGE,
                    image_tokens=lambda b: (b["image_grid_thw"].prod(-1) // 4).tolist(), extend=EXTEND,
                    placeholders=PLACEHOLDERS),
         FamilySpec(name="qwen3_5-video", build=build_qwen35, batch=qwen3_video_batch,
                    prunable=lambda b: (b["input_ids"] == QWEN_IMAGE) | (b["input_ids"] == QWEN_VIDEO),
                    image_tokens=lambda b: _qwen3_units(b, "video"), extend=EXTEND, placeholders=PLACEHOLDERS,
                    enable=with_video_budget("video")),
         FamilySpec(name="qwen3_5-frame", build=build_qwen35, batch=qwen3_video_batch,
                    prunable=lambda b: (b["input_ids"] == QWEN_IMAGE) | (b["input_ids"] == QWEN_VIDEO),
                    image_tokens=lambda b: _qwen3_units(b, "frame"), extend=EXTEND, placeholders=PLACEHOLDERS,
                    enable=with_video_budget("frame"))]


@pytest.fixture(scope="module", params=SPECS, ids=[s.name for s in SPECS])
def family(request):
    return request.param, request.param.build()


def kept_tokens_reference(model, batch, kept_columns):
    """Logits of the unpruned model's language model on each row's kept columns only (left
    padded), with the embeddings and position ids its unpruned forward gave those columns."""
    lm = language_model(model)
    with torch.no_grad(), recording(lm) as (calls, _):
        model(**batch)
    embeds, pos = calls[0][1]["inputs_embeds"], calls[0][1]["position_ids"]
    width = max(len(c) for c in kept_columns)
    rows_e = embeds.new_zeros(len(kept_columns), width, embeds.shape[-1])
    rows_p = pos.new_zeros(pos.shape[:-2] + (len(kept_columns), width))
    mask = torch.zeros(len(kept_columns), width, dtype=torch.long)
    for b, cols in enumerate(kept_columns):
        rows_e[b, width - len(cols):] = embeds[b, cols]
        rows_p[..., b, width - len(cols):] = pos[..., b, cols]
        mask[b, width - len(cols):] = 1
    with torch.no_grad():
        hidden = lm(inputs_embeds=rows_e, position_ids=rows_p, attention_mask=mask).last_hidden_state
    return model.get_output_embeddings()(hidden), mask


@pytest.mark.parametrize("budget", [dict(keep_ratio=0.25), dict(k=3)], ids=["keep_ratio", "k"])
def test_pruned_prefill_is_the_model_on_the_kept_tokens(family, budget):
    spec, model = family
    batch = spec.batch(model, seed=1)
    with torch.no_grad(), prune_visual_tokens(model, **spec.enable(dict(method="mmr", **budget))) as p:
        got = model(**batch).logits
    kept = p.last["kept_columns"]
    assert p.last["visual_after"] < p.last["visual_before"]
    want, mask = kept_tokens_reference(model, batch, kept)
    assert got.shape == want.shape
    am = mask.bool()
    torch.testing.assert_close(got[am], want[am], rtol=1e-4, atol=1e-5)


def test_the_reference_differs_from_masking(family):
    """Why the masked-forward check does not apply: masking the dropped tokens out of the
    attention is not the model on the kept tokens (the linear-attention layer still reads
    them), so the reference above is not a masked forward in disguise."""
    spec, model = family
    batch = spec.batch(model, seed=1)
    with torch.no_grad(), prune_visual_tokens(model, **spec.enable(dict(k=3))) as p:
        model(**batch)
    kept = p.last["kept_columns"]
    am = torch.zeros_like(batch["attention_mask"])
    for b, cols in enumerate(kept):
        am[b, cols] = 1
    with torch.no_grad(), recording(language_model(model)) as (calls, _):
        model(**batch)
    with torch.no_grad():          # the unpruned prompt's positions: the model would renumber around the holes
        masked = model(**dict(batch, attention_mask=am, position_ids=calls[0][1]["position_ids"])).logits
    want, mask = kept_tokens_reference(model, batch, kept)
    width = want.shape[1]
    assert not torch.allclose(masked[0, kept[0]], want[0, width - len(kept[0]):], atol=1e-4)


def test_keep_all_reproduces_the_unpruned_model(family):
    spec, model = family
    batch = spec.batch(model, seed=4)
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, suppress_tokens=list(PLACEHOLDERS) + [2],
              pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        ref = model(**batch).logits
        ref_gen = model.generate(**batch, **kw)
        with prune_visual_tokens(model, **spec.enable(dict(k=10**6))) as p:
            got = model(**batch).logits
            got_gen = model.generate(**batch, **kw)
    assert p.last["pruned_len"] == p.last["orig_len"]
    am = batch["attention_mask"].bool()
    torch.testing.assert_close(got[am], ref[am], rtol=1e-5, atol=1e-5)
    assert torch.equal(got_gen.sequences, ref_gen.sequences)
    for a, r in zip(got_gen.logits, ref_gen.logits):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_pruned_cached_generate_equals_uncached_recompute(family):
    spec, model = family
    check_cached_generate(model, spec.batch(model, seed=5), spec, steps=4, keep_ratio=0.25, method="mmr")


def test_qwen35_is_refused_on_releases_that_lack_it(family, monkeypatch):
    from mmrprune.integrations.hf import versions
    spec, model = family
    monkeypatch.setattr(versions, "installed", lambda: "5.2.0")
    with pytest.raises(RuntimeError, match="outside the releases qwen3_5 models are tested on \\(.*>=5.19\\)"):
        enable_visual_token_pruning(model, k=2)
