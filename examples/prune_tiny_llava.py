"""Prune a LLaVA model's visual tokens with mmrprune, offline: the model is a tiny one with
random weights built right here (no download), so this runs as is on any machine with
``pip install ".[hf]"``. With a real checkpoint, only the model and the inputs change
(docs/integrations.md).

    python examples/prune_tiny_llava.py
"""
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import mmrprune.integrations as mi

IMAGE_TOKEN = 63                  # the id the prompt uses for each visual token
vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=64, patch_size=8, projection_dim=32)   # 8 x 8 = 64 patches per image
text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=256,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                     vision_feature_layer=-2, vision_feature_select_strategy="default")
torch.manual_seed(0)
model = LlavaForConditionalGeneration(config).eval()

# What a processor returns for one prompt with one image: the image placeholder expanded to
# one token per patch, and the pixels.
prompt = [1, 5, 6] + [IMAGE_TOKEN] * 64 + [7, 8]
inputs = {"input_ids": torch.tensor([prompt]), "attention_mask": torch.ones(1, len(prompt), dtype=torch.long),
          "pixel_values": torch.randn(1, 3, 64, 64)}

with mi.prune_visual_tokens(model, keep_ratio=0.25, method="mmr", lam=0.5, importance="norm") as p:
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
last = p.last
print(f"prefill {last['orig_len']} -> {last['pruned_len']} tokens; "
      f"visual tokens {last['visual_before']} -> {last['visual_after']}")
print("kept columns of the prompt:", last["kept_columns"][0].tolist())
print("generated ids:", out[0, len(prompt):].tolist())
print("p.last keys:", ",".join(sorted(last)))
assert last["visual_after"] == 16 and last["pruned_len"] == len(prompt) - 48
