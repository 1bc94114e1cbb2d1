"""Triton GPU kernel for ``orthrus::qk_norm_rope``: one program per token and head (the query heads, then the key
heads, one launch), the head's D values in registers as two halves.

The reference's arithmetic in the reference's order of roundings: the sum of squares and the reciprocal square root
in float32, the normalized row rounded to the dtype, the weight product rounded, then the rotation's two products
and their sum, each rounded (eager torch rounds every bf16/fp16 op's result). The sum of squares is a tree over the
row fixed by D alone, so a row's result is the same bit for bit whatever N is — a decode step and a verify block run
one binary (the token count is a run-time argument). Not bitwise equal to eager torch on the GPU (its reduction
order and ``rsqrt`` differ in the last bit), which the contract does not ask.
"""

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["N"])
def _qk_norm_rope_kernel(QKV, QW, KW, COS, SIN, QO, KO, N, s_qkv, s_cos, s_sin, eps,
                         HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)                 # 0 … HQ-1: query heads; HQ … HQ+HKV-1: key heads
    half = tl.arange(0, D // 2)
    row = QKV + t.to(tl.int64) * s_qkv + h * D
    a = tl.load(row + half)              # the first half of the head
    b = tl.load(row + D // 2 + half)     # the second half
    dt = a.dtype
    af, bf = a.to(tl.float32), b.to(tl.float32)
    r = tl.math.rsqrt((tl.sum(af * af, 0) + tl.sum(bf * bf, 0)) / D + eps)
    if h < HQ:
        wp = QW
        out = QO + (t.to(tl.int64) * HQ + h) * D
    else:
        wp = KW
        out = KO + (t.to(tl.int64) * HKV + h - HQ) * D
    ya = (tl.load(wp + half).to(tl.float32) * (af * r).to(dt).to(tl.float32)).to(dt)
    yb = (tl.load(wp + D // 2 + half).to(tl.float32) * (bf * r).to(dt).to(tl.float32)).to(dt)
    ca = tl.load(COS + t * s_cos + half).to(tl.float32)
    cb = tl.load(COS + t * s_cos + D // 2 + half).to(tl.float32)
    sa = tl.load(SIN + t * s_sin + half).to(tl.float32)
    sb = tl.load(SIN + t * s_sin + D // 2 + half).to(tl.float32)
    # y·cos + [-y_b, y_a]·sin, every product and the sum rounded to the dtype
    oa = ((ya.to(tl.float32) * ca).to(dt).to(tl.float32) + (-yb.to(tl.float32) * sa).to(dt).to(tl.float32)).to(dt)
    ob = ((yb.to(tl.float32) * cb).to(dt).to(tl.float32) + (ya.to(tl.float32) * sb).to(dt).to(tl.float32)).to(dt)
    tl.store(out + half, oa)
    tl.store(out + D // 2 + half, ob)


def qk_norm_rope(qkv, q_weight, k_weight, cos, sin, num_heads: int, num_kv_heads: int, eps: float):
    """The op's CUDA implementation (shapes checked by the op)."""
    n = qkv.shape[0]
    d = q_weight.shape[0]
    q = torch.empty(n, num_heads, d, device=qkv.device, dtype=qkv.dtype)
    k = torch.empty(n, num_kv_heads, d, device=qkv.device, dtype=qkv.dtype)
    if n == 0:
        return q, k
    qkv = qkv if qkv.stride(1) == 1 else qkv.contiguous()
    cos, sin = (t if t.stride(2) == 1 else t.contiguous() for t in (cos, sin))
    _qk_norm_rope_kernel[(n, num_heads + num_kv_heads)](
        qkv, q_weight.contiguous(), k_weight.contiguous(), cos, sin, q, k, n, qkv.stride(0), cos.stride(0),
        sin.stride(0), eps, HQ=num_heads, HKV=num_kv_heads, D=d, num_warps=1 if d <= 128 else 2,
        enable_fp_fusion=False)  # no a·b + c contracted to one rounding: torch rounds the products and the sum
    return q, k
