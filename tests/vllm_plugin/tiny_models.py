"""Tiny random-weight Qwen2.5-VL, Qwen3-VL and Qwen3.5 checkpoints with tokenizer and processor, built offline.

    python tiny_models.py qwen25|qwen3|qwen35 OUT_DIR

Byte-level tokenizer (256 byte symbols, no merges) plus Qwen's special tokens; 2 decoder layers of
width 128, a 2-block vision tower (merge 2; Qwen2.5-VL patch 14, Qwen3-VL patch 16 with a
DeepStack feature from each block; Qwen3.5 as Qwen3-VL without DeepStack, one linear-attention
(Gated DeltaNet) and one full-attention decoder layer).  Under 1 M parameters, a few MB on disk."""
import sys

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# a Qwen-style chat template: images become <|vision_start|><|image_pad|><|vision_end|>
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
FAMILIES = ("qwen25", "qwen3", "qwen35")
PATCH = {"qwen25": 14, "qwen3": 16, "qwen35": 16}
MERGE = 2
# per frame, at most 8 x 8 merged tokens
MAX_PIXELS = {f: (PATCH[f] * MERGE * 8) ** 2 for f in FAMILIES}
MIN_PIXELS = {f: (PATCH[f] * MERGE) ** 2 for f in FAMILIES}
TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=4096, tie_word_embeddings=False)


def _tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for s in SPECIAL:
        vocab[s] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=CHAT_TEMPLATE)
    return tok, {s: vocab[s] for s in SPECIAL}


def _token_ids(ids):
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def build(family: str, out_dir: str) -> dict:
    import torch
    from transformers import Qwen2VLImageProcessor
    tok, ids = _tokenizer()
    text = dict(TEXT, vocab_size=len(ids) + 256, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    pixels = dict(min_pixels=MIN_PIXELS[family], max_pixels=MAX_PIXELS[family], patch_size=PATCH[family],
                  temporal_patch_size=2, merge_size=MERGE)
    # the PIL processor: torchvision's compiled ops are unavailable.  Qwen3-VL normalises images and
    # videos alike (vLLM applies one normalisation to both)
    norm = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3) if family in ("qwen3", "qwen35") else {}
    images = Qwen2VLImageProcessor(**pixels, **norm)
    if family == "qwen25":
        from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                                  Qwen2VLVideoProcessor)
        text.update(rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]}, rope_theta=1e6)
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, out_hidden_size=128, num_heads=2,
                      patch_size=14, spatial_merge_size=MERGE, temporal_patch_size=2, in_channels=3,
                      window_size=112, fullatt_block_indexes=[1], tokens_per_second=2)
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_token_ids(ids))
        model_cls, videos = Qwen2_5_VLForConditionalGeneration, Qwen2VLVideoProcessor(**pixels)
        proc = Qwen2_5_VLProcessor(image_processor=images, tokenizer=tok, video_processor=videos,
                                   chat_template=CHAT_TEMPLATE)
    else:
        from transformers import Qwen3VLProcessor
        from transformers.models.qwen3_vl import Qwen3VLVideoProcessor
        text.update(head_dim=64, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                   "mrope_section": [8, 12, 12], "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, out_hidden_size=128, num_heads=2,
                      patch_size=16, spatial_merge_size=MERGE, temporal_patch_size=2, in_channels=3,
                      num_position_embeddings=64)
        if family == "qwen3":
            from transformers import Qwen3VLConfig as config_cls
            from transformers import Qwen3VLForConditionalGeneration as model_cls
            vision.update(deepstack_visual_indexes=[0, 1])
        else:
            from transformers import Qwen3_5Config as config_cls
            from transformers import Qwen3_5ForConditionalGeneration as model_cls
            text["rope_parameters"]["partial_rotary_factor"] = 1.0
            text.update(layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=4,
                        linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=1,
                        linear_num_value_heads=2)
        cfg = config_cls(text_config=text, vision_config=vision, **_token_ids(ids))
        # its pixel limits count every frame
        videos = Qwen3VLVideoProcessor(size={"shortest_edge": MIN_PIXELS[family], "longest_edge": 16 * MAX_PIXELS[family]},
                                       patch_size=16, temporal_patch_size=2, merge_size=MERGE, do_sample_frames=False)
        proc = Qwen3VLProcessor(image_processor=images, tokenizer=tok, video_processor=videos,
                                chat_template=CHAT_TEMPLATE)
    cfg.architectures = [model_cls.__name__]
    torch.manual_seed(0)
    model_cls(cfg).to(torch.float32).save_pretrained(out_dir)
    proc.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return ids


if __name__ == "__main__":
    print(build(sys.argv[1], sys.argv[2]))
