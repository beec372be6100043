"""mmrprune.integrations beyond the family suite: enabling (argument checks, all-or-nothing,
the transformers window), the importance sources, labels, FLOPs and decode-step inputs.

Tiny random-weight models from tests/hf_families.py (no downloads); every check compares
the pruned model with quantities computed here from the unpruned model.
"""
import dataclasses
import inspect
import subprocess
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import mmrprune  # noqa: E402
from mmrprune import importance as imp  # noqa: E402
from mmrprune.integrations import enable_visual_token_pruning, prefill_flops, prune_visual_tokens  # noqa: E402
from mmrprune.integrations.hf import versions  # noqa: E402

from hf_check import cache_key, check_pruned_prefill, language_model, recording  # noqa: E402
from hf_families import (LLAVA, LLAVA_IMAGE, QWEN2_5_VL, QWEN2_5_VL_VIDEO, QWEN2_VL,  # noqa: E402
                         QWEN_IMAGE, QWEN_VIDEO, QWEN_VISION_END, QWEN_VISION_START, one_thread,  # noqa: F401
                         qwen_image, qwen_seconds_per_grid, qwen_video_batch)


@pytest.fixture(scope="module")
def llava():
    return LLAVA.build()


@pytest.fixture(scope="module")
def qwen():
    return QWEN2_VL.build()


def image_features(model, batch):
    """The projected image features the model itself merges, per image."""
    with torch.no_grad(), recording(language_model(model)) as (calls, _):
        model(**batch)
    packed = calls[0][1]["inputs_embeds"][batch["input_ids"] == LLAVA_IMAGE]
    return list(packed.split(16))


def hooks_of(model):
    return len(model._forward_pre_hooks) + sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
                                               for m in model.modules() if m is not model)


def test_import_does_not_import_transformers():
    code = "import sys, mmrprune, mmrprune.integrations, mmrprune.importance; " \
           "assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- enabling
def _select_error(**kwargs):
    """The exception mmrprune.select raises for these arguments (on a CPU tensor)."""
    try:
        mmrprune.select(torch.randn(4, 8), None, **kwargs)
    except Exception as exc:       # noqa: BLE001 - any error is what we compare against
        return exc
    raise AssertionError(f"select accepted {kwargs}")


@pytest.mark.parametrize("kwargs", [dict(k=0), dict(keep_ratio=1.5), dict(k=2, keep_ratio=0.5), dict(k=2.5),
                                    dict(k=2, method="foo"), dict(k=2, backend="cuda"), dict(k=2, backend="gpu"),
                                    dict(k=2, lam=3), dict(k=2, lam="0.5"), dict(k=2, foo=1),
                                    dict(k=2, method="d2pruner", tau=None)],
                         ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_enable_checks_every_argument_with_selects_messages(llava, kwargs):
    want = _select_error(**kwargs)
    with pytest.raises(type(want)) as got:
        enable_visual_token_pruning(llava, **kwargs)
    assert str(got.value) == str(want)
    assert hooks_of(llava) == 0 and getattr(llava, "_mmrprune_pruner", None) is None


@pytest.mark.parametrize("kwargs, error, text", [
    (dict(video_k=0), ValueError, "video_k: expected an int >= 1, got 0"),
    (dict(video_keep_ratio=1.5), ValueError, "video_keep_ratio: expected a value in (0, 1], got 1.5"),
    (dict(video_k=2.5), TypeError, "video_k: expected an int >= 1"),
    (dict(video_k=4, video_keep_ratio=0.5), ValueError, "at most one of video_k or video_keep_ratio"),
    (dict(video_keep_ratio=0.5, video_unit="clip"), ValueError, "video_unit: expected one of ('video', 'frame')"),
    (dict(video_unit=None), ValueError, "video_unit: expected one of"),
])
def test_video_budgets_are_checked_when_enabling(qwen, kwargs, error, text):
    with pytest.raises(error) as got:
        enable_visual_token_pruning(qwen, k=2, **kwargs)
    assert text in str(got.value)
    assert hooks_of(qwen) == 0 and getattr(qwen, "_mmrprune_pruner", None) is None


def test_a_video_budget_on_a_family_without_videos_is_refused(llava):
    with pytest.raises(ValueError, match="llava models take no videos this integration prunes; families that prune "
                                         "videos: .*qwen2_vl"):
        enable_visual_token_pruning(llava, k=2, video_k=8)
    assert hooks_of(llava) == 0


def test_unit_maps_merge_in_row_major_order():
    from mmrprune.integrations.hf.family import merge_unit_maps
    images = torch.tensor([[0, 0, -1, -1, 1, 1], [-1, 2, 2, -1, -1, -1]])
    videos = torch.tensor([[-1, -1, 0, 0, -1, -1], [1, -1, -1, 2, 2, -1]])
    units, source = merge_unit_maps(images, videos)
    assert units.tolist() == [[0, 0, 1, 1, 2, 2], [3, 4, 4, 5, 5, -1]]
    assert source.tolist() == [0, 1, 0, 1, 0, 1]
    units, source = merge_unit_maps(images, torch.full_like(images, -1))
    assert torch.equal(units, images) and source.tolist() == [0, 0, 0]


def test_failed_enable_leaves_the_model_as_it_was(qwen):
    """importance='cls' on Qwen2-VL (no [CLS] token) is refused when enabling, not at the first
    forward, and no hook stays behind: plain forwards still work."""
    batch = QWEN2_VL.batch(qwen)
    with torch.no_grad():
        ref = qwen(**batch).logits
    with pytest.raises(ValueError, match="importance: 'cls' reads the \\[CLS\\] attention of the vision tower, which "
                                         "this integration does for llava models only, not Qwen2VLForConditional"):
        with prune_visual_tokens(qwen, k=2, importance="cls"):
            pass
    assert hooks_of(qwen) == 0
    with torch.no_grad():
        assert torch.equal(qwen(**batch).logits, ref)
    with prune_visual_tokens(qwen, k=2):                  # and enabling again works
        assert hooks_of(qwen) == 1
    assert hooks_of(qwen) == 0


def test_failing_cls_hooks_leave_nothing_behind(llava, monkeypatch):
    tower = llava.model.vision_tower
    layer = getattr(tower, "vision_model", tower).encoder.layers[1]
    attn = layer.self_attn
    monkeypatch.delattr(layer, "self_attn")
    with pytest.raises(ValueError, match="CLIP-style vision towers"):
        enable_visual_token_pruning(llava, k=2, importance="cls")
    layer.self_attn = attn
    assert hooks_of(llava) == 0 and getattr(llava, "_mmrprune_pruner", None) is None


def test_enable_twice_and_unsupported_models(llava):
    with pytest.raises(TypeError, match="unsupported model Linear; supported: LlavaForConditionalGeneration"):
        enable_visual_token_pruning(torch.nn.Linear(2, 2), k=2)
    with prune_visual_tokens(llava, k=2):
        with pytest.raises(RuntimeError, match="already enabled"):
            enable_visual_token_pruning(llava, k=2)
    assert hooks_of(llava) == 0


@pytest.mark.parametrize("release", ["4.57.5", "4.56.2", "not-a-version"])
def test_releases_below_the_window_are_refused_when_enabling(llava, monkeypatch, release):
    # transformers swaps its module object in sys.modules once models load: patch the current one
    monkeypatch.setattr(sys.modules["transformers"], "__version__", release)
    with pytest.raises(RuntimeError) as exc:
        enable_visual_token_pruning(llava, k=2)
    assert f"transformers {release} is outside" in str(exc.value) and versions.specifier() in str(exc.value)
    # the hint names only commands that work: mmrprune is installed from a clone, not the index
    assert "mmrprune[hf]" not in str(exc.value) and "pip install -e '.[hf]'" in str(exc.value)
    assert hooks_of(llava) == 0


def test_a_family_may_narrow_the_window(llava, monkeypatch):
    from mmrprune.integrations.hf.llava import Llava
    monkeypatch.setattr(Llava, "transformers", ">=5.26")
    with pytest.raises(RuntimeError, match=f"outside the releases llava models are tested on \\(.*>=5.26"):
        enable_visual_token_pruning(llava, k=2)
    assert hooks_of(llava) == 0


def test_the_window_is_stated_once():
    """setup.py's hf extra and scripts/setup.sh read versions.REQUIREMENT instead of stating a
    range of their own; the installed release is inside it."""
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path in ("setup.py", os.path.join("scripts", "setup.sh")):
        with open(os.path.join(root, path), encoding="utf-8") as f:
            text = f.read()
        assert 'runpy.run_path' in text and "mmrprune/integrations/hf/versions.py" in text, path
        assert "transformers>=" not in text and "transformers<" not in text, path
    versions.check(transformers.__version__)
    versions.check(versions.floor())


# ----------------------------------------------------------------------------- importance argument
@pytest.mark.parametrize("value, error, text", [
    ([0.1, 0.2], TypeError, "got list"),
    (5, TypeError, "got int 5"),
    (b"norm", TypeError, "got bytes"),
    (("norm",), TypeError, "got tuple"),
    ("attention", ValueError, "got 'attention'"),
    (np.zeros(48, dtype=np.int64), TypeError, "dtype int64"),
    (torch.zeros(48, dtype=torch.int64), TypeError, "got dtype torch.int64"),
    (torch.zeros(6, 8), ValueError, "1-D tensor"),
    (torch.zeros(48, device="meta"), ValueError, "meta device"),
], ids=["list", "int", "bytes", "tuple", "unknown-name", "int-array", "int-tensor", "2-D", "meta"])
def test_bad_importance_is_refused_when_enabling(llava, value, error, text):
    with pytest.raises(error, match="importance") as exc:
        enable_visual_token_pruning(llava, k=4, importance=value)
    assert text in str(exc.value)
    assert hooks_of(llava) == 0


@pytest.mark.parametrize("returned, text", [
    (None, "returned NoneType None"), ("norm", "returned str 'norm'"),
    (torch.zeros(48, device="meta"), "meta device"), ([torch.zeros(16)] * 2, "2 items"),
    ([torch.zeros(16), torch.zeros(16), torch.zeros(3)], "shape (3,) for image 2"),
    (torch.zeros(47), "47"), (torch.zeros(48, dtype=torch.int32), "dtype torch.int32"),
], ids=["None", "str", "meta", "too-few", "short-image", "short", "int"])
def test_what_an_importance_callable_returns_is_checked(llava, returned, text):
    batch = LLAVA.batch(llava)
    with pytest.raises((TypeError, ValueError), match="importance") as exc:
        with torch.no_grad(), prune_visual_tokens(llava, k=4, importance=lambda feats, ctx: returned):
            llava(**batch)
    assert text in str(exc.value)


def test_numpy_and_user_importance(llava):
    batch = LLAVA.batch(llava, seed=6)
    user = torch.randn(48, generator=torch.Generator().manual_seed(0))
    want = torch.cat([torch.topk(user[s:s + 16], 4).indices.sort().values + s for s in (0, 16, 32)])
    for value in (user, user.numpy(), lambda fs, ctx: [user[:16], user[16:32], user[32:]],
                  lambda fs, ctx: user.numpy()):
        with torch.no_grad(), prune_visual_tokens(llava, k=4, method="topk", importance=value) as p:
            llava(**batch)
        assert torch.equal(p.last["kept_indices"], want)
    with pytest.raises(ValueError, match="48"):
        with torch.no_grad(), prune_visual_tokens(llava, k=4, importance=user[:10]):
            llava(**batch)


def test_callable_context(llava):
    batch = LLAVA.batch(llava, seed=8)
    seen = {}

    def record(feats, ctx):
        seen.update(ctx, shapes=[tuple(f.shape) for f in feats])
        return torch.cat(feats).norm(dim=-1)

    with torch.no_grad(), prune_visual_tokens(llava, k=4, importance=record):
        llava(**batch)
    assert seen["shapes"] == [(16, 32)] * 3 and seen["image_rows"].tolist() == [0, 0, 1]
    assert seen["model"] is llava and torch.equal(seen["input_ids"], batch["input_ids"])
    assert torch.equal(seen["attention_mask"], batch["attention_mask"])


def test_cls_importance_matches_vision_tower_attention(llava):
    batch = LLAVA.batch(llava, seed=5)
    with torch.no_grad():
        out = llava.model.vision_tower(batch["pixel_values"], output_attentions=True, output_hidden_states=True)
    # features taken at hidden_states[-2] -> produced by the second-to-last layer = attentions[-2]
    w = imp.cls_attention(out.attentions[-2]).reshape(-1)
    packed = torch.cat(image_features(llava, batch))
    cu = torch.tensor([0, 16, 32, 48])
    want, _ = mmrprune.select_varlen(packed, w, cu, k=5, method="topk")
    with torch.no_grad(), prune_visual_tokens(llava, k=5, method="topk", importance="cls") as p:
        llava(**batch)
    assert torch.equal(p.last["kept_indices"], want)
    # debiased: dividing by the profile changes the selection the way the formula says
    bias = torch.linspace(0.5, 2.0, 16)
    want_d, _ = mmrprune.select_varlen(packed, (w.view(3, 16) / (bias + 1e-6)).reshape(-1), cu, k=5,
                                       method="topk")
    with torch.no_grad(), prune_visual_tokens(llava, k=5, method="topk", importance="debiased_cls",
                                              position_bias=bias) as p:
        llava(**batch)
    assert torch.equal(p.last["kept_indices"], want_d)
    with pytest.raises(ValueError, match="position_bias"):
        enable_visual_token_pruning(llava, k=5, importance="debiased_cls")
    with pytest.raises(TypeError, match="position_bias"):
        enable_visual_token_pruning(llava, k=5, importance="debiased_cls", position_bias=[1.0] * 16)


def test_text_importance(llava):
    batch = LLAVA.batch(llava, seed=6)
    feats = image_features(llava, batch)
    emb = llava.get_input_embeddings()
    ids, am = batch["input_ids"], batch["attention_mask"]
    ws = []
    for i, f in enumerate(feats):
        row = 0 if i < 2 else 1
        text = emb(ids[row][(ids[row] != LLAVA_IMAGE) & (am[row] == 1)])
        ws.append(imp.text_relevance(f.detach(), text.detach(), reduce="mean"))
    want, _ = mmrprune.select_varlen(torch.cat(feats), torch.cat(ws), torch.tensor([0, 16, 32, 48]), k=4,
                                     method="topk")
    with torch.no_grad(), prune_visual_tokens(llava, k=4, method="topk", importance="text",
                                              text_reduce="mean") as p:
        llava(**batch)
    assert torch.equal(p.last["kept_indices"], want)
    with pytest.raises(ValueError, match="text_reduce"):
        enable_visual_token_pruning(llava, k=4, importance="text", text_reduce="min")


# ----------------------------------------------------------------------------- labels, FLOPs, decode inputs
def test_labels_are_shortened_with_the_sequence(llava):
    batch = LLAVA.batch(llava, seed=2)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == LLAVA_IMAGE, -100).masked_fill(
        batch["attention_mask"] == 0, -100)
    with torch.no_grad(), prune_visual_tokens(llava, k=3) as p:
        out = llava(**batch, labels=labels)
    new_len = p.last["pruned_len"]
    assert out.logits.shape[1] == new_len
    want = torch.full((2, new_len), -100)
    for b, cols in enumerate(p.last["kept_columns"]):
        want[b, new_len - len(cols):] = labels[b, cols]
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                           want[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ce, rtol=1e-5, atol=1e-6)


def test_prefill_flops_drop(llava):
    from torch.utils.flop_counter import FlopCounterMode
    full = LLAVA.batch(llava, seed=4)
    batch = {k: v[:1] for k, v in full.items() if k != "pixel_values"}
    batch["pixel_values"] = full["pixel_values"][:2]                    # row 0 has two images
    lm = language_model(llava)
    measured = {}
    for ratio in (1.0, 0.25):
        with torch.no_grad(), prune_visual_tokens(llava, keep_ratio=ratio) as p, recording(llava) as (calls, _):
            llava(**batch)
        c = calls[0][1]
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            lm(inputs_embeds=c["inputs_embeds"], position_ids=c["position_ids"], attention_mask=c["attention_mask"])
        n = p.last["pruned_len"]
        measured[n] = fc.get_total_flops()
        est = prefill_flops(llava.config.text_config, n)
        assert abs(measured[n] - est) / est < 0.02, (n, measured[n], est)
    (n_full, f_full), (n_pruned, f_pruned) = sorted(measured.items(), reverse=True)
    assert n_full == batch["input_ids"].shape[1] and n_pruned == n_full - 24
    assert f_pruned < f_full * n_pruned / n_full                       # at least linear savings


def test_decode_step_mask_of_another_length_is_refused(llava):
    batch = LLAVA.batch(llava, seed=9)
    key = cache_key(llava)
    with torch.no_grad(), prune_visual_tokens(llava, k=4):
        out = llava(**batch, use_cache=True)
        step = {"input_ids": out.logits[:, -1:].argmax(-1), "attention_mask": torch.ones(2, 7, dtype=torch.long),
                key: getattr(out, key)}
        with pytest.raises(ValueError, match="decode step needs a 2-D attention mask"):
            llava(**step)


def _spanning(batch):
    """Two 16-token images, but 20 placeholders in row 0 and 12 in row 1."""
    ids = batch["input_ids"].clone()
    ids[1, ids[1] == LLAVA_IMAGE] = 5
    ids[0, ids[0] == LLAVA_IMAGE] = 5
    ids[0, 3:23], ids[1, -13:-1] = LLAVA_IMAGE, LLAVA_IMAGE
    return dict(batch, input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=batch["pixel_values"][:2])


@pytest.mark.parametrize("change, error, text", [
    (lambda b: dict(b, pixel_values=b["pixel_values"][:2]), ValueError, "48 image placeholder tokens in input_ids "
                                                                        "but 32 image features"),
    (_spanning, ValueError, "the 16 placeholder tokens of image 1 span prompts 0 and 1; each image's placeholders "
                            "must lie in one prompt.  From generate with num_beams > 1 or num_return_sequences > 1 "
                            "over prompts with different image counts, this is generate's expansion"),
    (lambda b: dict(b, position_ids=torch.arange(5)[None]), ValueError, "position_ids of shape (2, 5) do not match"),
    (lambda b: dict(b, attention_mask=b["attention_mask"][:, None]), ValueError, "2-D attention mask"),
], ids=["feature-count", "image-across-prompts", "position-ids", "3-D-mask"])
def test_malformed_prefills_get_clear_errors(llava, change, error, text):
    with pytest.raises(error) as exc:
        with torch.no_grad(), prune_visual_tokens(llava, k=4):
            llava(**change(LLAVA.batch(llava)))
    assert text in str(exc.value)


def test_interleaved_conversations_decode_against_their_own_caches(llava):
    """Two pruned prompts prefilled one after the other, then decoded in turns: each step is
    mapped with the state of the cache it continues."""
    key = cache_key(llava)
    batches = [LLAVA.batch(llava, seed=12), LLAVA.batch(llava, seed=13, padding="right")]
    batches[1] = {k: v[:1] for k, v in batches[1].items() if k != "pixel_values"} | \
        {"pixel_values": batches[1]["pixel_values"][:2]}                        # one prompt, 2 images
    with torch.no_grad(), prune_visual_tokens(llava, k=3):
        outs = [llava(**b, use_cache=True) for b in batches]
        for i in (1, 0, 1):
            token = outs[i].logits[:, -1].index_fill(-1, torch.tensor([LLAVA_IMAGE]), -float("inf")).argmax(-1)[:, None]
            batches[i] = LLAVA.extend(batches[i], token)
            outs[i] = llava(input_ids=token, attention_mask=batches[i]["attention_mask"],
                            **{key: getattr(outs[i], key)})
            want = llava(**batches[i], use_cache=False).logits[:, -1]
            torch.testing.assert_close(outs[i].logits[:, -1], want, rtol=1e-4, atol=1e-5)


def test_static_caches_are_refused(llava):
    with pytest.raises(ValueError, match="static caches, which are not supported"):
        with torch.no_grad(), prune_visual_tokens(llava, k=4):
            llava.generate(**LLAVA.batch(llava), max_new_tokens=2, cache_implementation="static")


@pytest.fixture(scope="module")
def qwen25():
    return QWEN2_5_VL.build()


# the video specs' prunable slots, with budgets given here instead of the suite's
VIDEO_SPEC = dataclasses.replace(QWEN2_5_VL_VIDEO, enable=dict)


def test_qwen25_second_per_grid_ts_per_image_is_a_clear_error_on_5_3_to_5_4(qwen25):
    """transformers 5.3-5.4's Qwen2.5-VL takes a second_per_grid_ts per image too; the
    processor's per-video list then runs out (a StopIteration in the model itself)."""
    from packaging.version import Version
    if not Version("5.3") <= Version(transformers.__version__) < Version("5.5"):
        pytest.skip("only transformers 5.3-5.4 take second_per_grid_ts per image")
    batch = _with_token_types(qwen25, _image_and_video_batch())
    batch["second_per_grid_ts"] = torch.tensor([1.0])
    with pytest.raises(ValueError, match="takes one second_per_grid_ts per image as well"):
        with torch.no_grad(), prune_visual_tokens(qwen25, k=2, video_k=2):
            qwen25(**batch)


def _kept_per_unit(last) -> list:
    return (last["cu_k"][1:] - last["cu_k"][:-1]).tolist()


def _image_and_video_batch():
    """One prompt: a 16-token image, then an 8-token video of two frames."""
    g = torch.Generator().manual_seed(11)
    image_grid, video_grid = torch.tensor([[1, 8, 8]]), torch.tensor([[2, 4, 4]])     # 16 and 8 tokens
    row = [1, 3] + qwen_image(16) + [4, QWEN_VISION_START] + [QWEN_VIDEO] * 8 + [QWEN_VISION_END, 5]
    ids = torch.tensor([row])
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), image_grid_thw=image_grid,
                 pixel_values=torch.randn(64, 96, generator=g), video_grid_thw=video_grid,
                 pixel_values_videos=torch.randn(32, 96, generator=g))
    return batch


def _with_token_types(model, batch):
    ids = batch["input_ids"]
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        batch["mm_token_type_ids"] = (ids == QWEN_IMAGE).int() + 2 * (ids == QWEN_VIDEO).int()
    return batch


def test_qwen_videos_are_pruned_only_with_a_video_budget(qwen25):
    """Without a video budget, a prompt with an image and a video: the image is pruned, every
    video token stays, and the prefill still equals the masked unpruned forward; a prompt whose
    only visual input is a video goes through untouched.  With one, that prompt is pruned."""
    batch = _with_token_types(qwen25, _image_and_video_batch())
    batch.update(qwen_seconds_per_grid(qwen25, torch.tensor([1.0])))
    ids = batch["input_ids"]
    got = check_pruned_prefill(qwen25, batch, QWEN2_5_VL, k=4)
    assert bool(got.keep[ids == QWEN_IMAGE].sum() == 4) and bool(got.keep[ids == QWEN_VIDEO].all())
    assert got.pruner.last["video_units"] is None
    video_only = {k: v for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    video_only["input_ids"] = torch.tensor([[1, 3, QWEN_VISION_START] + [QWEN_VIDEO] * 8 + [QWEN_VISION_END, 5]])
    video_only["attention_mask"] = torch.ones_like(video_only["input_ids"])
    video_only = _with_token_types(qwen25, video_only)
    with torch.no_grad(), prune_visual_tokens(qwen25, k=1) as p:
        qwen25(**video_only)
    assert p.last is None
    got = check_pruned_prefill(qwen25, video_only, VIDEO_SPEC, k=1, video_k=3)
    assert got.pruner.last["video_units"].tolist() == [True] and _kept_per_unit(got.pruner.last) == [3]


@pytest.mark.parametrize("budgets, per_unit", [
    # row 0: video (8 tokens), image (6), video (12); row 1: video (12)
    (dict(k=2, video_k=5), [5, 2, 5, 5]),
    (dict(k=4, video_keep_ratio=0.25), [2, 4, 3, 3]),
    (dict(keep_ratio=0.5, video_k=1), [1, 3, 1, 1]),
], ids=["k-video_k", "k-video_keep_ratio", "keep_ratio-video_k"])
def test_qwen_videos_and_images_take_their_own_budgets(qwen25, budgets, per_unit):
    batch = qwen_video_batch(qwen25, seed=12)
    ids = batch["input_ids"]
    got = check_pruned_prefill(qwen25, batch, VIDEO_SPEC, video_unit="video", **budgets)
    last = got.pruner.last
    assert last["video_units"].tolist() == [True, False, True, True]
    assert _kept_per_unit(last) == per_unit
    assert int(got.keep[ids == QWEN_IMAGE].sum()) == per_unit[1]
    assert int(got.keep[ids == QWEN_VIDEO].sum()) == sum(per_unit) - per_unit[1]
    assert last["visual_before"] == int(((ids == QWEN_IMAGE) | (ids == QWEN_VIDEO)).sum())


def test_qwen_video_frames_are_budget_units(qwen25):
    """``video_unit="frame"``: one budget per temporal grid step, its tokens the frame's own
    (one temporal position per frame: Qwen2.5-VL spaces them by ``second_per_grid_ts``)."""
    batch = qwen_video_batch(qwen25, seed=13)
    ids = batch["input_ids"]
    got = check_pruned_prefill(qwen25, batch, VIDEO_SPEC, k=4, video_k=3, video_unit="frame")
    last = got.pruner.last
    # row 0: frames 4, 4, image 6, frames 4, 4, 4; row 1: frames 6, 6
    assert last["video_units"].tolist() == [True, True, False, True, True, True, True, True]
    assert (last["cu_seqlens"][1:] - last["cu_seqlens"][:-1]).tolist() == [4, 4, 6, 4, 4, 4, 6, 6]
    assert _kept_per_unit(last) == [3, 3, 4, 3, 3, 3, 3, 3]
    # every frame's kept tokens lie in that frame: one temporal position per frame
    temporal = got.unpruned_call[1]["position_ids"][-3]
    slots = ((ids == QWEN_IMAGE) | (ids == QWEN_VIDEO)).nonzero()
    kept = slots[last["kept_indices"]]
    t_kept = temporal[kept[:, 0], kept[:, 1]].split(_kept_per_unit(last))
    t_all = temporal[slots[:, 0], slots[:, 1]].split(last["cu_seqlens"].diff().tolist())
    for u, (tk, ta) in enumerate(zip(t_kept, t_all)):
        assert ta.unique().numel() == 1 and bool((tk == ta[0]).all()), f"unit {u}"
    if not _frames_share_a_temporal_position():
        assert len({int(ta[0]) for ta in t_all[3:6]}) == 3


def _frames_share_a_temporal_position() -> bool:
    """transformers 5.3-5.5 give every frame of a Qwen video the same temporal position
    (transformers issue 45381, fixed in 5.6); the pruned prompt keeps the model's positions."""
    from packaging.version import Version
    return Version("5.3") <= Version(transformers.__version__) < Version("5.6")


def test_qwen_frames_without_a_grid_are_found_from_the_positions(qwen25):
    """generate in 5.19 and later hands the video encoder output over without video_grid_thw:
    the frames are then counted on the M-RoPE positions, and agree with the grid."""
    from mmrprune.integrations.hf.qwen2_vl import Qwen2VL, rope_index
    batch = qwen_video_batch(qwen25, seed=14)
    adapter = Qwen2VL(qwen25, video_unit="frame")
    ids = batch["input_ids"]
    videos = ids == QWEN_VIDEO
    counts = (batch["video_grid_thw"].prod(-1) // 4).tolist()
    feats = [torch.zeros(n, 1) for n in counts]
    with_grid = adapter._video_counts(batch, ids, videos, feats)
    positions = rope_index(qwen25, ids, batch["attention_mask"], batch)
    no_grid = {k: v for k, v in batch.items() if k != "video_grid_thw"}
    assert adapter._video_counts(dict(no_grid, position_ids=positions), ids, videos, feats) == with_grid
    assert with_grid == [4, 4, 4, 4, 4, 6, 6]
    with pytest.raises(ValueError, match="needs video_grid_thw \\(or position_ids\\)"):
        adapter._video_counts(no_grid, ids, videos, feats)


def test_qwen_needs_mm_token_type_ids_where_the_model_does(qwen):
    batch = QWEN2_VL.batch(qwen)
    if "mm_token_type_ids" not in batch:
        pytest.skip(f"transformers {transformers.__version__} finds the vision tokens in input_ids itself")
    batch.pop("mm_token_type_ids")
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        with torch.no_grad(), prune_visual_tokens(qwen, k=2):
            qwen(**batch)
    assert (batch["input_ids"] == QWEN_IMAGE).any()


# ----------------------------------------------------------------------------- one spec, its messages
def test_a_video_budget_alone_prunes_only_videos(qwen25):
    """video_keep_ratio alone (no image budget) is accepted: every image token stays and each
    video keeps its budget; the prefill still equals the masked unpruned forward."""
    batch = qwen_video_batch(qwen25, seed=12)
    ids = batch["input_ids"]
    got = check_pruned_prefill(qwen25, batch, VIDEO_SPEC, video_keep_ratio=0.25)
    assert _kept_per_unit(got.pruner.last) == [2, 6, 3, 3]
    assert bool(got.keep[ids == QWEN_IMAGE].all())


def test_d2pruner_takes_each_images_grid_from_the_model(qwen):
    """Qwen images of 8x8, 4x6 and 6x4 patches (4x4, 2x3, 3x2 merged tokens): d2pruner's spatial
    term gets each image's own (h, w), read off its M-RoPE positions; the kept indices are what
    select_varlen gives each image with its grid."""
    batch = QWEN2_VL.batch(qwen)
    params = dict(method="d2pruner", alpha=0.5, radius=1)
    got = check_pruned_prefill(qwen, batch, QWEN2_VL, k=3, **params)
    last = got.pruner.last
    packed = got.unpruned_call[1]["inputs_embeds"][batch["input_ids"] == QWEN_IMAGE]
    want = []
    cu = last["cu_seqlens"]
    for b, grid in enumerate([(4, 4), (2, 3), (3, 2)]):
        f = packed[cu[b]:cu[b + 1]]
        idx, _ = mmrprune.select_varlen(f, imp.token_norm(f), torch.tensor([0, f.shape[0]]), k=3, grid=grid,
                                        **params)
        want.append(idx + cu[b])
    assert torch.equal(last["kept_indices"], torch.cat(want))
    with pytest.raises(ValueError, match="llava_next images do not have as one grid"):
        from hf_families import LLAVA_NEXT
        enable_visual_token_pruning(LLAVA_NEXT.build(), k=3, **params)


def test_a_stray_position_bias_or_lam_warns_once_at_the_users_line(llava):
    for enable in (enable_visual_token_pruning, prune_visual_tokens):
        with pytest.warns(UserWarning) as record:
            p = enable(llava, k=2, importance="norm", position_bias=torch.ones(16), method="dpp", lam=0.4)
            p = p.__enter__() if enable is prune_visual_tokens else p
            with torch.no_grad():
                llava(**LLAVA.batch(llava))
            p.remove()
        texts = sorted(str(r.message) for r in record)
        assert texts == ["lam=0.4 is ignored by method='dpp': only mmr and hybrid use lam",
                         "position_bias is ignored by importance='norm': only importance='debiased_cls' reads it"]
        assert all(r.filename == __file__ for r in record), [r.filename for r in record]


def test_a_pruned_generate_logs_nothing_an_unpruned_one_does_not(llava, qwen, monkeypatch):
    """transformers' once-only warnings (5.25: "past_key_values/cache_params are deprecated")
    recorded around a pruned and an unpruned generate: pruning adds none."""
    import logging
    said = []
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, msg, *a, **k: said.append(str(msg)),
                        raising=False)
    for model, spec in ((llava, LLAVA), (qwen, QWEN2_VL)):
        batch = spec.batch(model)
        with torch.no_grad():
            said.clear()
            model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
            unpruned = set(said)
            said.clear()
            with prune_visual_tokens(model, k=2):
                model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert set(said) <= unpruned, set(said) - unpruned


def test_prune_visual_tokens_without_with_prunes_until_removed(llava):
    """Forgetting the ``with``: the call itself enables pruning (enable / disable style), so
    the forward is pruned and ``p.last`` is there; ``remove()`` disables it."""
    batch = LLAVA.batch(llava)
    with torch.no_grad():
        llava(**batch)
    before = hooks_of(llava)          # transformers may add hooks of its own at a first forward
    p = prune_visual_tokens(llava, k=2)
    with torch.no_grad():
        out = llava(**batch)
    assert p.last["visual_after"] == 6 and out.logits.shape[1] == p.last["pruned_len"] < p.last["orig_len"]
    p.remove()
    assert hooks_of(llava) == before
    with prune_visual_tokens(llava, k=2) as q, torch.no_grad():
        llava(**batch)
    assert q.last["visual_after"] == 6 and hooks_of(llava) == before


def test_cls_importance_without_eager_attention_is_refused_when_enabling(llava):
    before = hooks_of(llava)
    vt_config = llava.model.vision_tower.config
    old = vt_config._attn_implementation
    vt_config._attn_implementation = "sdpa"
    try:
        with pytest.raises(ValueError, match="importance='cls' reads the vision tower's attention probabilities, "
                                             "which its 'sdpa' attention does not compute; load the model with "
                                             "attn_implementation='eager'"):
            enable_visual_token_pruning(llava, k=2, importance="cls")
    finally:
        vt_config._attn_implementation = old
    assert hooks_of(llava) == before
