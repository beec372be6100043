"""Presets and sweep defaults of the bench CLI.

Kept free of torch (and of everything that imports it) so that ``mmrprune-bench
--help`` and argument errors need no torch import; :mod:`.speed` and
:mod:`.quality` take their constants from here.
"""
PRESETS = {
    # name: (default batch, tokens, dim, source, what it stands for)
    "llava": (8, 576, 4096, "random", "LLaVA-1.5: 24x24 CLIP patches into a 4096-d LLM"),
    "qwen1080p": (4, 2691, 3584, "random", "Qwen2-VL-7B, one 1080p frame (39x69 merged patches)"),
    "video": (1, 16384, 3584, "random", "a long video: 16k visual tokens, 3584-d"),
    "dinov2": (8, 1024, 384, "dinov2", "real DINOv2 ViT-S/14 tokens of 8 photos at 448 px (mmrprune.data)"),
}
DINOV2_IMAGES = 8
# row-major patch grid (rows, cols) of each preset's tokens, for d2pruner's spatial term
PRESET_GRIDS = {"llava": (24, 24), "qwen1080p": (39, 69), "video": (128, 128), "dinov2": (32, 32)}
DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")
BACKEND_NAMES = ("cuda", "triton", "cpu", "torch", "numpy", "anchor")

# quality sweep
MMR_LAMS = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0)
# hybrid's pool is c = N for lam <= k/N (= 0.25 at 25% kept) and c = k at lam = 1
HYBRID_LAMS = (0.2, 0.25, 0.26, 0.275, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SINGLE_METHODS = ("topk", "fps", "divprune", "dpp")
