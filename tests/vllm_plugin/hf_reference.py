"""The references for the plugin: the same prompts through transformers on the same weights.

* :func:`unpruned`: per prompt, the prompt ids, greedy output, unpruned M-RoPE positions
  (``get_rope_index``) and each item's merged features (main, and DeepStack levels for Qwen3-VL).
* :func:`integration`: transformers + ``mmrprune.integrations.hf`` (kept indices and greedy output),
  for the (family, modality) pairs in :data:`HF_INTEGRATION_COVERS`.
* :func:`pruned_by_hand`: for the other pairs, until the HF integration covers them, the greedy
  output of the decoder fed the unpruned prompt's embeddings, positions and DeepStack features at
  the kept columns only: what pruning before the first decoder layer means, written out.
"""
import torch

from engine_run import CASES, MAX_TOKENS, PROMPTS, medium, modality, prompt_text

# what mmrprune.integrations.hf prunes; add a pair when it learns it, the tests then compare with it
# (Qwen2.5-VL videos are not: transformers 5 and vLLM 0.32 number the text after a video differently)
HF_INTEGRATION_COVERS = {("qwen25", "image"), ("qwen3", "image"), ("qwen3", "video")}


def load(family, model_dir):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration
    cls = Qwen2_5_VLForConditionalGeneration if family == "qwen25" else Qwen3VLForConditionalGeneration
    return cls.from_pretrained(model_dir, dtype=torch.float32).eval(), AutoProcessor.from_pretrained(model_dir)


def inputs(family, proc, prompt):
    images, videos, metadata = [], [], []
    for name in PROMPTS[prompt][0]:
        item = medium(family, name)
        if modality(name) == "image":
            images.append(item)
        else:
            videos.append(item[0])
            metadata.append(item[1])
    extra = dict(videos=videos, video_metadata=metadata, do_sample_frames=False) if videos else {}
    return proc(text=[prompt_text(prompt)], images=images or None, return_tensors="pt", **extra)


def _rope(family, model, x):
    kw = dict(image_grid_thw=x.get("image_grid_thw"), video_grid_thw=x.get("video_grid_thw"),
              mm_token_type_ids=x["mm_token_type_ids"], attention_mask=x["attention_mask"])
    if family == "qwen25":
        kw["second_per_grid_ts"] = x.get("second_per_grid_ts")
    return model.model.get_rope_index(x["input_ids"], **kw)[0][:, 0]          # [3, L]


def _features(family, model, x):
    """modality -> (grids [(t, h, w) merged], per-item main features, per-level per-item DeepStack)."""
    m, out = model.model, {}
    merge = model.config.vision_config.spatial_merge_size
    for mod, pix, grid in (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos",
                                                                         "video_grid_thw")):
        if x.get(pix) is None:
            continue
        fn = m.get_image_features if mod == "image" else m.get_video_features
        o = fn(x[pix], x[grid], return_dict=True)
        deep = [list(level) for level in o.deepstack_features] if family == "qwen3" else []
        grids = [(int(t), int(h) // merge, int(w) // merge) for t, h, w in x[grid].tolist()]
        out[mod] = (grids, list(o.pooler_output), deep)
    return out


def unpruned(family, model, proc):
    out = {}
    with torch.no_grad():
        for prompts in CASES.values():
            for p in prompts:
                x = inputs(family, proc, p)
                n = x["input_ids"].shape[1]
                gen = model.generate(**x, max_new_tokens=MAX_TOKENS, do_sample=False)
                out[p] = dict(inputs=x, prompt_ids=x["input_ids"][0].tolist(), output_ids=gen[0, n:].tolist(),
                              positions=_rope(family, model, x), features=_features(family, model, x))
    return out


def keep_columns(model, ref, kept):
    """Boolean [L] over the unpruned prompt: text, and the kept tokens of each item.  ``kept``:
    modality -> per-item kept local indices, items in prompt order."""
    ids = ref["inputs"]["input_ids"][0]
    keep = torch.ones_like(ids, dtype=torch.bool)
    for mod, token in (("image", model.config.image_token_id), ("video", model.config.video_token_id)):
        slots = (ids == token).nonzero().flatten()
        if mod not in ref["features"]:
            continue
        keep[slots] = False
        start = 0
        for feats, local in zip(ref["features"][mod][1], kept[mod]):
            keep[slots[start + torch.as_tensor(local, dtype=torch.long)]] = True
            start += feats.shape[0]
    return keep


def pruned_by_hand(family, model, ref, keep):
    """Greedy output ids of the prompt reduced to the ``keep`` columns (original positions)."""
    m, x = model.model, ref["inputs"]
    ids = x["input_ids"][0]
    embeds = m.get_input_embeddings()(ids)
    visual = torch.zeros_like(ids, dtype=torch.bool)
    levels = None
    with torch.no_grad():
        for mod, token in (("image", model.config.image_token_id), ("video", model.config.video_token_id)):
            if mod not in ref["features"]:
                continue
            _, main, deep = ref["features"][mod]
            slots = ids == token
            visual |= slots
            embeds[slots] = torch.cat(main)
            if deep:
                levels = levels if levels is not None else [torch.zeros_like(embeds) for _ in deep]
                for full, level in zip(levels, deep):
                    full[slots] = torch.cat(level)
        extra = {}
        if levels is not None:
            extra = dict(visual_pos_masks=visual[keep][None],
                         deepstack_visual_embeds=[full[keep & visual] for full in levels])
        positions = ref["positions"][:, keep]
        lm = m.language_model
        out = lm(inputs_embeds=embeds[keep][None], position_ids=positions[:, None], use_cache=True, **extra)
        nxt, tokens = int(ref["positions"].max()) + 1, []
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        for step in range(MAX_TOKENS):
            tok = int(model.lm_head(out.last_hidden_state[0, -1]).argmax())
            tokens.append(tok)
            if tok in eos:
                break
            out = lm(inputs_embeds=m.get_input_embeddings()(torch.tensor([[tok]])),
                     position_ids=torch.full((3, 1, 1), nxt + step), past_key_values=out.past_key_values,
                     use_cache=True)
    return tokens


def integration(family, model, proc, prompts, **prune):
    """Per prompt: kept local indices per item (modality -> per item, in prompt order) and greedy
    output of mmrprune.integrations.hf."""
    import mmrprune.integrations as mi
    out = {}
    with torch.no_grad():
        for p in prompts:
            x = inputs(family, proc, p)
            with mi.prune_visual_tokens(model, **prune) as pruner:
                gen = model.generate(**x, max_new_tokens=MAX_TOKENS, do_sample=False)
            last = pruner.last
            idx, cu, cu_k = last["kept_indices"], last["cu_seqlens"], last["cu_k"]
            videos = last["video_units"]
            kept = {}
            for b in range(len(cu) - 1):
                mod = "video" if videos is not None and bool(videos[b]) else "image"
                kept.setdefault(mod, []).append((idx[cu_k[b]:cu_k[b + 1]] - cu[b]).tolist())
            out[p] = dict(kept=kept, output_ids=gen[0, x["input_ids"].shape[1]:].tolist())
    return out
