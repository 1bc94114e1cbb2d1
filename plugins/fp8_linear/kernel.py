"""Triton GPU kernel for ``orthrus::fp8_linear`` at decoding sizes (M <= 32 rows).

Two launches: a per-row quantization kernel (absmax -> scale -> e4m3, the reference's arithmetic), then a GEMM whose
programs each own ``BLOCK_N`` output channels for all rows, padded to 32: ``tl.dot`` of e4m3 tiles with float32
accumulation over K in ``BLOCK_K`` steps, then the row and channel scales. The tile configuration depends on N and
K only, never on M, so a row's result is the same bit for bit whether it comes in a 32-row verify block or a 1-row
decode step (batch invariance: the property that keeps an FP8 engine's Orthrus output equal to its own AR output).
"""

import torch
import triton
import triton.language as tl

from orthrus_plugins.fp8_linear import E4M3_MAX, MIN_SCALE

M_PAD = 32


@triton.jit
def _quant_kernel(X, XQ, XS, K, stride_x, stride_q, QMAX: tl.constexpr, SMIN: tl.constexpr,
                  BLOCK: tl.constexpr):
    row = tl.program_id(0)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(X + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0) / QMAX, SMIN)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(X + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -QMAX), QMAX)
        tl.store(XQ + row * stride_q + offs, q.to(tl.float8e4nv), mask=offs < K)
    tl.store(XS + row, scale)


@triton.jit
def _gemm_kernel(XQ, XS, W, WS, O, P, M, N, K, K_PER_SPLIT, stride_q, stride_w, stride_o,
                 M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, M_PAD)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = split * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(XQ + offs_m[:, None] * stride_q + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_end), other=0.0)
        b = tl.load(W + offs_n[None, :] * stride_w + offs_k[:, None],
                    mask=(offs_n[None, :] < N) & (offs_k[:, None] < k_end), other=0.0)
        acc = tl.dot(a, b, acc)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        xs = tl.load(XS + offs_m, mask=offs_m < M, other=0.0)
        ws = tl.load(WS + offs_n, mask=offs_n < N, other=0.0)
        out = acc * xs[:, None] * ws[None, :]
        tl.store(O + offs_m[:, None] * stride_o + offs_n[None, :], out.to(O.dtype.element_ty), mask=mask)
    else:  # float32 partial sums of this key slice; _reduce_kernel adds the slices in a fixed order
        tl.store(P + (split * M_PAD + offs_m[:, None]) * N + offs_n[None, :], acc, mask=mask)


@triton.jit
def _reduce_kernel(P, XS, WS, O, M, N, stride_o, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                   SPLIT_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, M_PAD)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    for sp in range(SPLIT_K):
        acc += tl.load(P + (sp * M_PAD + offs_m[:, None]) * N + offs_n[None, :], mask=mask, other=0.0)
    xs = tl.load(XS + offs_m, mask=offs_m < M, other=0.0)
    ws = tl.load(WS + offs_n, mask=offs_n < N, other=0.0)
    tl.store(O + offs_m[:, None] * stride_o + offs_n[None, :], (acc * xs[:, None] * ws[None, :]).to(O.dtype.element_ty),
             mask=mask)


def config(n: int, k: int, sms: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT_K) for an [N, K] weight: about two programs per SM, splitting K when N alone gives
    too few. A function of N, K and the GPU only — never of M — which is what keeps rows batch-invariant."""
    block_n, block_k = 64, 128
    blocks = triton.cdiv(n, block_n)
    split = max(1, min(triton.cdiv(2 * sms, blocks), triton.cdiv(k, 4 * block_k)))
    return block_n, block_k, split


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0]
    if m > M_PAD:
        from orthrus_plugins.fp8_linear import scaled_mm
        return scaled_mm(x, weight, weight_scale)
    x = x.contiguous()
    xq = torch.empty(m, k, device=x.device, dtype=torch.float8_e4m3fn)
    xs = torch.empty(m, device=x.device, dtype=torch.float32)
    _quant_kernel[(m,)](x, xq, xs, k, x.stride(0), xq.stride(0), QMAX=E4M3_MAX, SMIN=MIN_SCALE, BLOCK=1024,
                        num_warps=4)
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 132
    block_n, block_k, split = config(n, k, sms)
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    partial = torch.empty(split, M_PAD, n, device=x.device, dtype=torch.float32) if split > 1 else out
    ws = weight_scale.float()
    grid = (triton.cdiv(n, block_n), split)
    _gemm_kernel[grid](xq, xs, weight, ws, out, partial, m, n, k, k_per_split, xq.stride(0), weight.stride(0),
                       out.stride(0), M_PAD=M_PAD, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=4,
                       num_stages=4)
    if split > 1:
        _reduce_kernel[(triton.cdiv(n, block_n),)](partial, xs, ws, out, m, n, out.stride(0), M_PAD=M_PAD,
                                                   BLOCK_N=block_n, SPLIT_K=split, num_warps=4)
    return out
