"""mmrprune.integrations on tiny random-weight transformers VLMs (no downloads).

Models are built from configs: LLaVA (tiny CLIP + tiny Llama), Qwen2-VL and
Qwen2.5-VL (1-2 layers, hidden 32).  Every check compares the pruned model
with quantities computed independently here from the unpruned model.
"""
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mmrprune  # noqa: E402
from mmrprune import importance as imp  # noqa: E402
from mmrprune.integrations import prefill_flops, prune_visual_tokens  # noqa: E402

IMG = 63          # LLaVA image token
Q_IMG, Q_VS, Q_VE = 60, 58, 59


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ----------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="module")
def llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=32, patch_size=8, projection_dim=32)       # 16 patches per image
    tc = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=2, vocab_size=64, max_position_embeddings=256,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMG, vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    torch.manual_seed(0)
    return LlavaForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()


def _qwen(cls_name):
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=64, max_position_embeddings=512, bos_token_id=1,
                eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    ids = dict(image_token_id=Q_IMG, video_token_id=61, vision_start_token_id=Q_VS, vision_end_token_id=Q_VE)
    if cls_name == "qwen2":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
        cfg = Qwen2VLConfig(vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2,
                                               patch_size=4, spatial_merge_size=2, temporal_patch_size=2),
                            text_config=text, **ids)
        return Qwen2VLForConditionalGeneration(cfg).eval()
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    cfg = Qwen2_5_VLConfig(vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=32,
                                              num_heads=2, patch_size=4, spatial_merge_size=2,
                                              temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1]),
                           text_config=text, **ids)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module", params=["qwen2", "qwen2_5"])
def qwen(request):
    return _qwen(request.param)


# ----------------------------------------------------------------------------- inputs
def llava_batch(seed=0, right_padded=False):
    """Row 0: two images, no padding.  Row 1: one image, left-padded (or right-padded)."""
    g = torch.Generator().manual_seed(seed)
    r0 = [1, 5, 6] + [IMG] * 16 + [7] + [IMG] * 16 + [8, 9]
    r1 = [1, 10] + [IMG] * 16 + [11, 12, 13]
    L = len(r0)
    ids = torch.zeros(2, L, dtype=torch.long)
    am = torch.zeros(2, L, dtype=torch.long)
    ids[0] = torch.tensor(r0)
    am[0] = 1
    row1 = slice(0, len(r1)) if right_padded else slice(L - len(r1), L)
    ids[1, row1] = torch.tensor(r1)
    am[1, row1] = 1
    pv = torch.randn(3, 3, 32, 32, generator=g)
    return dict(input_ids=ids, attention_mask=am, pixel_values=pv)


def qwen_batch(seed=0):
    """Row 0: two images (8x8 and 4x6 patch grids -> 16 and 6 tokens).  Row 1: one 6x4 image, left-padded."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor([[1, 8, 8], [1, 4, 6], [1, 6, 4]])
    ntok = (grid.prod(-1) // 4).tolist()
    r0 = [1, 3, Q_VS] + [Q_IMG] * ntok[0] + [Q_VE, 4, Q_VS] + [Q_IMG] * ntok[1] + [Q_VE, 5, 6]
    r1 = [1, 7, Q_VS] + [Q_IMG] * ntok[2] + [Q_VE, 8]
    L = len(r0)
    ids = torch.zeros(2, L, dtype=torch.long)
    am = torch.zeros(2, L, dtype=torch.long)
    ids[0] = torch.tensor(r0)
    am[0] = 1
    ids[1, L - len(r1):] = torch.tensor(r1)
    am[1, L - len(r1):] = 1
    pv = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 4 * 4, generator=g)
    return dict(input_ids=ids, attention_mask=am, pixel_values=pv, image_grid_thw=grid,
                mm_token_type_ids=(ids == Q_IMG).int())


class Capture:
    """Inputs of the language model (embeddings, positions, mask) and of its first decoder layer."""

    def __init__(self, model):
        self.calls = []
        lm = model.model.language_model
        self.h1 = lm.register_forward_pre_hook(self._lm, with_kwargs=True)
        self.h2 = lm.layers[0].register_forward_pre_hook(self._layer, with_kwargs=True)

    def _lm(self, mod, args, kwargs):
        self.calls.append(dict(embeds=kwargs["inputs_embeds"].detach().clone(),
                               pos=None if kwargs.get("position_ids") is None else kwargs["position_ids"].clone(),
                               mask=kwargs.get("attention_mask")))

    def _layer(self, mod, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        self.calls[-1]["layer0"] = hs.detach().clone()

    def remove(self):
        self.h1.remove()
        self.h2.remove()


def image_features(model, batch):
    with torch.no_grad():
        if "image_grid_thw" in batch:
            out = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
        else:
            out = model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)
    return list(out.pooler_output)


def expected_columns(ids, am, image_id, kept_flat):
    """Per row, the original columns a correct pruning keeps (text + selected image tokens, no padding)."""
    img_pos = (ids == image_id).nonzero().tolist()
    sel = {tuple(img_pos[i]) for i in kept_flat.tolist()}
    return [[c for c in range(ids.shape[1]) if am[b, c] and (ids[b, c] != image_id or (b, c) in sel)]
            for b in range(ids.shape[0])]


def check_kept(model, batch, image_id, unpruned_pos, keep_ratio=0.25, right_padded=False, **kw):
    """Run a pruned forward and compare the decoder's inputs with an independent reconstruction
    (rows re-padded on the left, or on the right for a right-padded batch)."""
    feats = image_features(model, batch)
    packed = torch.cat(feats)
    cu = torch.tensor([0] + [f.shape[0] for f in feats]).cumsum(0)
    want_idx, _ = mmrprune.select_varlen(packed, imp.token_norm(packed), cu, keep_ratio=keep_ratio,
                                         method=kw.get("method", "mmr"), lam=kw.get("lam", 0.5))
    cols = expected_columns(batch["input_ids"], batch["attention_mask"], image_id, want_idx)
    cap = Capture(model)
    try:
        with torch.no_grad(), prune_visual_tokens(model, keep_ratio=keep_ratio, **kw) as p:
            model(**batch)
    finally:
        cap.remove()
    c = cap.calls[-1]
    embed = model.get_input_embeddings()
    ids = batch["input_ids"]
    new_len = max(len(x) for x in cols)
    assert c["embeds"].shape[1] == new_len == p.last["pruned_len"]
    assert torch.equal(p.last["kept_indices"], want_idx)
    img_pos = (ids == image_id).nonzero().tolist()
    row_of = {tuple(pq): i for i, pq in enumerate(img_pos)}
    for b in range(ids.shape[0]):
        off = 0 if right_padded else new_len - len(cols[b])
        pad = list(range(len(cols[b]), new_len)) if right_padded else list(range(off))
        assert not c["mask"][b, pad].bool().any()
        assert torch.equal(p.last["kept_columns"][b], torch.tensor(cols[b]))
        for j, col in enumerate(cols[b]):
            want = packed[row_of[(b, col)]] if ids[b, col] == image_id else embed(ids[b, col])
            torch.testing.assert_close(c["embeds"][b, off + j], want, rtol=0, atol=0)
            torch.testing.assert_close(c["layer0"][b, off + j], want, rtol=0, atol=0)
            assert int(c["mask"][b, off + j]) == 1
            assert torch.equal(c["pos"][..., b, off + j], unpruned_pos[..., b, col]), (b, col)
        # visual tokens appear in positional (ascending column) order
        vis = [col for col in cols[b] if ids[b, col] == image_id]
        assert vis == sorted(vis)
    return p


# ----------------------------------------------------------------------------- LLaVA
def test_import_does_not_import_transformers():
    code = "import sys, mmrprune, mmrprune.integrations, mmrprune.importance; " \
           "assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_llava_prefill_sees_kept_tokens_with_original_positions(llava):
    batch = llava_batch()
    L = batch["input_ids"].shape[1]
    unpruned = torch.arange(L).expand(2, L)                            # LlamaModel's default positions
    p = check_kept(llava, batch, IMG, unpruned, keep_ratio=0.25)
    # 3 images of 16 tokens keep 4 each: row 0 (38 -> 14) sets the length, row 1 (22 -> 10) is re-padded
    assert p.last["visual_before"] == 48 and p.last["visual_after"] == 12
    assert p.last["orig_len"] == L and p.last["pruned_len"] == L - 24


def test_llava_right_padded_batch_is_repadded_on_the_right(llava):
    batch = llava_batch(right_padded=True)
    L = batch["input_ids"].shape[1]
    p = check_kept(llava, batch, IMG, torch.arange(L).expand(2, L), keep_ratio=0.25, right_padded=True)
    assert p.last["right_padded"] and p.last["pruned_len"] == L - 24


def test_llava_keep_ratio_one_reproduces_logits_and_loss(llava):
    batch = llava_batch(1)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMG, -100).masked_fill(
        batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        ref = llava(**batch, labels=labels)
        with prune_visual_tokens(llava, keep_ratio=1.0, method="mmr", lam=0.5):
            got = llava(**batch, labels=labels)
        after = llava(**batch, labels=labels)                          # hook removed on exit
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(after.logits, ref.logits)


def test_llava_labels_shortened(llava):
    batch = llava_batch(2)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMG, -100).masked_fill(
        batch["attention_mask"] == 0, -100)
    with torch.no_grad(), prune_visual_tokens(llava, k=3) as p:
        out = llava(**batch, labels=labels)
    new_len = p.last["pruned_len"]
    assert out.logits.shape[1] == new_len
    # rebuild the pruned labels from the kept columns and recompute the shifted CE
    want = torch.full((2, new_len), -100)
    for b, cols in enumerate(p.last["kept_columns"]):
        want[b, new_len - len(cols):] = labels[b, cols]
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                           want[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ce, rtol=1e-5, atol=1e-6)


def _greedy_no_cache(model, batch, steps, extend):
    """Reference decode: re-run the whole (pruned) prompt every step, no KV cache."""
    b = dict(batch)
    out, logits = [], []
    for _ in range(steps):
        with torch.no_grad():
            last = model(**b, use_cache=False).logits[:, -1]
        nxt = last.argmax(-1, keepdim=True)
        out.append(nxt)
        logits.append(last)
        b = extend(b, nxt)
    return torch.cat(out, dim=1), logits


def _generate(model, batch, steps):
    with torch.no_grad():
        g = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                           return_dict_in_generate=True, output_logits=True)
    return g.sequences, g.logits


def _extend_llava(b, nxt):
    b = dict(b)
    b["input_ids"] = torch.cat([b["input_ids"], nxt], 1)
    b["attention_mask"] = torch.cat([b["attention_mask"], torch.ones_like(nxt)], 1)
    return b


def _extend_qwen(b, nxt):
    b = _extend_llava(b, nxt)
    b["mm_token_type_ids"] = torch.cat([b["mm_token_type_ids"], torch.zeros_like(nxt, dtype=torch.int)], 1)
    return b


def test_llava_generate_batch2_two_images_matches_uncached_decode(llava):
    batch = llava_batch(3)
    L = batch["input_ids"].shape[1]
    with prune_visual_tokens(llava, keep_ratio=0.25, method="mmr", lam=0.5, importance="norm") as p:
        gen, gen_logits = _generate(llava, batch, 4)
        assert p.last["pruned_len"] == L - 24
        ref, ref_logits = _greedy_no_cache(llava, batch, 4, _extend_llava)
    assert gen.shape == (2, L + 4)
    assert torch.equal(gen[:, L:], ref)
    for a, b in zip(gen_logits, ref_logits):                          # cached decode == full recompute
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():                                               # and pruning did change the model's view
        full = llava(**batch).logits[:, -1]
    assert not torch.allclose(full, ref_logits[0], atol=1e-4)


def test_llava_prefill_flops_drop(llava):
    from torch.utils.flop_counter import FlopCounterMode
    batch = {k: v[:1] for k, v in llava_batch(4).items() if k != "pixel_values"}
    batch["pixel_values"] = llava_batch(4)["pixel_values"][:2]          # row 0 has two images
    lm = llava.model.language_model
    measured = {}
    for ratio in (1.0, 0.25):
        cap = Capture(llava)
        try:
            with torch.no_grad(), prune_visual_tokens(llava, keep_ratio=ratio) as p:
                llava(**batch)
        finally:
            cap.remove()
        c = cap.calls[-1]
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            lm(inputs_embeds=c["embeds"], position_ids=c["pos"], attention_mask=c["mask"])
        n = p.last["pruned_len"]
        measured[n] = fc.get_total_flops()
        est = prefill_flops(llava.config.text_config, n)
        assert abs(measured[n] - est) / est < 0.02, (n, measured[n], est)
    (n_full, f_full), (n_pruned, f_pruned) = sorted(measured.items(), reverse=True)
    assert n_full == batch["input_ids"].shape[1] and n_pruned == n_full - 24
    assert f_pruned < f_full * n_pruned / n_full                       # at least linear savings


def test_llava_cls_importance_matches_vision_tower_attention(llava):
    batch = llava_batch(5)
    with torch.no_grad():
        out = llava.model.vision_tower(batch["pixel_values"], output_attentions=True, output_hidden_states=True)
    # features taken at hidden_states[-2] -> produced by the second-to-last layer = attentions[-2]
    w = imp.cls_attention(out.attentions[-2]).reshape(-1)
    feats = image_features(llava, batch)
    packed = torch.cat(feats)
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


def test_llava_text_and_user_importance(llava):
    batch = llava_batch(6)
    feats = image_features(llava, batch)
    packed = torch.cat(feats)
    cu = torch.tensor([0, 16, 32, 48])
    emb = llava.get_input_embeddings()
    ids, am = batch["input_ids"], batch["attention_mask"]
    ws = []
    for i, f in enumerate(feats):
        row = 0 if i < 2 else 1
        text = emb(ids[row][(ids[row] != IMG) & (am[row] == 1)])
        ws.append(imp.text_relevance(f.detach(), text.detach(), reduce="mean"))
    want, _ = mmrprune.select_varlen(packed, torch.cat(ws), cu, k=4, method="topk")
    with torch.no_grad(), prune_visual_tokens(llava, k=4, method="topk", importance="text",
                                              text_reduce="mean") as p:
        llava(**batch)
    assert torch.equal(p.last["kept_indices"], want)
    # a user tensor: topk must keep exactly its 4 largest entries per image
    user = torch.randn(48, generator=torch.Generator().manual_seed(0))
    want_u = torch.cat([torch.topk(user[s:s + 16], 4).indices.sort().values + s for s in (0, 16, 32)])
    with torch.no_grad(), prune_visual_tokens(llava, k=4, method="topk", importance=user) as p:
        llava(**batch)
    assert torch.equal(p.last["kept_indices"], want_u)
    with torch.no_grad(), prune_visual_tokens(llava, k=4, method="topk",
                                              importance=lambda fs, ctx: [user[:16], user[16:32], user[32:]]) as p:
        llava(**batch)
    assert torch.equal(p.last["kept_indices"], want_u)
    with pytest.raises(ValueError, match="48"):
        with torch.no_grad(), prune_visual_tokens(llava, k=4, importance=user[:10]):
            llava(**batch)


def test_bad_arguments(llava):
    with pytest.raises(ValueError, match="exactly one"):
        prune_visual_tokens(llava, k=2, keep_ratio=0.5).__enter__()
    with pytest.raises(ValueError, match="importance"):
        prune_visual_tokens(llava, k=2, importance="attention").__enter__()
    with pytest.raises(TypeError, match="unsupported"):
        prune_visual_tokens(torch.nn.Linear(2, 2), k=2).__enter__()
    with prune_visual_tokens(llava, k=2):
        with pytest.raises(RuntimeError, match="already"):
            prune_visual_tokens(llava, k=2).__enter__()


# ----------------------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL
def qwen_unpruned_positions(model, batch):
    with torch.no_grad():
        pos, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                            image_grid_thw=batch["image_grid_thw"],
                                            attention_mask=batch["attention_mask"])
    return pos


def test_qwen_prefill_keeps_original_mrope_positions(qwen):
    batch = qwen_batch()
    pos = qwen_unpruned_positions(qwen, batch)
    assert (pos[1] != pos[2]).any()                                     # genuinely 3-D positions
    p = check_kept(qwen, batch, Q_IMG, pos, keep_ratio=0.25)
    # images of 16, 6, 6 tokens keep 4, 2, 2
    assert p.last["visual_after"] == 8
    assert p.last["pruned_len"] == batch["input_ids"].shape[1] - 12 - 4


def test_qwen_keep_ratio_one_reproduces_logits(qwen):
    batch = qwen_batch(1)
    with torch.no_grad():
        ref = qwen(**batch)
        with prune_visual_tokens(qwen, keep_ratio=1.0, method="dpp"):
            got = qwen(**batch)
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-5, atol=1e-5)


def test_qwen_generate_batch2_matches_uncached_decode(qwen):
    batch = qwen_batch(2)
    L = batch["input_ids"].shape[1]
    with prune_visual_tokens(qwen, keep_ratio=0.5, method="mmr", lam=0.5) as p:
        gen, gen_logits = _generate(qwen, batch, 4)
        assert p.last["orig_len"] == L and p.last["pruned_len"] == L - 8 - 3  # row 0: 16->8, 6->3
        ref, ref_logits = _greedy_no_cache(qwen, batch, 4, _extend_qwen)
    assert gen.shape == (2, L + 4)
    assert torch.equal(gen[:, L:], ref)
    for a, b in zip(gen_logits, ref_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
