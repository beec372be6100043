"""The self-check that lets a transformers release newer than the tested window through.

On such a release, enabling pruning first runs the integration on a tiny random model of the
user's family: the user's config (its model type, token ids, rope and attention settings)
with every size shrunk, on a batch of two left-padded prompts with one image each.  It checks

1. the pruned prefill: its logits at every kept column equal those of the unpruned model run
   with the dropped columns masked out of the attention (2-D mask) and the original position
   ids -- what pruning promises, computed by the model's own forward;
2. one cached decode step: ``generate``'s second step (the first one that reads the pruned KV
   cache) equals the uncached recompute, the pruned prefill of the prompt plus the first
   generated token.

These cover what a release can break without an error: where the features land, the
position ids, the names and shapes of the cache and mask arguments ``generate`` passes, and
the encoder outputs.  Videos are not part of it.  A family without a probe here is refused on
such releases, as before.
"""
from __future__ import annotations

import copy
import time
from typing import Optional

import torch

from . import versions

ATOL = 1e-4          # float32 logits of a 2-layer model: the integration is exact to ~1e-6
_PASSED: dict = {}   # (model class, release) -> seconds the check took

_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             head_dim=16, max_position_embeddings=512, moe_intermediate_size=16, num_experts=4,
             num_experts_per_tok=2, shared_expert_intermediate_size=16, query_pre_attn_scalar=16,
             sliding_window=256, linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16,
             linear_value_head_dim=16)
_VISION = dict(depth=2, embed_dim=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_heads=2,
               num_attention_heads=2, mlp_ratio=2, out_hidden_size=32, window_size=16, fullatt_block_indexes=[1],
               num_position_embeddings=16, deepstack_visual_indexes=[0, 1], projection_dim=32)


def _shrunk(sub: dict, sizes: dict, mrope: bool = False) -> dict:
    out = dict(sub)
    out.update({k: v for k, v in sizes.items() if k in sub})
    if isinstance(out.get("layer_types"), list):       # one layer of each kind the user's model mixes
        kinds = list(dict.fromkeys(out["layer_types"]))
        out["layer_types"] = (kinds * 2)[:2]
    if mrope:      # head_dim 16: 8 rotary pairs over (t, h, w)
        key = "rope_parameters" if "rope_parameters" in out else "rope_scaling"
        rope = out.get(key) or ({"rope_type": "default"} if key == "rope_parameters" else {"type": "mrope"})
        out[key] = dict(rope, mrope_section=[2, 3, 3])
    return out


def tiny_config(config, vision: dict = None, mrope: bool = False, **top):
    """The user's config with its text and vision sizes shrunk (``vision`` and ``top`` override;
    ``mrope``: the rotary sections fitted to the shrunk head)."""
    d = copy.deepcopy(config.to_dict())
    d["text_config"] = _shrunk(d["text_config"], _TEXT, mrope)
    d["vision_config"] = _shrunk(d["vision_config"], {**_VISION, **(vision or {})})
    d.update(top)
    # the embedding table holds every placeholder id (a default config may leave them outside)
    media = [v for k, v in d.items() if isinstance(v, int) and k.endswith(("token_id", "token_index"))]
    if "vocab_size" in d["text_config"]:
        d["text_config"]["vocab_size"] = max([d["text_config"]["vocab_size"]] + [m + 1 for m in media])
    return type(config).from_dict(d)


def _rows(images: list) -> tuple:
    """``(input_ids, attention_mask)``: row 0 holds the first two images (token lists), row 1
    the third, left-padded.  Two images against one make the pruned rows' padding differ from
    the unpruned rows', so a decode step that used the unpruned mask would read the wrong
    columns of the cache."""
    rows = [[1, 5] + images[0] + [6] + images[1] + [7], [1] + images[2] + [8, 9]]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    am = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r)
        am[b, width - len(r):] = 1
    return ids, am


# ----------------------------------------------------------------------------- probes: tiny config + batch
# probe(user's config, the model's forward arguments) -> (tiny config, batch)
def _llava(config, params):
    cfg = tiny_config(config, vision=dict(image_size=32, patch_size=8))
    n = 16 + (cfg.vision_feature_select_strategy == "full")
    ids, am = _rows([[cfg.image_token_id] * n] * 3)
    g = torch.Generator().manual_seed(0)
    return cfg, dict(input_ids=ids, attention_mask=am, pixel_values=torch.randn(3, 3, 32, 32, generator=g))


def _qwen(config, params):
    cfg = tiny_config(config, vision=dict(patch_size=4), mrope=True)
    vc = cfg.vision_config
    m, tp = vc.spatial_merge_size, vc.temporal_patch_size
    grid = torch.tensor([[1, 2 * m, 3 * m], [1, 3 * m, 2 * m], [1, 2 * m, 2 * m]])       # 6, 6, 4 merged tokens
    ids, am = _rows([[cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id]
                     for n in (6, 6, 4)])
    g = torch.Generator().manual_seed(0)
    batch = dict(input_ids=ids, attention_mask=am, image_grid_thw=grid,
                 pixel_values=torch.randn(int(grid.prod(-1).sum()), 3 * tp * 16, generator=g))
    if "mm_token_type_ids" in params:
        batch["mm_token_type_ids"] = (ids == cfg.image_token_id).int()
    return cfg, batch


def _gemma3(config, params):
    cfg = tiny_config(config, vision=dict(image_size=32, patch_size=8, num_hidden_layers=1), mm_tokens_per_image=16)
    t = cfg.image_token_id
    image = [getattr(cfg, "boi_token_id", None) or cfg.boi_token_index] + [t] * 16 + \
        [getattr(cfg, "eoi_token_id", None) or cfg.eoi_token_index]
    ids, am = _rows([image] * 3)
    g = torch.Generator().manual_seed(0)
    return cfg, dict(input_ids=ids, attention_mask=am, token_type_ids=(ids == t).long(),
                     pixel_values=torch.randn(3, 3, 32, 32, generator=g))


def _internvl(config, params):
    cfg = tiny_config(config, vision=dict(image_size=[32, 32], patch_size=[4, 4], num_hidden_layers=1),
                      image_seq_length=16, downsample_ratio=0.5)
    t = cfg.image_token_id
    ids, am = _rows([[t] * 32, [t] * 16, [t] * 16])         # tiles: 2, 1, 1
    g = torch.Generator().manual_seed(0)
    return cfg, dict(input_ids=ids, attention_mask=am, pixel_values=torch.randn(4, 3, 32, 32, generator=g))


def _anyres(config, params):
    cfg = tiny_config(config, vision=dict(image_size=16, patch_size=4),
                      image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]])
    onevision = "batch_num_images" in params
    g = torch.Generator().manual_seed(0)
    batch = dict(pixel_values=torch.randn(3, 5, 3, 16, 16, generator=g),
                 image_sizes=torch.tensor([[32, 32], [30, 20], [32, 32]]))
    if onevision:
        batch["batch_num_images"] = torch.tensor([2, 1])
    return cfg, batch          # input_ids: from the feature count (:func:`_anyres_ids`)


PROBES = {"llava": _llava, "qwen2_vl": _qwen, "qwen3_vl": _qwen, "gemma3": _gemma3, "internvl": _internvl,
          "llava_next": _anyres, "llava_onevision": _anyres}


def _anyres_ids(model, batch):
    """Each image's token count from the model's own anyres packing."""
    inner = model.model
    extra = {k: batch[k] for k in ("batch_num_images",) if k in batch}
    out = inner.get_image_features(batch["pixel_values"], batch["image_sizes"],
                                   vision_feature_layer=model.config.vision_feature_layer,
                                   vision_feature_select_strategy=model.config.vision_feature_select_strategy,
                                   **extra, **versions.output_kwargs())
    n = [f.shape[0] for f in versions.per_item(out)]
    ids, am = _rows([[model.config.image_token_id] * c for c in n])
    return dict(batch, input_ids=ids, attention_mask=am)


# ----------------------------------------------------------------------------- the check
def verify(model, fam, installed: str, enable) -> Optional[float]:
    """Run the self-check for ``model``'s family on ``installed``; returns its seconds, or raises
    the refusal saying what differed.  ``enable(tiny_model, **options)`` enables pruning
    without the release check.  A pass is remembered per model class and release."""
    key = (type(model), installed)
    if key in _PASSED:
        return None
    probe = PROBES.get(fam.name)
    window = versions.specifier()
    if probe is None:
        raise RuntimeError(f"prune_visual_tokens: transformers {installed} is newer than the releases this "
                           f"integration is tested on ({window}), and {fam.name} models have no self-check; "
                           f"{versions.install_hint()}")
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        what = _differences(model, fam, probe, enable)
    except Exception as exc:       # noqa: BLE001 - any failure of the tiny run is a refusal
        what = f"the tiny model failed: {type(exc).__name__}: {exc}"
    finally:
        torch.set_num_threads(threads)
    if what:
        raise RuntimeError(f"prune_visual_tokens: transformers {installed} is newer than the releases this "
                           f"integration is tested on ({window}), and its self-check on a tiny {fam.name} model "
                           f"failed: {what}; {versions.install_hint()}")
    _PASSED[key] = time.perf_counter() - start
    return _PASSED[key]


def _differences(model, fam, probe, enable) -> str:
    import inspect
    cfg, batch = probe(model.config, tuple(inspect.signature(type(model).forward).parameters))
    torch.manual_seed(0)
    tiny = type(model)._from_config(cfg, attn_implementation="eager").float().eval()
    if fam.name in ("llava_next", "llava_onevision"):
        with torch.no_grad():
            batch = _anyres_ids(tiny, batch)
    pruner = enable(tiny, k=2)
    try:
        with torch.no_grad():
            out = tiny.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False, output_logits=True,
                                return_dict_in_generate=True, pad_token_id=0, suppress_tokens=_media_tokens(cfg))
            kept = [c.clone() for c in pruner.last["kept_columns"]]
            first = out.sequences[:, -2:-1]
            longer = _extend(batch, first, fam.token_keys)
            recompute = tiny(**longer).logits
    finally:
        pruner.remove()
    with torch.no_grad():
        masked = _masked_forward(tiny, batch, kept)
    pruned_len = recompute.shape[1] - 1
    right = [torch.arange(len(c)) + pruned_len - len(c) for c in kept]       # left-padded pruned rows
    worst = max(float((recompute[b, right[b]] - masked[b, kept[b]]).abs().max()) for b in range(len(kept)))
    if worst > ATOL:
        return (f"the pruned prefill's logits differ from the masked unpruned forward's by {worst:.3g} "
                f"(tolerance {ATOL})")
    step = float((out.logits[1] - recompute[:, -1]).abs().max())
    if step > ATOL:
        return (f"the cached decode step's logits differ from the uncached recompute's by {step:.3g} "
                f"(tolerance {ATOL})")
    return ""


def _media_tokens(cfg) -> list:
    """The image / video / vision-frame token ids of a config: a random model must not generate
    them (a generated placeholder would ask the recompute for one more image token)."""
    words = ("image", "video", "vision", "boi", "eoi")
    return sorted({v for k, v in cfg.to_dict().items() if isinstance(v, int) and not isinstance(v, bool)
                   and k.endswith(("token_id", "token_index")) and any(w in k for w in words)})


def _extend(batch: dict, token: torch.Tensor, token_keys: tuple) -> dict:
    out = dict(batch, input_ids=torch.cat([batch["input_ids"], token], 1),
               attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(token)], 1))
    for key in token_keys:
        if key in batch:
            out[key] = torch.cat([batch[key], torch.zeros_like(token, dtype=batch[key].dtype)], 1)
    return out


def _masked_forward(model, batch: dict, kept: list) -> torch.Tensor:
    """The unpruned model with every dropped column masked out of the attention and the
    unpruned prompt's position ids (the model's own, recorded from its language model)."""
    lm = model.model.language_model
    seen = {}

    def record(module, args, kwargs):
        seen.setdefault("position_ids", kwargs.get("position_ids"))

    h = lm.register_forward_pre_hook(record, with_kwargs=True)
    try:
        model(**batch)
    finally:
        h.remove()
    am = torch.zeros_like(batch["attention_mask"])
    for b, cols in enumerate(kept):
        am[b, cols] = 1
    pos = seen["position_ids"]
    kw = dict(batch, attention_mask=am)
    if pos is not None:
        kw["position_ids"] = pos
    return model(**kw).logits
