"""ONNX translation of ``orthrus::qk_norm_rope`` (contract in the op's docstring), called by
``orthrus_export.onnx_export`` for its fx target: standard ops in either export mode — the same ops, in the same
order and dtypes, that the engines' forward exported when it spelled the norm and the rotation inline (Slice,
Reshape, Cast, Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Neg, Concat)."""

import torch

TARGET = "orthrus.qk_norm_rope.default"


def convert(cx, node) -> list[str]:
    qkv, q_weight, k_weight, cos, sin, num_heads, num_kv_heads, eps = node.args
    x_meta = qkv.meta["val"]
    n, d, dtype = x_meta.shape[0], q_weight.meta["val"].shape[0], x_meta.dtype
    g, f32 = cx.g, cx.onnx_dtype(torch.float32)
    outs = []
    for first, heads, weight in ((0, int(num_heads), q_weight), (int(num_heads), int(num_kv_heads), k_weight)):
        x = g.op("Slice", [cx.val(qkv), cx.ints([first * d], "starts"), cx.ints([(first + heads) * d], "ends"),
                           cx.ints([1], "axes")])
        x = g.op("Reshape", [x, cx.ints([n, heads, d])])
        xf = x if dtype == torch.float32 else g.op("Cast", [x], to=f32)
        mean = g.op("ReduceMean", [g.op("Pow", [xf, g.const(2.0, torch.float32)]), cx.ints([-1], "axes")], keepdims=1)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [mean, g.const(float(eps), torch.float32)])])])
        xn = g.op("Mul", [xf, inv])
        xn = xn if dtype == torch.float32 else g.op("Cast", [xn], to=cx.onnx_dtype(dtype))
        y = g.op("Mul", [cx.val(weight), xn])
        lo = g.op("Slice", [y, cx.ints([0], "starts"), cx.ints([d // 2], "ends"), cx.ints([-1], "axes")])
        hi = g.op("Slice", [y, cx.ints([d // 2], "starts"), cx.ints([d], "ends"), cx.ints([-1], "axes")])
        rotated = g.op("Concat", [g.op("Neg", [hi]), lo], axis=-1)
        outs.append(g.op("Add", [g.op("Mul", [y, cx.val(cos)]), g.op("Mul", [rotated, cx.val(sin)])]))
    return outs
