"""ONNX translation of ``orthrus::diffusion_attention`` (contract in the op's docstring), called by
``orthrus_export.onnx_export`` for its fx target.

An ``orthrus``-domain ``DiffusionAttention`` node — inputs ``q, k, v``, the layer's caches ``[Hkv, C, D]`` and
``cache_len``; output ``out``; attributes ``layer``, ``scale`` — or, decomposed, standard ops: the block's K/V are
appended to the layer's whole static cache and the mask keeps cache positions ``< cache_len`` and every block key.
The caches are only read.
"""

import torch

from orthrus_plugins.attention_common.onnx import masked_attention, operands

TARGET = "orthrus.diffusion_attention.default"


def convert(cx, node) -> str:
    qn, kn, vn, k_in, v_in, layer, scale = operands(cx, node)
    q, cache = node.args[0].meta["val"], node.args[3].meta["val"]
    g = cx.g
    if not cx.decompose:
        out = g.op("DiffusionAttention", [qn, kn, vn, k_in, v_in, "cache_len"], domain=cx.domain, layer=layer,
                   scale=scale)
        cx.declare(out, q.dtype, q.shape)
        return out
    b, cap = q.shape[0], cache.shape[2]
    keys = g.op("Concat", [k_in, g.op("Transpose", [kn], perm=[1, 0, 2])], axis=1)  # [Hkv, C+B, D]
    values = g.op("Concat", [v_in, g.op("Transpose", [vn], perm=[1, 0, 2])], axis=1)
    valid = g.op("Less", [g.const(list(range(cap)), torch.int64, "cache_pos"), "cache_len"])  # [C]
    mask = g.op("Concat", [valid, g.const([True] * b, torch.bool, "block_keys")], axis=0)
    mask = g.op("Reshape", [mask, cx.ints([1, cap + b])])
    return masked_attention(cx, node, keys, values, mask)
