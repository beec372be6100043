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


# ---------------------------------------------------------------- downstream (mmrprune/bench/downstream.py)
DOWNSTREAM_FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
DOWNSTREAM_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field",
                     "immunohistochemistry", "retina", "camera", "coins", "moon", "brick", "grass", "gravel",
                     "clock")
# the names of downstream.default_methods(), in its order (tests/test_downstream.py checks they agree)
DOWNSTREAM_METHODS = ("topk", "mmr-0.2", "mmr-0.5", "mmr-0.8", "divprune", "fps", "hybrid", "dpp", "d2pruner",
                      "random", "grid")
DOWNSTREAM_QUICK = {"test_images": 24, "layers": (6,), "budgets": (32,), "photos": DOWNSTREAM_PHOTOS[:3], "batch": 24}


def add_downstream_arguments(p) -> None:
    """The ``downstream`` subcommand's flags (mmrprune/bench/downstream.py runs it)."""
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run: {DOWNSTREAM_QUICK['test_images']} test images, P=6, k=32, "
                        f"{len(DOWNSTREAM_QUICK['photos'])} photos (the tests use it); writes files only with --out-dir")
    p.add_argument("--test-images", type=int, help="Fashion-MNIST test images (default 1000, --quick 24)")
    p.add_argument("--layers", help="comma list of pruning layers P in 1..11 (default 3,6,9)")
    p.add_argument("--budgets", help="comma list of kept patches k in 1..256 (default 64,32,16)")
    p.add_argument("--methods", help="comma list of method names (default all: "
                                     + ",".join(DOWNSTREAM_METHODS) + ")")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="matmul dtype of the model (default bfloat16, about 2x faster on CPU than float32)")
    p.add_argument("--batch", type=int, help="images per forward (default 50)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--fmnist-dir", help=f"folder of the Fashion-MNIST *-ubyte.gz files (default {DOWNSTREAM_FMNIST_DIR} "
                                        "or $MMRPRUNE_FMNIST_DIR)")
    p.add_argument("--no-photos", action="store_true", help="skip the photo task")
    p.add_argument("--out-dir", help="writes downstream.json and downstream.csv here (default: a new folder "
                                     "bench-out/downstream-<date>-<time>, so no run overwrites an earlier one or "
                                     "the committed results)")
    p.add_argument("--plot", help="accuracy-retained figure (default OUT_DIR/downstream.png)")
    p.add_argument("--update-committed", action="store_true",
                   help="regenerate the committed results: --out-dir bench/results --plot "
                        "bench/figures/downstream.png (a full run, from the repository root)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
