"""The same prompts through transformers + mmrprune.integrations.hf (the reference for the plugin)."""
import torch

from engine_run import CASES, MAX_TOKENS, PROMPTS, image, prompt_text


def run(model_dir, **prune):
    """Per prompt: prompt ids, greedy output ids and (if ``prune``) each image's kept local indices."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    import mmrprune.integrations as mi
    proc = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {}
    for prompts in CASES.values():
        for p in prompts:              # one prompt per call: no padding in the reference
            names = PROMPTS[p][0]
            inputs = proc(text=[prompt_text(p)], images=[image(n) for n in names], return_tensors="pt")
            n_in = inputs["input_ids"].shape[1]
            kept = None
            with torch.no_grad():
                if prune:
                    with mi.prune_visual_tokens(model, **prune) as pruner:
                        gen = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
                    last = pruner.last
                    idx, cu, cu_k = last["kept_indices"], last["cu_seqlens"], last["cu_k"]
                    kept = {names[b]: (idx[cu_k[b]:cu_k[b + 1]] - cu[b]).tolist() for b in range(len(names))}
                else:
                    gen = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
            out[p] = {"prompt_ids": inputs["input_ids"][0].tolist(), "output_ids": gen[0, n_in:].tolist(),
                      "kept": kept}
    return out
