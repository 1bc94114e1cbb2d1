"""ONNX translation of ``orthrus::cached_attention`` (contract in the op's docstring), called by
``orthrus_export.onnx_export`` for its fx target.

An ``orthrus``-domain ``CachedAttention`` node — inputs ``q, k, v``, the layer's caches ``[Hkv, C, D]`` and
``cache_len``; outputs ``out`` and the layer's updated caches; attributes ``layer``, ``scale`` — or, decomposed,
standard ops: ScatterND writes the block's K/V at positions ``cache_len … cache_len+B-1`` of every head, then causal
masked attention over the whole static capacity. Either way, later nodes and the graph's outputs see the written
caches.
"""

import torch

from orthrus_plugins.attention_common.onnx import masked_attention, operands

TARGET = "orthrus.cached_attention.default"


def convert(cx, node) -> str:
    qn, kn, vn, k_in, v_in, layer, scale = operands(cx, node)
    q, cache = node.args[0].meta["val"], node.args[3].meta["val"]
    g = cx.g
    if not cx.decompose:
        out, k_new, v_new = g.op("CachedAttention", [qn, kn, vn, k_in, v_in, "cache_len"], n_out=3,
                                 domain=cx.domain, layer=layer, scale=scale)
        for name in (k_new, v_new):
            cx.declare(name, cache.dtype, cache.shape[1:])
        cx.declare(out, q.dtype, q.shape)
    else:
        b, hkv, cap = q.shape[0], cache.shape[1], cache.shape[2]
        pos = g.op("Add", ["cache_len", g.const(list(range(b)), torch.int64, "block")])  # [B]
        # write the block's K/V at rows pos of every head: indices [Hkv, B, 2] = (head, position)
        heads = g.op("Expand", [g.const([[[h]] for h in range(hkv)], torch.int64, "heads"), cx.ints([hkv, b, 1])])
        rows = g.op("Expand", [g.op("Reshape", [pos, cx.ints([1, b, 1])]), cx.ints([hkv, b, 1])])
        idx = g.op("Concat", [heads, rows], axis=2)
        k_new = g.op("ScatterND", [k_in, idx, g.op("Transpose", [kn], perm=[1, 0, 2])])
        v_new = g.op("ScatterND", [v_in, idx, g.op("Transpose", [vn], perm=[1, 0, 2])])
        keys_pos = g.const(list(range(cap)), torch.int64, "cache_pos")  # [C]
        mask = g.op("LessOrEqual", [g.op("Reshape", [keys_pos, cx.ints([1, cap])]),
                                    g.op("Reshape", [pos, cx.ints([b, 1])])])  # [B, C]: query i sees cache_len + i
        out = masked_attention(cx, node, k_new, v_new, mask)
    cx.k_layer[layer], cx.v_layer[layer] = k_new, v_new
    cx.writes_cache = True
    return out
