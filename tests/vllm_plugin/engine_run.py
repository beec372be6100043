"""Run the test prompts through a real vLLM engine and print one JSON line with the results.

    python engine_run.py MODEL_DIR        (configure the plugin with MMRPRUNE_VLLM)

Each case is one ``LLM.generate`` call; per prompt it reports the prompt's token ids and the
greedy output ids, and per case the selections the plugin made (``recent_selections``).
Every image of every case has a different size, so an image is identified by its token count."""
import json
import sys

PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
# (height, width) in pixels -> (h/14 * w/14) / 4 visual tokens after the 2x2 merge
IMAGES = {"a": (112, 140), "b1": (84, 84), "b2": (112, 112), "c": (140, 168), "d": (84, 112),
          "e1": (56, 84), "e2": (140, 140)}
TOKENS = {name: (h // 14) * (w // 14) // 4 for name, (h, w) in IMAGES.items()}
PROMPTS = {"a": (["a"], "describe"), "b": (["b1", "b2"], "compare"), "c": (["c"], "what is it"),
           "d": (["d"], "colours?"), "e": (["e1", "e2"], "which is larger")}
CASES = {"one_image": ["a"], "two_images": ["b"], "batch": ["c", "d", "e"]}
MAX_TOKENS = 6


def image(name):
    import numpy as np
    from PIL import Image
    h, w = IMAGES[name]
    rs = np.random.RandomState(sorted(IMAGES).index(name))
    return Image.fromarray((rs.rand(h, w, 3) * 255).astype("uint8"))


def prompt_text(prompt):
    names, question = PROMPTS[prompt]
    return f"<|im_start|>user\n{PLACEHOLDER * len(names)}{question}<|im_end|>\n<|im_start|>assistant\n"


def main(model_dir):
    from vllm import LLM, SamplingParams
    llm = LLM(model=model_dir, max_model_len=1024, enforce_eager=True, dtype="float32", seed=0,
              limit_mm_per_prompt={"image": 2, "video": 0}, max_num_seqs=4, max_num_batched_tokens=1024,
              gpu_memory_utilization=0.3)
    loaded_by_vllm = "mmrprune.integrations.vllm" in sys.modules   # through the entry point
    import mmrprune.integrations.vllm as plugin
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    result = {"plugin_config": None if plugin.active_config() is None else vars(plugin.active_config()),
              "plugin_loaded_by_vllm": loaded_by_vllm, "cases": {}}
    for case, prompts in CASES.items():
        plugin.recent_selections.clear()
        outs = llm.generate([{"prompt": prompt_text(p), "multi_modal_data": {"image": [image(n) for n in PROMPTS[p][0]]}}
                             for p in prompts], params)
        result["cases"][case] = {
            "prompts": {p: {"prompt_ids": list(o.prompt_token_ids), "output_ids": list(o.outputs[0].token_ids)}
                        for p, o in zip(prompts, outs)},
            "selections": list(plugin.recent_selections)}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
