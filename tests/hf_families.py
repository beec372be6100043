"""Tiny random-weight models of every supported family (built from configs, no download)
and the batches the family test suite (tests/test_integrations_hf_families.py) runs them on.

A family joins the suite with one :class:`FamilySpec`: a model factory, a batch factory
(row 0 with two images, row 1 with one, the shorter row padded on the given side), the
mask of its prunable placeholder slots, the tokens per image how to append a
generated token for the uncached recompute, and (for videos) the enable arguments that give
the videos a budget; ``image_tokens`` then counts the tokens of every budget unit.  The Qwen
video specs run the same suite on a batch with videos (row 0: a video, an image and a
second video; row 1: one video), with one budget per video or per frame.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
import transformers

LLAVA_IMAGE = 63
QWEN_IMAGE, QWEN_VIDEO, QWEN_VISION_START, QWEN_VISION_END = 60, 61, 58, 59


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models run single-threaded: the machine is shared, and a model this small gains nothing."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@dataclass
class FamilySpec:
    name: str
    build: Callable[[], torch.nn.Module]
    batch: Callable[..., dict]                    # (model, seed=0, padding="left") -> inputs
    prunable: Callable[[dict], torch.Tensor]      # inputs -> [B, L] bool, the prunable slots
    image_tokens: Callable[[dict], list]          # inputs -> tokens per image, in order
    extend: Callable[[dict, torch.Tensor], dict]  # inputs + one generated token per row
    placeholders: tuple = ()                      # token ids a generation test must not emit
    # [B, L, L] extra (query, key) pairs the model lets attend beyond causality (e.g. Gemma 3's
    # bidirectional image blocks), from the inputs; None: plain causal
    extra_allowed: Optional[Callable[[dict], torch.Tensor]] = None
    # the enable_visual_token_pruning arguments for the suite's budget and method arguments
    # (a video spec adds its video budget, e.g. the same one as video_k / video_keep_ratio)
    enable: Callable[[dict], dict] = dict


def with_video_budget(unit: str = "video") -> Callable[[dict], dict]:
    """A spec's ``enable`` that gives every video (``unit="video"``) or every frame
    (``unit="frame"``) the suite's image budget."""
    def enable(prune: dict) -> dict:
        out = dict(prune, video_unit=unit)
        for key in ("k", "keep_ratio"):
            if key in prune:
                out["video_" + key] = prune[key]
        return out
    return enable


def _pad_rows(rows: list, padding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of token rows padded to a common length with id 0."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    am = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        cols = slice(0, len(r)) if padding == "right" else slice(width - len(r), width)
        ids[b, cols] = torch.tensor(r)
        am[b, cols] = 1
    return ids, am


def _append(batch: dict, token: torch.Tensor, *per_token_keys: str) -> dict:
    b = dict(batch)
    b["input_ids"] = torch.cat([b["input_ids"], token], 1)
    b["attention_mask"] = torch.cat([b["attention_mask"], torch.ones_like(token)], 1)
    for key in per_token_keys:
        if key in b:
            b[key] = torch.cat([b[key], torch.zeros_like(token, dtype=b[key].dtype)], 1)
    return b


# ----------------------------------------------------------------------------- LLaVA-1.5
def build_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=32, patch_size=8, projection_dim=32)       # 16 patches per image
    tc = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=2, vocab_size=64, max_position_embeddings=256,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=LLAVA_IMAGE, vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    torch.manual_seed(0)
    return LlavaForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()


def llava_batch(model=None, seed=0, padding="left"):
    """Row 0: two images and text between them.  Row 1: one image, padded."""
    g = torch.Generator().manual_seed(seed)
    ids, am = _pad_rows([[1, 5, 6] + [LLAVA_IMAGE] * 16 + [7] + [LLAVA_IMAGE] * 16 + [8, 9],
                         [1, 10] + [LLAVA_IMAGE] * 16 + [11, 12, 13]], padding)
    return dict(input_ids=ids, attention_mask=am, pixel_values=torch.randn(3, 3, 32, 32, generator=g))


LLAVA = FamilySpec(name="llava", build=build_llava, batch=llava_batch,
                   prunable=lambda b: b["input_ids"] == LLAVA_IMAGE, image_tokens=lambda b: [16, 16, 16],
                   extend=lambda b, t: _append(b, t), placeholders=(LLAVA_IMAGE,))


# ----------------------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL
QWEN_GRIDS = torch.tensor([[1, 8, 8], [1, 4, 6], [1, 6, 4]])          # 16, 6 and 6 merged tokens


def build_qwen(version: str):
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=64, max_position_embeddings=512, bos_token_id=1,
                eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    if transformers.__version__.startswith("4."):         # 4.57 names the rope settings differently
        del text["rope_parameters"]
        text.update(rope_theta=10000.0, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    ids = dict(image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_VISION_START,
               vision_end_token_id=QWEN_VISION_END)
    if version == "qwen2_vl":
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


def qwen_image(n_tokens: int) -> list:
    return [QWEN_VISION_START] + [QWEN_IMAGE] * n_tokens + [QWEN_VISION_END]


def qwen_batch(model, seed=0, padding="left"):
    """Row 0: two images (8x8 and 4x6 patch grids -> 16 and 6 tokens).  Row 1: one 6x4 image, padded.
    With ``mm_token_type_ids`` where the model takes them (transformers 5.3 and later)."""
    g = torch.Generator().manual_seed(seed)
    n = (QWEN_GRIDS.prod(-1) // 4).tolist()
    ids, am = _pad_rows([[1, 3] + qwen_image(n[0]) + [4] + qwen_image(n[1]) + [5, 6],
                         [1, 7] + qwen_image(n[2]) + [8]], padding)
    batch = dict(input_ids=ids, attention_mask=am, image_grid_thw=QWEN_GRIDS,
                 pixel_values=torch.randn(int(QWEN_GRIDS.prod(-1).sum()), 3 * 2 * 4 * 4, generator=g))
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        batch["mm_token_type_ids"] = (ids == QWEN_IMAGE).int()
    return batch


def _qwen_spec(version):
    return FamilySpec(name=version, build=lambda: build_qwen(version), batch=qwen_batch,
                      prunable=lambda b: b["input_ids"] == QWEN_IMAGE,
                      image_tokens=lambda b: (b["image_grid_thw"].prod(-1) // 4).tolist(),
                      extend=lambda b, t: _append(b, t, "mm_token_type_ids"),
                      placeholders=(QWEN_IMAGE, QWEN_VIDEO, QWEN_VISION_START, QWEN_VISION_END))


QWEN2_VL = _qwen_spec("qwen2_vl")
QWEN2_5_VL = _qwen_spec("qwen2_5_vl")

SPECS = (LLAVA, QWEN2_VL, QWEN2_5_VL)

# videos: (t, h, w) patch grids, t temporal steps (frames after temporal patching) of h*w/4 merged tokens
QWEN_VIDEO_GRIDS = torch.tensor([[2, 4, 4], [3, 4, 4], [2, 4, 6]])      # 2x4, 3x4 and 2x6 merged tokens
QWEN_VIDEO_IMAGE_GRID = torch.tensor([[1, 4, 6]])                      # 6 merged tokens
# seconds per temporal step (Qwen2.5-VL spaces its temporal positions by them)
QWEN_SECONDS_PER_GRID = torch.tensor([0.5, 1.0, 2.0])


def qwen_seconds_per_grid(model, seconds: torch.Tensor) -> dict:
    """``second_per_grid_ts`` (one per video) where the model takes it.  None on transformers
    5.3-5.4: their Qwen2.5-VL ``get_rope_index`` takes one per image as well (transformers
    issue 45325), so the model itself fails on a prompt with images, videos and the
    processor's per-video list; without it every video gets the default spacing."""
    from packaging.version import Version

    if "second_per_grid_ts" not in inspect.signature(model.forward).parameters:
        return {}
    if Version("5.3") <= Version(transformers.__version__) < Version("5.5"):
        return {}
    return dict(second_per_grid_ts=seconds)


def qwen_video(n_tokens: int) -> list:
    return [QWEN_VISION_START] + [QWEN_VIDEO] * n_tokens + [QWEN_VISION_END]


def qwen_video_batch(model, seed=0, padding="left"):
    """Row 0: a 2-frame video, an image, a 3-frame video and text between them.  Row 1: one
    2-frame video, padded.  Qwen2.5-VL gets ``second_per_grid_ts``; ``mm_token_type_ids``
    (image 1, video 2) where the model takes them."""
    g = torch.Generator().manual_seed(seed)
    n_video = (QWEN_VIDEO_GRIDS.prod(-1) // 4).tolist()
    n_image = int(QWEN_VIDEO_IMAGE_GRID.prod(-1)) // 4
    ids, am = _pad_rows([[1, 3] + qwen_video(n_video[0]) + [4] + qwen_image(n_image) + [5] + qwen_video(n_video[1])
                         + [6, 9], [1, 7] + qwen_video(n_video[2]) + [8]], padding)
    batch = dict(input_ids=ids, attention_mask=am, image_grid_thw=QWEN_VIDEO_IMAGE_GRID,
                 pixel_values=torch.randn(int(QWEN_VIDEO_IMAGE_GRID.prod(-1).sum()), 96, generator=g),
                 video_grid_thw=QWEN_VIDEO_GRIDS,
                 pixel_values_videos=torch.randn(int(QWEN_VIDEO_GRIDS.prod(-1).sum()), 96, generator=g))
    params = inspect.signature(model.forward).parameters
    batch.update(qwen_seconds_per_grid(model, QWEN_SECONDS_PER_GRID))
    if "mm_token_type_ids" in params:
        batch["mm_token_type_ids"] = (ids == QWEN_IMAGE).int() + 2 * (ids == QWEN_VIDEO).int()
    return batch


def qwen_unit_tokens(batch: dict, video_unit: str) -> list:
    """Tokens per budget unit, row-major: one per image, and one per video or per frame."""
    images = iter((batch["image_grid_thw"].prod(-1) // 4).tolist())
    videos = iter(batch["video_grid_thw"].tolist())
    counts = []
    for row in batch["input_ids"].tolist():
        for prev, tok in zip([None] + row, row):
            if prev != QWEN_VISION_START:
                continue
            if tok == QWEN_IMAGE:
                counts.append(next(images))
            elif tok == QWEN_VIDEO:
                t, h, w = next(videos)
                counts += [t * h * w // 4] if video_unit == "video" else [h * w // 4] * t
    return counts


def _qwen_video_spec(version, unit):
    return FamilySpec(name=f"{version}-video-per-{unit}", build=lambda: build_qwen(version), batch=qwen_video_batch,
                      prunable=lambda b: (b["input_ids"] == QWEN_IMAGE) | (b["input_ids"] == QWEN_VIDEO),
                      image_tokens=lambda b: qwen_unit_tokens(b, unit),
                      extend=lambda b, t: _append(b, t, "mm_token_type_ids"),
                      placeholders=(QWEN_IMAGE, QWEN_VIDEO, QWEN_VISION_START, QWEN_VISION_END),
                      enable=with_video_budget(unit))


QWEN2_VL_VIDEO = _qwen_video_spec("qwen2_vl", "video")
QWEN2_5_VL_VIDEO = _qwen_video_spec("qwen2_5_vl", "video")
QWEN2_VL_FRAMES = _qwen_video_spec("qwen2_vl", "frame")
QWEN2_5_VL_FRAMES = _qwen_video_spec("qwen2_5_vl", "frame")

SPECS += (QWEN2_VL_VIDEO, QWEN2_5_VL_VIDEO, QWEN2_VL_FRAMES, QWEN2_5_VL_FRAMES)


# ----------------------------------------------------------------------------- LLaVA-NeXT / LLaVA-OneVision
# Anyres with 16x16 tiles of 4x4 patches: each image is a 16-token base tile, then its crop
# grid (2x2 patch blocks per crop, unpadded to the image's aspect ratio) row by row, each row
# followed by one image_newline token.  The layouts below are worked out by hand from the
# grid pinpoints and the image sizes (independently of the adapter): (rows, cols) of the crop
# grid, or None for an image that is not split (its base tile and one newline token).
ANYRES_IMAGE, ANYRES_VIDEO = 63, 62
ANYRES_PINPOINTS = [[16, 32], [32, 16], [32, 32]]
ANYRES_BASE = 16
NEXT_SIZES = torch.tensor([[32, 32], [30, 20], [12, 30]])      # (H, W)
# 32x32: 2x2 crops, 8x8 grid; 30x20: 2x2 crops, 8 columns unpadded to 6; 12x30: 1x2 crops, 4x8
NEXT_LAYOUT = [(8, 8), (8, 6), (4, 8)]
# OneVision splits only the images of single-image prompts: row 0's two images are not split;
# row 1's 32x32 image has an 8x8 grid that anyres_max_2 interpolates down to 5x5
ONEVISION_LAYOUT = [None, None, (5, 5)]


def anyres_pattern(layout) -> list:
    """Per image token of one image, whether it is prunable (False: a newline token)."""
    if layout is None:
        return [True] * ANYRES_BASE + [False]
    rows, cols = layout
    return [True] * ANYRES_BASE + ([True] * cols + [False]) * rows


def anyres_prunable(layouts: list) -> Callable[[dict], torch.Tensor]:
    def prunable(batch):
        slots = batch["input_ids"] == ANYRES_IMAGE
        out = torch.zeros_like(slots)
        out[slots] = torch.tensor([p for layout in layouts for p in anyres_pattern(layout)])
        return out
    return prunable


def _anyres_text(version: str):
    from transformers import LlamaConfig, Qwen2Config
    cls = LlamaConfig if version == "llava_next" else Qwen2Config
    return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2, vocab_size=64, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
               eos_token_id=2)


def build_anyres(version: str):
    torch.manual_seed(0)
    if version == "llava_next":
        from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
        vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=4, projection_dim=32)
        cfg = LlavaNextConfig(vision_config=vc, text_config=_anyres_text(version), image_token_index=ANYRES_IMAGE,
                              image_grid_pinpoints=ANYRES_PINPOINTS, vision_feature_layer=-2,
                              vision_feature_select_strategy="default")
        return LlavaNextForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=16, patch_size=4)
    cfg = LlavaOnevisionConfig(vision_config=vc, text_config=_anyres_text(version), image_token_index=ANYRES_IMAGE,
                               video_token_index=ANYRES_VIDEO, image_grid_pinpoints=ANYRES_PINPOINTS,
                               vision_feature_layer=-1, vision_feature_select_strategy="full",
                               vision_aspect_ratio="anyres_max_2")
    return LlavaOnevisionForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()


def anyres_batch(layouts: list, model=None, seed=0, padding="left"):
    """Row 0: two images and text between them.  Row 1: one image, padded.  ``pixel_values``
    [images, 5, 3, 16, 16] as the processor stacks them (each image's unused crops are padding)."""
    g = torch.Generator().manual_seed(seed)
    n = [len(anyres_pattern(layout)) for layout in layouts]
    # row 0 stays the longer one after pruning (OneVision's row 1 holds the only split image)
    middle = [7] if layouts is NEXT_LAYOUT else list(range(20, 36))
    ids, am = _pad_rows([[1, 5, 6] + [ANYRES_IMAGE] * n[0] + middle + [ANYRES_IMAGE] * n[1] + [8, 9],
                         [1, 10] + [ANYRES_IMAGE] * n[2] + [11, 12, 13]], padding)
    batch = dict(input_ids=ids, attention_mask=am, pixel_values=torch.randn(3, 5, 3, 16, 16, generator=g),
                 image_sizes=NEXT_SIZES if layouts is NEXT_LAYOUT else NEXT_SIZES[[0, 1, 0]])
    if layouts is ONEVISION_LAYOUT:
        batch["batch_num_images"] = torch.tensor([2, 1])
    return batch


def _anyres_spec(version: str, layouts: list, placeholders: tuple):
    return FamilySpec(name=version, build=lambda: build_anyres(version),
                      batch=lambda model=None, seed=0, padding="left": anyres_batch(layouts, model, seed, padding),
                      prunable=anyres_prunable(layouts),
                      image_tokens=lambda b: [sum(anyres_pattern(layout)) for layout in layouts],
                      extend=lambda b, t: _append(b, t), placeholders=placeholders)


LLAVA_NEXT = _anyres_spec("llava_next", NEXT_LAYOUT, (ANYRES_IMAGE,))
LLAVA_ONEVISION = _anyres_spec("llava_onevision", ONEVISION_LAYOUT, (ANYRES_IMAGE, ANYRES_VIDEO))

SPECS += (LLAVA_NEXT, LLAVA_ONEVISION)

# ----------------------------------------------------------------------------- Gemma 3
GEMMA_IMAGE, GEMMA_BOI, GEMMA_EOI = 64, 61, 62        # the image token is out of vocabulary, as the model allows


def build_gemma3():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    # one sliding and one full layer; the window covers the whole tiny prompt, since a window
    # counts sequence columns and the reference forward (tests/hf_check.py) masks with causality only
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, vocab_size=64,
                max_position_embeddings=256, sliding_window=256, layer_types=["sliding_attention", "full_attention"],
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)                                               # 4x4 patches -> 16 tokens
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16, image_token_index=GEMMA_IMAGE,
                       boi_token_index=GEMMA_BOI, eoi_token_index=GEMMA_EOI)
    torch.manual_seed(0)
    return Gemma3ForConditionalGeneration(cfg).eval()


def gemma3_image() -> list:
    return [GEMMA_BOI] + [GEMMA_IMAGE] * 16 + [GEMMA_EOI]


def gemma3_batch(model=None, seed=0, padding="left"):
    """Row 0: two images, each between begin/end-of-image tokens.  Row 1: one image, padded.
    ``token_type_ids`` marks the image tokens, as the processor does."""
    g = torch.Generator().manual_seed(seed)
    ids, am = _pad_rows([[1, 5] + gemma3_image() + [7] + gemma3_image() + [8, 9],
                         [1, 10] + gemma3_image() + [11, 12, 13]], padding)
    return dict(input_ids=ids, attention_mask=am, token_type_ids=(ids == GEMMA_IMAGE).long(),
                pixel_values=torch.randn(3, 3, 32, 32, generator=g))


def image_blocks(is_image: torch.Tensor) -> torch.Tensor:
    """[B, L, L]: (query, key) pairs inside one run of consecutive image columns -- Gemma 3's
    bidirectional blocks, written out here independently of the model and the integration."""
    bsz, seqlen = is_image.shape
    block = torch.full((bsz, seqlen), -1, dtype=torch.long)
    for b in range(bsz):
        n = -1
        for col in range(seqlen):
            if is_image[b, col]:
                if col == 0 or not is_image[b, col - 1]:
                    n += 1
                block[b, col] = n
    return (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)


GEMMA3 = FamilySpec(name="gemma3", build=build_gemma3, batch=gemma3_batch,
                    prunable=lambda b: b["input_ids"] == GEMMA_IMAGE, image_tokens=lambda b: [16, 16, 16],
                    extend=lambda b, t: _append(b, t, "token_type_ids"), placeholders=(GEMMA_BOI, GEMMA_EOI),
                    extra_allowed=lambda b: image_blocks(b["token_type_ids"] == 1))
SPECS += (GEMMA3,)


# ----------------------------------------------------------------------------- InternVL
INTERNVL_CONTEXT, INTERNVL_START, INTERNVL_END = 63, 60, 61
INTERNVL_TILES = [2, 1, 2]                  # tiles per image; 16 tokens per tile


def build_internvl():
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    text = dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=64, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=[32, 32], patch_size=[4, 4])     # 8x8 patches, pixel-shuffled to 16 tokens per tile
    cfg = InternVLConfig(text_config=text, vision_config=vision, image_token_id=INTERNVL_CONTEXT,
                         image_seq_length=16)
    torch.manual_seed(0)
    return InternVLForConditionalGeneration(cfg).eval()


def internvl_image(tiles: int) -> list:
    return [INTERNVL_START] + [INTERNVL_CONTEXT] * (16 * tiles) + [INTERNVL_END]


def internvl_batch(model=None, seed=0, padding="left"):
    """Row 0: an image of two tiles and one of a single tile.  Row 1: an image of two tiles,
    padded.  ``pixel_values`` holds the tiles of all images in order, as the processor packs them."""
    g = torch.Generator().manual_seed(seed)
    t = INTERNVL_TILES
    ids, am = _pad_rows([[1, 5] + internvl_image(t[0]) + [7] + internvl_image(t[1]) + [8, 9],
                         [1, 10] + internvl_image(t[2]) + [11]], padding)
    return dict(input_ids=ids, attention_mask=am, pixel_values=torch.randn(sum(t), 3, 32, 32, generator=g))


INTERNVL = FamilySpec(name="internvl", build=build_internvl, batch=internvl_batch,
                      prunable=lambda b: b["input_ids"] == INTERNVL_CONTEXT,
                      image_tokens=lambda b: [16 * n for n in INTERNVL_TILES], extend=lambda b, t: _append(b, t),
                      placeholders=(INTERNVL_CONTEXT, INTERNVL_START, INTERNVL_END))
SPECS += (INTERNVL,)

# ----------------------------------------------------------------------------- Qwen3-VL / Qwen3-VL-MoE
QWEN3_VIDEO_GRIDS = torch.tensor([[2, 4, 6], [3, 4, 4]])    # 2 frames of 6 tokens; 3 frames of 4
QWEN3_TIMESTAMP = [20, 21]                                   # a frame's timestamp text, e.g. "<0.5 seconds>"


def build_qwen3(moe: bool = False):
    """Two decoder layers, two DeepStack levels (from both vision layers): every level feeds
    a decoder layer, so a wrong row in any of them changes the compared hidden states."""
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, head_dim=16,
                num_key_value_heads=1, vocab_size=64, max_position_embeddings=512, bos_token_id=1,
                eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True})
    if transformers.__version__.startswith("4."):         # 4.57 names the rope settings differently
        text.update(rope_theta=10000.0, rope_scaling=dict(text.pop("rope_parameters"), rope_type="default"))
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=[0, 1])
    ids = dict(image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_VISION_START,
               vision_end_token_id=QWEN_VISION_END)
    if moe:
        from transformers import Qwen3VLMoeConfig as Config, Qwen3VLMoeForConditionalGeneration as Model
    else:
        from transformers import Qwen3VLConfig as Config, Qwen3VLForConditionalGeneration as Model
    return Model(Config(vision_config=vision, text_config=text, **ids)).eval()


def qwen3_video(grid) -> list:
    """A video as Qwen3-VL lays it out: per frame its timestamp, then the frame's tokens."""
    t, h, w = grid.tolist()
    frame = [QWEN_VISION_START] + [QWEN_VIDEO] * (h * w // 4) + [QWEN_VISION_END]
    return [tok for _ in range(t) for tok in QWEN3_TIMESTAMP + frame]


def qwen3_video_batch(model, seed=0, padding="left"):
    """Row 0: an 8x8 image (16 tokens) and a video of two 4x6 frames (6 tokens each).  Row 1:
    a video of three 4x4 frames (4 tokens each), padded.  Skipped on the releases whose model
    cannot run such videos (``Qwen3VL.videos_transformers``; video budgets are refused there)."""
    from packaging.specifiers import SpecifierSet

    from mmrprune.integrations.hf.qwen3_vl import Qwen3VL
    if transformers.__version__ not in SpecifierSet(Qwen3VL.videos_transformers):
        pytest.skip(f"transformers {transformers.__version__}'s Qwen3-VL cannot run videos split by timestamps")
    g = torch.Generator().manual_seed(seed)
    n_image = int(QWEN_GRIDS[0].prod()) // 4
    ids, am = _pad_rows([[1, 3] + qwen_image(n_image) + [4] + qwen3_video(QWEN3_VIDEO_GRIDS[0]) + [5, 6],
                         [1, 7] + qwen3_video(QWEN3_VIDEO_GRIDS[1]) + [8]], padding)
    batch = dict(input_ids=ids, attention_mask=am, image_grid_thw=QWEN_GRIDS[:1],
                 pixel_values=torch.randn(int(QWEN_GRIDS[0].prod()), 3 * 2 * 4 * 4, generator=g),
                 video_grid_thw=QWEN3_VIDEO_GRIDS,
                 pixel_values_videos=torch.randn(int(QWEN3_VIDEO_GRIDS.prod(-1).sum()), 3 * 2 * 4 * 4, generator=g))
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        batch["mm_token_type_ids"] = (ids == QWEN_IMAGE).int() + 2 * (ids == QWEN_VIDEO).int()
    return batch


def _qwen3_units(batch, unit: str) -> list:
    """Tokens per budget unit of :func:`qwen3_video_batch`: row 0's image, its video, row 1's video."""
    images = (batch["image_grid_thw"].prod(-1) // 4).tolist()
    videos = [[int(h * w) // 4] * (int(t) if unit == "frame" else 1) for t, h, w in batch["video_grid_thw"]]
    if unit == "video":
        videos = [[n[0] * int(g[0])] for n, g in zip(videos, batch["video_grid_thw"])]
    return images + [n for v in videos for n in v]


def _qwen3_spec(name, moe=False, unit=None):
    placeholders = (QWEN_IMAGE, QWEN_VIDEO, QWEN_VISION_START, QWEN_VISION_END)
    extend = lambda b, t: _append(b, t, "mm_token_type_ids")      # noqa: E731
    if unit is None:
        return FamilySpec(name=name, build=lambda: build_qwen3(moe), batch=qwen_batch,
                          prunable=lambda b: b["input_ids"] == QWEN_IMAGE,
                          image_tokens=lambda b: (b["image_grid_thw"].prod(-1) // 4).tolist(),
                          extend=extend, placeholders=placeholders)
    return FamilySpec(name=name, build=lambda: build_qwen3(moe), batch=qwen3_video_batch,
                      prunable=lambda b: (b["input_ids"] == QWEN_IMAGE) | (b["input_ids"] == QWEN_VIDEO),
                      image_tokens=lambda b: _qwen3_units(b, unit), extend=extend, placeholders=placeholders,
                      enable=with_video_budget(unit))


QWEN3_VL = _qwen3_spec("qwen3_vl")
QWEN3_VL_MOE = _qwen3_spec("qwen3_vl_moe", moe=True)
QWEN3_VL_VIDEO = _qwen3_spec("qwen3_vl-video", unit="video")
QWEN3_VL_FRAME = _qwen3_spec("qwen3_vl-frame", unit="frame")

SPECS += (QWEN3_VL, QWEN3_VL_MOE, QWEN3_VL_VIDEO, QWEN3_VL_FRAME)
