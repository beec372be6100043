"""Prefill cost of a decoder, to relate pruned sequence lengths to compute."""
from __future__ import annotations


def prefill_flops(text_config, seq_len: int) -> int:
    """Matmul FLOPs of one prefill of ``seq_len`` tokens through a Llama/Qwen2-style decoder.

    Per layer: q/k/v/o projections ``2 L h (2 h_q + 2 h_kv)``, gated MLP ``6 L h i``,
    causal attention scores + weighted sum counted dense ``4 L^2 h_q`` (SDPA computes the
    full square); plus the LM head on the last token only is ignored.  ``h_q = heads *
    head_dim``, ``h_kv = kv_heads * head_dim``.  The projection/MLP part is exactly
    proportional to ``seq_len``; attention grows with its square.
    """
    h = text_config.hidden_size
    heads = text_config.num_attention_heads
    kv = getattr(text_config, "num_key_value_heads", None) or heads
    hd = getattr(text_config, "head_dim", None) or h // heads
    hq, hkv = heads * hd, kv * hd
    inter = text_config.intermediate_size
    n = int(seq_len)
    per_layer = 2 * n * h * (2 * hq + 2 * hkv) + 6 * n * h * inter + 4 * n * n * hq
    return int(text_config.num_hidden_layers * per_layer)
