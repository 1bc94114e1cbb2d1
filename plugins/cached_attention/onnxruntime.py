"""ONNX Runtime implementation of the ``CachedAttention`` node (``onnx.py``): the op's reference implementation
on one layer's caches, float32 — the arithmetic the CPU engine runs. :func:`register` makes it an
onnxruntime-extensions Python custom op (called by ``orthrus_runtime.onnx_backend``)."""

import torch
from onnxruntime_extensions import onnx_op

from orthrus_plugins.attention_common.onnxruntime import ATTRS, FLOAT, INPUTS, layer_cache
from orthrus_plugins.cached_attention import cached_attention


def compute(q, k, v, k_cache, v_cache, cache_len, layer=0, scale=1.0):
    """``(out, k_cache_out, v_cache_out)``; ``layer`` names the graph's layer, the caches given are that layer's."""
    kc, vc = layer_cache(k_cache), layer_cache(v_cache)
    out = cached_attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), kc, vc,
                           torch.tensor(int(cache_len)), 0, float(scale))
    return out.numpy(), kc[0].numpy(), vc[0].numpy()


def register() -> None:
    onnx_op(op_type="CachedAttention", inputs=INPUTS, outputs=[FLOAT, FLOAT, FLOAT], attrs=ATTRS)(compute)
