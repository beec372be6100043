"""Run the test prompts through a real vLLM engine and print one JSON line with the results.

    python engine_run.py FAMILY MODEL_DIR     (FAMILY: qwen25 | qwen3; the plugin reads MMRPRUNE_VLLM;
                                               ENGINE_ARGS: JSON of extra LLM(...) arguments)

Each case is one ``LLM.generate`` call; per prompt it reports the prompt's token ids, the greedy
output ids and the M-RoPE positions the decoder used for the prompt (when the plugin is on), per
case the selections the plugin made (``recent_selections``).  Every medium has its own grid, so
an item is identified by its modality and grid."""
import json
import os
import sys

from tiny_models import MERGE, PATCH

# name -> merged cells (rows, cols) per frame, and frames (videos)
IMAGES = {"a": (4, 5), "b1": (3, 3), "b2": (4, 4), "c": (5, 6), "d": (3, 4), "e1": (2, 3), "e2": (5, 5),
          "f": (5, 3), "g1": (3, 5), "g2": (6, 2), "h": (2, 5)}
# temporal span (t index up to (frames/2 - 1) * 2 on the test models) within the spatial one: where it
# exceeds it, transformers 5 continues the text after a Qwen2.5-VL video at max(h, w), vLLM at max + 1
VIDEOS = {"v": ((3, 5), 6), "w": ((4, 3), 4)}
FPS = 2.0
LONG_TEXT = "a question about the two pictures that follow, long enough to come before many image tokens: "
# prompt -> (media in order, text after, text before)
PROMPTS = {"a": (["a"], "describe", ""), "b": (["b1", "b2"], "compare", ""), "c": (["c"], "what is it", ""),
           "d": (["d"], "colours?", ""), "e": (["e1", "e2"], "which is larger", ""), "f": (["f"], "tall?", ""),
           "g": (["g1", "g2"], "and now?", LONG_TEXT), "v": (["v"], "what happens", ""),
           "m": (["h", "w"], "image or video?", ""), "a2": (["a"], "describe", "")}
CASES = {"one_image": ["a"], "two_images": ["b"], "batch": ["c", "d", "e", "f"], "long_prefix": ["g"],
         "video": ["v"], "mixed": ["m"], "again": ["a2"]}   # "again": prompt a, from vLLM's prefix cache
MAX_TOKENS = 6
PLACEHOLDER = {"image": "<|vision_start|><|image_pad|><|vision_end|>",
               "video": "<|vision_start|><|video_pad|><|vision_end|>"}


def modality(name):
    return "video" if name in VIDEOS else "image"


def cells(name):
    """(t, h, w) merged grid of a medium: videos merge frame pairs."""
    if name in VIDEOS:
        (h, w), frames = VIDEOS[name]
        return (frames // 2, h, w)
    return (1,) + IMAGES[name]


def tokens(name):
    t, h, w = cells(name)
    return t * h * w


def _pixels(rs, family, hw, frames=None):
    import numpy as np
    side = PATCH[family] * MERGE
    shape = (hw[0] * side, hw[1] * side, 3) if frames is None else (frames, hw[0] * side, hw[1] * side, 3)
    return (rs.rand(*shape) * 255).astype("uint8")


def medium(family, name):
    """A PIL image, or (frames [T, H, W, 3], metadata) for a video: the same pixels for vLLM and HF."""
    import numpy as np
    from PIL import Image
    rs = np.random.RandomState(sorted(IMAGES.keys() | VIDEOS.keys()).index(name))
    if name in IMAGES:
        return Image.fromarray(_pixels(rs, family, IMAGES[name]))
    hw, frames = VIDEOS[name]
    array = _pixels(rs, family, hw, frames)
    return array, {"fps": FPS, "total_num_frames": frames, "frames_indices": list(range(frames)),
                   "duration": frames / FPS, "height": array.shape[1], "width": array.shape[2],
                   "video_backend": "opencv"}


def prompt_text(prompt):
    names, question, before = PROMPTS[prompt]
    return (f"<|im_start|>user\n{before}{''.join(PLACEHOLDER[modality(n)] for n in names)}{question}<|im_end|>\n"
            "<|im_start|>assistant\n")


def multi_modal_data(family, prompt):
    data = {}
    for n in PROMPTS[prompt][0]:
        data.setdefault(modality(n), []).append(medium(family, n))
    return data


def _capture_positions(store, calls):
    """Record the prompt positions the decoder used (each token's from the re-positioning of the
    prefill chunk that computed it, or from an earlier request with the same prompt when vLLM's
    prefix cache served it) and how many prefill chunks brought media rows."""
    from mmrprune.integrations.vllm.common import PruningModel
    original = PruningModel.recompute_mrope_positions

    def recording(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        out = original(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens)
        key = tuple(int(i) for i in input_ids)
        fresh = out[1].tolist()
        store[key] = [old[:num_computed_tokens] + new[num_computed_tokens:]
                      for old, new in zip(store.get(key, fresh), fresh)]
        calls[key] = calls.get(key, 0) + bool(multimodal_embeddings)
        return out
    PruningModel.recompute_mrope_positions = recording


def main(family, model_dir):
    from vllm import LLM, SamplingParams
    positions, calls = {}, {}
    if os.environ.get("MMRPRUNE_VLLM"):
        _capture_positions(positions, calls)
    args = dict(max_model_len=1024, enforce_eager=True, dtype="float32", seed=0, max_num_seqs=4,
                limit_mm_per_prompt={"image": 2, "video": 1}, max_num_batched_tokens=1024, block_size=32,
                gpu_memory_utilization=0.3, kv_cache_memory_bytes=64 << 20)
    llm = LLM(model=model_dir, **{**args, **json.loads(os.environ.get("ENGINE_ARGS", "{}"))})
    loaded_by_vllm = "mmrprune.integrations.vllm" in sys.modules   # through the entry point
    import mmrprune.integrations.vllm as plugin
    config = plugin.active_config()
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    result = {"plugin_on": config is not None, "plugin_loaded_by_vllm": loaded_by_vllm,
              "v2_env": os.environ.get("VLLM_USE_V2_MODEL_RUNNER"), "cases": {}}
    for case, prompts in CASES.items():
        plugin.recent_selections.clear()
        outs = llm.generate([{"prompt": prompt_text(p), "multi_modal_data": multi_modal_data(family, p)}
                             for p in prompts], params)
        result["cases"][case] = {
            "prompts": {p: {"prompt_ids": list(o.prompt_token_ids), "output_ids": list(o.outputs[0].token_ids),
                            "positions": positions.get(tuple(o.prompt_token_ids)),
                            "media_chunks": calls.get(tuple(o.prompt_token_ids)), "cached": o.num_cached_tokens}
                        for p, o in zip(prompts, outs)},
            "selections": list(plugin.recent_selections)}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
