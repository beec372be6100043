"""A tiny random-weight Qwen2.5-VL checkpoint with tokenizer and processor, built offline.

    python tiny_qwen25vl.py OUT_DIR

Byte-level tokenizer (256 byte symbols, no merges) plus Qwen's special tokens; 2 decoder layers of
width 128, a 2-block vision tower (patch 14, merge 2).  ~0.6 M parameters, a few MB on disk."""
import sys

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# a Qwen-style chat template: images become <|vision_start|><|image_pad|><|vision_end|>
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PIXELS = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 64, patch_size=14, temporal_patch_size=2, merge_size=2)


def build(out_dir: str) -> dict:
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for s in SPECIAL:
        vocab[s] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=CHAT_TEMPLATE)
    ids = {s: vocab[s] for s in SPECIAL}
    text = dict(vocab_size=len(vocab), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]}, rope_theta=1e6,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], tie_word_embeddings=False)
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, out_hidden_size=128, num_heads=2,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                  window_size=112, fullatt_block_indexes=[1], tokens_per_second=2)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"])
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(cfg).to(torch.float32).save_pretrained(out_dir)
    # the PIL image processor: torchvision's compiled ops are unavailable next to CPU torch
    proc = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**PIXELS), tokenizer=tok,
                               video_processor=Qwen2VLVideoProcessor(**PIXELS), chat_template=CHAT_TEMPLATE)
    proc.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return ids


if __name__ == "__main__":
    print(build(sys.argv[1]))
