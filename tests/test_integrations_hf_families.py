"""The test set every HF family passes, on tiny random-weight models (tests/hf_families.py).

Per family: the pruned prefill equals the masked unpruned forward (tests/hf_check.py) on a
batch of two prompts with different image counts, left- and right-padded; kept tokens keep
their original positions; ``keep_ratio=1.0`` and ``k >= N`` reproduce the unpruned logits;
the selection is the one :func:`mmrprune.select_varlen` makes on the model's own features,
with per-image budgets; the pruned cached ``generate`` equals an uncached recompute of the
pruned prompt.  A new family adds its :class:`hf_families.FamilySpec` to ``SPECS``.
"""
import pytest
import torch

pytest.importorskip("transformers")

import mmrprune  # noqa: E402
from mmrprune import importance as imp  # noqa: E402
from mmrprune.integrations import prune_visual_tokens  # noqa: E402

from hf_check import cache_key, check_cached_generate, check_pruned_prefill, language_model, recording  # noqa: E402
from hf_families import LLAVA, QWEN2_5_VL, SPECS, one_thread  # noqa: E402,F401 (autouse fixture)


@pytest.fixture(scope="module", params=SPECS, ids=[s.name for s in SPECS])
def family(request):
    spec = request.param
    return spec, spec.build()


@pytest.mark.parametrize("padding", ["left", "right"])
def test_pruned_prefill_equals_masked_unpruned_forward(family, padding):
    spec, model = family
    batch = spec.batch(model, seed=1, padding=padding)
    got = check_pruned_prefill(model, batch, spec, keep_ratio=0.25, method="mmr", lam=0.5)
    last = got.pruner.last
    assert last["right_padded"] == (padding == "right")
    assert last["orig_len"] == batch["input_ids"].shape[1] and last["pruned_len"] == len(got.slots[0])
    # several images per prompt: row 0 holds two, and the shorter row 1 was re-padded
    assert len(got.slots[1]) < len(got.slots[0])
    assert [c.tolist() for c in last["kept_columns"]] == [k.nonzero()[:, 0].tolist() for k in got.keep]


def test_selection_is_select_varlen_on_the_models_features(family):
    spec, model = family
    batch = spec.batch(model, seed=2)
    with torch.no_grad(), recording(language_model(model)) as (calls, _):
        model(**batch)
    features = calls[0][1]["inputs_embeds"][spec.prunable(batch)]      # what the model merged
    counts = spec.image_tokens(batch)
    cu = torch.tensor([0] + counts).cumsum(0)
    for budget in (dict(keep_ratio=0.25), dict(k=5)):
        want, want_cu = mmrprune.select_varlen(features, imp.token_norm(features), cu, method="mmr", lam=0.5,
                                               **budget)
        with torch.no_grad(), prune_visual_tokens(model, **spec.enable(dict(method="mmr", lam=0.5, **budget))) as p:
            model(**batch)
        assert torch.equal(p.last["kept_indices"], want)
        assert torch.equal(p.last["cu_k"], want_cu) and torch.equal(p.last["cu_seqlens"], cu)
        per_image = [min(budget["k"], n) if "k" in budget else max(1, round(n * 0.25)) for n in counts]
        assert (want_cu[1:] - want_cu[:-1]).tolist() == per_image
        assert p.last["visual_before"] == sum(counts) and p.last["visual_after"] == sum(per_image)


def test_kept_tokens_keep_their_original_positions(family):
    spec, model = family
    got = check_pruned_prefill(model, spec.batch(model, seed=3), spec, k=3, method="dpp")
    # the check compared the position ids column by column; and pruning did leave gaps
    pos = got.pruned_call["position_ids"]
    row0 = pos[-1, 0] if pos.ndim == 3 else pos[0]
    assert bool((row0[1:] - row0[:-1] > 1).any())


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("budget", [dict(keep_ratio=1.0), dict(k=10**6)], ids=["keep_ratio=1", "k>=N"])
def test_full_budget_reproduces_unpruned_logits(family, budget, padding):
    spec, model = family
    batch = spec.batch(model, seed=4, padding=padding)
    labels = batch["input_ids"].masked_fill(spec.prunable(batch) | (batch["attention_mask"] == 0), -100)
    with torch.no_grad():
        ref = model(**batch, labels=labels)
        with prune_visual_tokens(model, **spec.enable(dict(method="mmr", **budget))) as p:
            got = model(**batch, labels=labels)
        after = model(**batch, labels=labels)                          # the hook is gone after the block
    assert p.last["pruned_len"] == p.last["orig_len"]
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(after.logits, ref.logits)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_full_budget_generate_equals_unpruned_generate(family, padding):
    """``k >= N``: generate's tokens and every step's logits are the unpruned model's, right
    padding included (generate then reads a row's next token off its last, padding, column,
    and on 4.57 the Qwen models number the decode steps from the prompt's largest position)."""
    spec, model = family
    batch = spec.batch(model, seed=5, padding=padding)
    eos = model.generation_config.eos_token_id
    banned = list(spec.placeholders) + ([] if eos is None else [eos] if isinstance(eos, int) else list(eos))
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, suppress_tokens=banned, pad_token_id=0,
              return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        want = model.generate(**batch, **kw)
        with prune_visual_tokens(model, **spec.enable(dict(k=10**6))) as p:
            got = model.generate(**batch, **kw)
    assert p.last["right_padded"] == (padding == "right")
    assert torch.equal(got.sequences, want.sequences)
    for a, r in zip(got.logits, want.logits):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_pruned_cached_generate_equals_uncached_recompute(family):
    spec, model = family
    batch = spec.batch(model, seed=5)
    check_cached_generate(model, batch, spec, steps=4, keep_ratio=0.25, method="mmr", lam=0.5)
    # and pruning did change what the model saw
    with torch.no_grad():
        full = model(**batch).logits[:, -1]
        with prune_visual_tokens(model, **spec.enable(dict(keep_ratio=0.25, method="mmr", lam=0.5))):
            pruned = model(**batch).logits[:, -1]
    assert not torch.allclose(full, pruned, atol=1e-4)


def test_decode_steps_without_position_ids_continue_the_original_numbering(family):
    """Two hand-written decode steps (no ``position_ids``; the mask and any per-token input at
    the unpruned length) equal the uncached recompute of the extended prompt, and their
    per-token inputs reach the model mapped onto the pruned cache."""
    spec, model = family
    batch = spec.batch(model, seed=10)
    per_token = [k for k, v in batch.items() if k not in ("input_ids", "attention_mask")
                 and v.shape == batch["input_ids"].shape]
    key = cache_key(model)
    banned = torch.tensor(spec.placeholders)
    with torch.no_grad(), prune_visual_tokens(model, **spec.enable(dict(keep_ratio=0.25, method="mmr"))), \
            recording(model) as (calls, _):
        out = model(**batch, use_cache=True)
        longer = batch
        for _ in range(2):
            token = out.logits[:, -1].index_fill(-1, banned, -float("inf")).argmax(-1)[:, None]
            longer = spec.extend(longer, token)
            # use_cache=True as generate passes it: Gemma 3's config in 4.57 has no use_cache, so
            # without it the model returns no cache to continue from
            out = model(input_ids=token, attention_mask=longer["attention_mask"], use_cache=True,
                        **{key: getattr(out, key)},
                        **{k: longer[k] for k in per_token})
            want = model(**longer, use_cache=False)
            torch.testing.assert_close(out.logits[:, -1], want.logits[:, -1], rtol=1e-4, atol=1e-5)
    prefill, step = calls[0][1], calls[-2][1]
    for k in per_token + ["attention_mask"]:
        assert torch.equal(step[k], torch.cat([prefill[k], longer[k][:, -2:]], 1)), k


# ----------------------------------------------------------------------------- the check can fail
def _shift_a_kept_position(kw):
    pos = kw["position_ids"].clone()
    pos[..., 0, -2] += 1                       # a kept column of row 0 (its last text token but one)
    return dict(kw, position_ids=pos)


def _hide_a_kept_column(kw):
    am = kw["attention_mask"].clone()
    am[0, 3] = 0
    return dict(kw, attention_mask=am)


def _swap_two_kept_columns(kw):
    emb = kw["inputs_embeds"].clone()
    emb[0, [3, 4]] = emb[0, [4, 3]]
    return dict(kw, inputs_embeds=emb)


@pytest.mark.parametrize("spec", [LLAVA, QWEN2_5_VL], ids=lambda s: s.name)
@pytest.mark.parametrize("tamper", [_shift_a_kept_position, _hide_a_kept_column, _swap_two_kept_columns],
                         ids=["shifted-position", "hidden-column", "swapped-columns"])
def test_strong_check_fails_on(spec, tamper):
    model = spec.build()
    batch = spec.batch(model, seed=6)
    check_pruned_prefill(model, batch, spec, keep_ratio=0.5)                 # untampered: passes
    with pytest.raises(AssertionError):
        check_pruned_prefill(model, batch, spec, keep_ratio=0.5, tamper=tamper)


def test_strong_check_fails_on_a_wrong_kept_column(monkeypatch):
    """The surgery keeps a dropped image column instead of a selected one, while
    ``p.last`` reports the selection."""
    from mmrprune.integrations.hf import core
    model = LLAVA.build()
    batch = LLAVA.batch(model, seed=7)
    check_pruned_prefill(model, batch, LLAVA, keep_ratio=0.25)
    layout = core._Columns.of.__func__
    prunable = LLAVA.prunable(batch)

    def wrong_column(cls, keep, am):
        keep = keep.clone()
        kept, dropped = (prunable[0] & keep[0]).nonzero()[0], (prunable[0] & ~keep[0]).nonzero()[0]
        keep[0, kept], keep[0, dropped] = False, True
        return layout(cls, keep, am)

    monkeypatch.setattr(core._Columns, "of", classmethod(wrong_column))
    with pytest.raises(AssertionError):
        check_pruned_prefill(model, batch, LLAVA, keep_ratio=0.25)


# ----------------------------------------------------------------------------- Gemma 3's bidirectional image blocks
def _drop_token_type_ids(kw):
    return {k: v for k, v in kw.items() if k != "token_type_ids"}


def _merge_two_images(kw):
    """One block from row 0's first image token to its last: the text between its images joins it."""
    tt = kw["token_type_ids"].clone()
    cols = tt[0].nonzero()[:, 0]
    tt[0, int(cols[0]):int(cols[-1]) + 1] = 1
    return dict(kw, token_type_ids=tt)


@pytest.mark.parametrize("tamper", [_drop_token_type_ids, _merge_two_images], ids=["causal-only", "merged-images"])
def test_strong_check_fails_on_a_wrong_image_block(tamper):
    from hf_families import GEMMA3
    model = GEMMA3.build()
    batch = GEMMA3.batch(model, seed=8)
    check_pruned_prefill(model, batch, GEMMA3, keep_ratio=0.5)
    with pytest.raises(AssertionError):
        check_pruned_prefill(model, batch, GEMMA3, keep_ratio=0.5, tamper=tamper)


def test_gemma3_image_blocks_are_bidirectional():
    """The reference must allow them: a causal-only reference fails on the true model."""
    from dataclasses import replace

    from hf_families import GEMMA3
    model = GEMMA3.build()
    batch = GEMMA3.batch(model, seed=9)
    with pytest.raises(AssertionError):
        check_pruned_prefill(model, batch, replace(GEMMA3, extra_allowed=None), keep_ratio=0.5)


# ----------------------------------------------------------------------------- InternVL's images of several tiles
def test_internvl_unit_is_an_image_of_all_its_tiles():
    """One budget unit per image across its tiles (not one per tile), and a run of
    image-context tokens that is not whole tiles is refused."""
    from hf_families import INTERNVL, INTERNVL_CONTEXT, INTERNVL_END, INTERNVL_START
    model = INTERNVL.build()
    batch = INTERNVL.batch(model, seed=11)
    with torch.no_grad(), prune_visual_tokens(model, k=3) as p:
        model(**batch)
    assert p.last["cu_seqlens"].tolist() == [0, 32, 48, 80] and p.last["visual_after"] == 9
    # a video's frames reach the model as images: they take the image budget, a video budget is refused
    with pytest.raises(ValueError, match="video_k"):
        mmrprune.integrations.enable_visual_token_pruning(model, k=3, video_k=2)
    ids = batch["input_ids"].clone()
    # row 0 with its images' boundary moved by half a tile: 24 + 24 tokens instead of 32 + 16
    ids[0] = torch.tensor([1, 5, INTERNVL_START] + [INTERNVL_CONTEXT] * 24 + [INTERNVL_END, 7, INTERNVL_START]
                          + [INTERNVL_CONTEXT] * 24 + [INTERNVL_END, 8, 9])
    with torch.no_grad(), prune_visual_tokens(model, k=3), pytest.raises(ValueError, match="whole number of tiles"):
        model(**dict(batch, input_ids=ids))
