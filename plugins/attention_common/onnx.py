"""The ONNX translation the attention ops share: their operands and, for decomposed graphs, masked attention in
standard ops. ``cx`` is the converter of ``orthrus_export.onnx_export`` (its docstring lists what it offers)."""

import torch


def operands(cx, node) -> tuple:
    """``(q, k, v, k_cache, v_cache, layer, scale)``: the ONNX values of the block's projections and of the layer's
    current caches (``[Hkv, C, D]``), and the attributes. The op must read the program's own cache and length."""
    q, k, v, kc, vc, cache_len, layer, scale = node.args
    if cx.env[kc] != "k_cache" or cx.env[vc] != "v_cache" or cx.env[cache_len] != "cache_len":
        cx.fail("attention ops must read the program's cache and length inputs")
    layer = int(layer)
    return cx.val(q), cx.val(k), cx.val(v), cx.k_layer[layer], cx.v_layer[layer], layer, float(scale)


def masked_attention(cx, node, keys: str, values: str, mask: str) -> str:
    """``softmax(q·kᵀ·scale where mask) · v`` in float32, in standard ops, for the attention op ``node``.

    keys, values: ``[Hkv, S, D]``; mask: bool, broadcast to ``[B, S]`` (True = may attend). Returns ``[B, Hq, D]``
    in q's dtype: the arithmetic of :func:`orthrus_plugins.attention_common.attend`."""
    q, scale = node.args[0], float(node.args[7])
    b, hq, d = q.meta["val"].shape
    hkv = node.args[3].meta["val"].shape[1]
    g, f32 = cx.g, cx.onnx_dtype(torch.float32)
    qf = g.op("Transpose", [g.op("Reshape", [g.op("Cast", [cx.val(q)], to=f32), cx.ints([b, hkv, hq // hkv, d])])],
              perm=[1, 2, 0, 3])  # [Hkv, G, B, D]
    kt = g.op("Unsqueeze", [g.op("Transpose", [g.op("Cast", [keys], to=f32)], perm=[0, 2, 1]),
                            cx.ints([1], "axes")])  # [Hkv, 1, D, S]
    scores = g.op("Mul", [g.op("MatMul", [qf, kt]), g.const(scale, torch.float32, "scale")])
    scores = g.op("Where", [mask, scores, g.const(float("-inf"), torch.float32, "neg_inf")])
    probs = g.op("Softmax", [scores], axis=-1)
    vf = g.op("Unsqueeze", [g.op("Cast", [values], to=f32), cx.ints([1], "axes")])  # [Hkv, 1, S, D]
    out = g.op("Transpose", [g.op("MatMul", [probs, vf])], perm=[2, 0, 1, 3])  # [B, Hkv, G, D]
    out = g.op("Reshape", [out, cx.ints([b, hq, d])])
    return g.op("Cast", [out], to=cx.onnx_dtype(q.meta["val"].dtype))
