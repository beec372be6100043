"""Time the HF integration's self-check (mmrprune/integrations/hf/selfcheck.py) on each
family's default transformers config (the full-size config of the model type: real vocabulary,
token ids, rope settings), i.e. what a user's model on a release past the tested window costs
at enable time.  No weights are loaded: the check only reads the model's class and config.

    python bench/hf_selfcheck_time.py            # one line per family: seconds (median of 3)
"""
import statistics
import time

import torch
import transformers

from mmrprune.integrations.hf import core, selfcheck
from mmrprune.integrations.hf.families import family_of

CASES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
         "llava_onevision": "LlavaOnevisionForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration",
         "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
         "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration", "gemma3": "Gemma3ForConditionalGeneration",
         "internvl": "InternVLForConditionalGeneration"}


def enable(tiny, **options):
    return core._enable(tiny, 1, **{**core._DEFAULTS, **options, "_release_checked": True})


def main():
    print(f"transformers {transformers.__version__}, torch threads {torch.get_num_threads()}")
    for model_type, cls_name in CASES.items():
        cls = getattr(transformers, cls_name)
        user = cls.__new__(cls)                               # class and config only, no weights
        object.__setattr__(user, "config", transformers.CONFIG_MAPPING[model_type]())
        fam = family_of(user)
        times = []
        for _ in range(3):
            selfcheck._PASSED.clear()
            start = time.perf_counter()
            try:
                selfcheck.verify(user, fam, "99.0.0", enable)
                what = ""
            except RuntimeError as exc:                     # the refusal verify() would give
                what = str(exc)[:300]
            times.append(time.perf_counter() - start)
        print(f"{model_type:16s} {statistics.median(times):.2f} s (max {max(times):.2f})  "
              f"{'pass' if not what else what}")


if __name__ == "__main__":
    main()
