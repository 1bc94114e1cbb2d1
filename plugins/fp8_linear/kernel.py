"""Triton GPU kernels for ``orthrus::fp8_linear`` and ``orthrus::fp8_matmul`` at decoding sizes (M = 32 rows a
sequence, any number of rows).

Two launches, three with a split K: a per-row quantization kernel (absmax -> scale -> e4m3, the reference's
arithmetic; ``fp8_linear`` only — in compiled programs Inductor fuses the quantization into x's producer and calls
``fp8_matmul``), then a GEMM over tiles of ``m_tile`` (32) rows: each program owns ``block_n`` output channels of one
row tile and one slice of K, ``tl.dot`` of e4m3 tiles with float32 accumulation over the slice in ``block_k`` steps,
then the row and channel scales; with ``split_k`` > 1 the slices' float32 partial sums are added in a fixed order by
a third kernel. ``swap`` puts the weight tile on the MMA's M side (``[block_n, block_k] x [block_k, 32]``), so a
64- or 128-channel weight tile can use Hopper's warpgroup MMA where a 32-row activation tile cannot.

Batch invariance: an output element's arithmetic — its K loop (``block_k`` steps, ``split_k`` slices, in order)
and the e4m3 MMAs of each step — is a function of N, K and the GPU only (:func:`config`), never of M; M is not
specialized either (Triton's JIT would otherwise compile M = 1, M divisible by 16 and other M as three programs —
``scripts/kernel_report.py`` counts them). What does depend on M, from ``WIDE_ROWS`` rows (batched passes), is which
program computes an element: 64- or 128-row tiles, and from 256 rows at wide projections 128-channel weight tiles
on 8 warps (:func:`wide_config`) — the same K loop over larger tiles. So a row's result is the same bit for bit
whether it comes in a 32-row verify block, a 1-row decode step or a 256-row batched pass (the property that keeps
an FP8 engine's Orthrus output equal to its own AR output; on the H100 every wide tiling's rows equalled the 32-row
tiling's at all four 8B projections, ``benchmarks/h100-2026-12-07-linear-wide-rows-8b.json``, and the GPU tests
compare each row alone with its row in 130- and 256-row calls). The same GEMM without scales runs bf16/fp16
operands (``linear``), for benchmarks against cuBLAS (``scripts/sweep_linear.py``).
"""

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from orthrus_plugins.fp8_linear import E4M3_MAX, MIN_SCALE

M_TILE = 32
WIDE_ROWS = 128  # calls of at least this many rows (batched passes: 4+ rows of 32-token blocks) take wide_config
SHARED_BUDGET = 220 * 1024  # of a Hopper CTA's 227 KB: a tiling's pipeline stages must fit (the rest: Triton's own)


@dataclass(frozen=True)
class Config:
    """How the GEMM is tiled (every choice computes the same function, each with its own summation order)."""
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    swap: bool = False      # weight tile as the MMA's M operand
    num_warps: int = 4
    num_stages: int = 4
    m_tile: int = M_TILE    # rows a program owns (32; 64 or 128 from WIDE_ROWS rows, :func:`wide_config`)
    tma: bool = False       # tiles loaded by Hopper's tensor memory accelerator (no K split, swap only)

    def __post_init__(self):
        for v in (self.block_n, self.block_k, self.num_warps, self.m_tile):
            if v & (v - 1) or v <= 0:
                raise ValueError(f"fp8_linear config sizes must be powers of two, got {self}")
        if (self.split_k < 1 or self.num_stages < 1 or self.block_k < 32 or self.block_n < 16
                or not 16 <= self.m_tile <= 256 or self.tma and (self.split_k > 1 or not self.swap)):
            raise ValueError(f"fp8_linear config out of range: {self}")


@triton.jit
def _quant_kernel(X, XQ, XS, stride_x, stride_q, K: tl.constexpr, QMAX: tl.constexpr, SMIN: tl.constexpr,
                  BLOCK: tl.constexpr):
    row = tl.program_id(0)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(X + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0) * (1.0 / QMAX), SMIN)  # quantize_rows's product with the reciprocal
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(X + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -QMAX), QMAX)
        tl.store(XQ + row * stride_q + offs, q.to(tl.float8e4nv), mask=offs < K)
    tl.store(XS + row, scale)


@triton.jit
def _store_output(acc, XS, WS, O, om, on, M, N, stride_o, SCALED: tl.constexpr):
    """The unsplit GEMMs' epilogue: ``acc`` (times the row scales ``XS[om]`` and channel scales ``WS[on]`` when
    ``SCALED``) cast to O's dtype and stored at ``O[om, on]`` (``om``, ``on`` broadcastable index tiles)."""
    out = acc
    if SCALED:
        out = out * tl.load(XS + om, mask=om < M, other=0.0) * tl.load(WS + on, mask=on < N, other=0.0)
    tl.store(O + om * stride_o + on, out.to(O.dtype.element_ty), mask=(om < M) & (on < N))


@triton.jit(do_not_specialize=["M"])  # the row count a run-time value: one binary for every M (see below)
def _gemm_kernel(XQ, XS, W, WS, O, P, M, N, K, M_ALL, stride_q, stride_w, stride_o, K_PER_SPLIT: tl.constexpr,
                 M_TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                 SWAP: tl.constexpr, SCALED: tl.constexpr, EVEN: tl.constexpr):
    pid_m = tl.program_id(0)  # row tiles vary fastest: the programs reading one weight tile run together (L2)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * M_TILE + tl.arange(0, M_TILE)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = split * K_PER_SPLIT
    offs_kk = tl.arange(0, BLOCK_K)
    a_ptr = XQ + offs_m[:, None] * stride_q + k_start + offs_kk[None, :]
    w_ptr = W + offs_n[:, None] * stride_w + k_start + offs_kk[None, :]
    if SWAP:
        acc = tl.zeros((BLOCK_N, M_TILE), dtype=tl.float32)
    else:
        acc = tl.zeros((M_TILE, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        if EVEN:  # N % BLOCK_N == 0 and K a whole number of slices, each a whole number of BLOCK_K steps
            a = tl.load(a_ptr + k0, mask=offs_m[:, None] < M, other=0.0)
            w = tl.load(w_ptr + k0)
        else:
            kok = (k_start + k0 + offs_kk) < K
            a = tl.load(a_ptr + k0, mask=(offs_m[:, None] < M) & kok[None, :], other=0.0)
            w = tl.load(w_ptr + k0, mask=(offs_n[:, None] < N) & kok[None, :], other=0.0)
        if SWAP:
            acc = tl.dot(w, tl.trans(a), acc)
        else:
            acc = tl.dot(a, tl.trans(w), acc)
    if SWAP:  # acc[n, m]
        om = offs_m[None, :]
        on = offs_n[:, None]
    else:
        om = offs_m[:, None]
        on = offs_n[None, :]
    if SPLIT_K == 1:
        _store_output(acc, XS, WS, O, om, on, M, N, stride_o, SCALED)
    else:  # float32 partial sums of this K slice; _reduce_kernel adds the slices in a fixed order
        tl.store(P + (split * M_ALL + om) * N + on, acc, mask=(om < M) & (on < N))


@triton.jit(do_not_specialize=["M"])
def _gemm_tma_kernel(X_DESC, XS, W_DESC, WS, O, M, N, K, stride_o, M_TILE: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, SCALED: tl.constexpr):
    """``_gemm_kernel``'s unsplit, swapped tiling with both tiles loaded by TMA (host-built descriptors; rows and K
    past the tensors' ends arrive as zeros, so no masks): the same tiles, the same K order, the same MMAs."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    acc = tl.zeros((BLOCK_N, M_TILE), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = X_DESC.load([pid_m * M_TILE, k0])
        w = W_DESC.load([pid_n * BLOCK_N, k0])
        acc = tl.dot(w, tl.trans(a), acc)
    om = (pid_m * M_TILE + tl.arange(0, M_TILE))[None, :]
    on = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[:, None]
    _store_output(acc, XS, WS, O, om, on, M, N, stride_o, SCALED)


@triton.jit(do_not_specialize=["M"])
def _reduce_kernel(P, XS, WS, O, M, N, M_ALL, stride_o, M_TILE: tl.constexpr, BLOCK_N: tl.constexpr,
                   SPLIT_K: tl.constexpr, SCALED: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = tl.program_id(1) * M_TILE + tl.arange(0, M_TILE)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    acc = tl.zeros((M_TILE, BLOCK_N), dtype=tl.float32)
    for sp in range(SPLIT_K):
        acc += tl.load(P + (sp * M_ALL + offs_m[:, None]) * N + offs_n[None, :], mask=mask, other=0.0)
    if SCALED:
        acc = acc * tl.load(XS + offs_m, mask=offs_m < M, other=0.0)[:, None]
        acc = acc * tl.load(WS + offs_n, mask=offs_n < N, other=0.0)[None, :]
    tl.store(O + offs_m[:, None] * stride_o + offs_n[None, :], acc.to(O.dtype.element_ty), mask=mask)


def split_for(tiles: int, steps: int, programs: int) -> int:
    """The fewest K slices, a divisor of the ``steps`` K steps (so every slice is whole), that give ``tiles`` output
    tiles at least ``programs`` programs; ``steps`` when none does."""
    return next((d for d in range(1, steps + 1) if steps % d == 0 and tiles * d >= programs), steps)


def config(n: int, k: int, sms: int, m: int = 1) -> Config:
    """The GEMM's tiling for an [N, K] weight and M rows: 64-channel weight tiles on the MMA's M side, 256-wide K
    steps six deep, K split only when N gives fewer than 48 tiles (then into the fewest slices that give 64
    programs); from ``WIDE_ROWS`` rows, the same K loop over wider tiles (:func:`wide_config`). The K loop is a
    function of N, K and the GPU only — never of M — which is what keeps rows batch-invariant.

    From ``scripts/sweep_linear.py`` on an H100 (``benchmarks/h100-linear-sweep-8b.json``, M = 32, quantization
    included): this tiling was the fastest or within 2.5% of it at all four 8B projections — qkv 14.3 µs, o 11.6,
    gate_up 41.6, down 27.9 against 19.2 / 16.7 / 43.9 / 33.8 for the tiling before (64-channel tiles on the
    activation side, 128-wide K steps, K split for two programs per SM, a reduce launch), whose floors are 8.4 /
    5.6 / 33.7 / 16.9 µs. Splitting K never paid at 8B: the reduce launch costs more than the idle SMs."""
    block_k = 256 if k % 256 == 0 else 128
    tiles, steps = triton.cdiv(n, 64), triton.cdiv(k, block_k)
    split = 1
    if tiles < 48:
        split = split_for(tiles, steps, 64)
    cfg = Config(64, block_k, split, swap=True, num_warps=4, num_stages=6 if block_k == 256 else 4)
    return wide_config(cfg, n, m) if m >= WIDE_ROWS else cfg


def stages_that_fit(cfg: Config, m_tile: int, block_n: int) -> int:
    """``cfg``'s pipeline depth, or as many stages as fit ``SHARED_BUDGET`` with ``m_tile``-row and ``block_n``-channel
    tiles (one e4m3 stage: both tiles, ``block_k`` bytes a row; six stages of 128 + 64 rows would need 288 KB)."""
    return min(cfg.num_stages, SHARED_BUDGET // ((m_tile + block_n) * cfg.block_k))


def wide_config(cfg: Config, n: int, m: int = 2 * WIDE_ROWS) -> Config:
    """``cfg`` for batched passes of ``m`` ≥ ``WIDE_ROWS`` rows, with as many stages as fit. The K loop
    (``block_k``, ``split_k``) is ``cfg``'s, so every element sums in the same order. A tiling with a K split keeps
    its 32-row tiles (its reduce launch is untested wider), and so does a TMA tiling (unmeasured wider). Where N gives
    at least 48 tiles of 128 channels (8B: qkv, gate_up), 128-row tiles, from 256 rows with 128-channel weight tiles
    on 8 warps; narrower N (8B: o, down): 128-row tiles from 256 rows, 64-row tiles below; else 64-channel weight
    tiles on 4 warps.

    From ``scripts/sweep_linear.py --wide`` on an H100, quantization included, µs (the fastest of the eight wide
    tilings in brackets). At M = 256 (``benchmarks/h100-2026-12-07-linear-wide-rows-8b.json``): qkv 21.4 (21.4), o 15.1
    (15.1), gate_up 62.1 (62.1), down 38.1 (37.6), against 38.9 / 26.6 / 135.5 / 59.6 for the 32-row tiling — the
    32-row tiles re-read each weight tile eight times and spread 256 rows over eight times the programs. At M = 128
    (``benchmarks/h100-2026-12-07-eve-linear-wide-rows-8b.json``, a batch of 4), the M = 256 rule gave 20.9 / 14.9 /
    51.3 / 35.2 (122.3 a layer) and this one's tilings were the fastest: 16.8 / 12.9 / 49.8 / 30.3 (109.8); the 32-row
    tiling 22.2 / 15.9 / 76.4 / 36.3. Every wide tiling's rows equalled the 32-row tiling's, bit for bit."""
    if cfg.split_k > 1 or cfg.tma:
        return cfg
    wide_n = triton.cdiv(n, 128) >= 48
    m_tile = 128 if wide_n or m >= 2 * WIDE_ROWS else 64
    block_n, warps = (128, 8) if wide_n and m >= 2 * WIDE_ROWS else (64, 4)
    return replace(cfg, m_tile=m_tile, block_n=block_n, num_warps=warps,
                   num_stages=stages_that_fit(cfg, m_tile, block_n))


def bf16_config(n: int, k: int, sms: int, m: int = 1) -> Config:
    """The tiling of the same GEMM on two-byte operands (``orthrus::invariant_linear``, an FP8 engine's BF16 head): as
    :func:`config` with 64-wide K steps (the bytes of a 128-wide one-byte step). A function of N, K and the GPU
    only. From ``benchmarks/h100-linear-sweep-8b.json`` (bf16, M = 1): 64-channel tiles on the MMA's M side, 64-wide
    K steps six deep and no split came within 0.3% of cuBLAS at the widest projection (gate_up: 72.2 vs 72.4 µs).
    ``m`` is unused: 32-row tiles at any M (wider ones are unmeasured for two-byte operands)."""
    steps = triton.cdiv(k, 64)
    tiles = triton.cdiv(n, 64)
    split = split_for(tiles, steps, 64) if tiles < 48 else 1
    return Config(64, 64, split, swap=True, num_warps=4, num_stages=6)


def tma_config(n: int, k: int, sms: int, m: int = 1) -> Config:
    """:func:`config` with its tiles loaded by TMA (kernel ``triton-tma``) where it has no K split and K rows are
    16-byte multiples (TMA's stride rule), else :func:`config` itself. Static reasons to try it
    (``scripts/kernel_report.py``): the 8B GEMM drops from 64 to 42 registers a thread with the address arithmetic
    of 72 cp.async copies gone; the same QGMMA sequence over the same tiles in the same K order, so its rows equal
    the cp.async kernel's bit for bit (a GPU test checks it). The build times it against the others. ``m`` is
    unused: 32-row tiles at any M (a wide TMA tiling is unmeasured)."""
    cfg = config(n, k, sms)
    return replace(cfg, tma=True) if cfg.split_k == 1 and k % 16 == 0 else cfg


def splitk_config(n: int, k: int, sms: int, m: int = 1) -> Config:
    """The tiling :func:`config` gave before the sweep (kernel ``triton-splitk``): 64 channels on the activation side,
    128-wide K steps, K split for about two programs per SM, then a reduce launch. Kept as a kernel the build times
    (another GPU may prefer it) and as the baseline of end-to-end comparisons in one run. ``m`` is unused."""
    blocks = triton.cdiv(n, 64)
    return Config(64, 128, max(1, min(triton.cdiv(2 * sms, blocks), triton.cdiv(k, 512))), swap=False)


def _gemm(xq, xs, weight, ws, out_dtype, cfg: Config):
    """``xq [M, K] @ weight[N, K].T`` (times ``xs[m] · ws[n]`` when given) with the tiling ``cfg``."""
    m, k = xq.shape
    n = weight.shape[0]
    m_tiles = triton.cdiv(m, cfg.m_tile)
    out = torch.empty(m, n, device=xq.device, dtype=out_dtype)
    if m == 0:
        return out
    if cfg.tma:
        return _gemm_tma(xq, xs, weight, ws, out, cfg)
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)  # a slice count that leaves none empty
    even = n % cfg.block_n == 0 and k % k_per_split == 0
    m_all = m_tiles * cfg.m_tile
    partial = torch.empty(split, m_all, n, device=xq.device, dtype=torch.float32) if split > 1 else out
    scaled = xs is not None
    xs = xs if scaled else out
    ws = ws if scaled else out
    _gemm_kernel[(m_tiles, triton.cdiv(n, cfg.block_n), split)](
        xq, xs, weight, ws, out, partial, m, n, k, m_all, xq.stride(0), weight.stride(0), out.stride(0),
        K_PER_SPLIT=k_per_split, M_TILE=cfg.m_tile, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split,
        SWAP=cfg.swap, SCALED=scaled, EVEN=even, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split > 1:
        _reduce_kernel[(triton.cdiv(n, 64), m_tiles)](partial, xs, ws, out, m, n, m_all, out.stride(0),
                                                     M_TILE=cfg.m_tile, BLOCK_N=64, SPLIT_K=split, SCALED=scaled,
                                                     num_warps=4)
    return out


def _gemm_tma(xq, xs, weight, ws, out, cfg: Config):
    """``_gemm`` of a TMA tiling: descriptors of the [M, K] rows and the [N, K] weight (16-byte aligned bases and
    rows; an unaligned row block is copied, whatever M, so every call runs this kernel)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    m, k = xq.shape
    n = weight.shape[0]
    if (k * xq.element_size()) % 16 or weight.data_ptr() % 16 or weight.stride(0) != k:
        raise ValueError(f"a TMA tiling needs 16-byte aligned weight rows, got [{n}, {k}] {weight.dtype}")
    xq = xq if xq.data_ptr() % 16 == 0 else xq.clone()
    scaled = xs is not None
    _gemm_tma_kernel[(triton.cdiv(m, cfg.m_tile), triton.cdiv(n, cfg.block_n))](
        TensorDescriptor.from_tensor(xq, [cfg.m_tile, cfg.block_k]), xs if scaled else out,
        TensorDescriptor.from_tensor(weight, [cfg.block_n, cfg.block_k]), ws if scaled else out, out, m, n, k,
        out.stride(0), M_TILE=cfg.m_tile, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SCALED=scaled,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantization on the device (one launch): ``(xq [M, K], scale [M, 1] float32)``, the values of
    ``quantize_rows``."""
    m, k = x.shape
    xq = torch.empty(m, k, device=x.device, dtype=torch.float8_e4m3fn)
    xs = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    if m:
        _quant_kernel[(m,)](x, xq, xs, x.stride(0), xq.stride(0), K=k, QMAX=E4M3_MAX, SMIN=MIN_SCALE, BLOCK=1024,
                            num_warps=4)
    return xq, xs


def fp8_matmul(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, out_dtype,
               cfg: Config | None = None, tiling=config) -> torch.Tensor:
    """``orthrus::fp8_matmul``'s Triton implementation (``cfg``: a tiling to try; else ``tiling(N, K, SMs, M)``,
    :func:`config`)."""
    n, k = weight.shape
    cfg = cfg or tiling(n, k, _sms(xq.device), xq.shape[0])
    return _gemm(xq.contiguous(), xs.contiguous(), weight, weight_scale.float(), out_dtype, cfg)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               cfg: Config | None = None, tiling=config) -> torch.Tensor:
    """Quantization and GEMM, as ``orthrus::fp8_linear`` runs them (for benchmarks of a tiling ``cfg``)."""
    return fp8_matmul(*quantize(x.contiguous()), weight, weight_scale, x.dtype, cfg, tiling)


def linear(x: torch.Tensor, weight: torch.Tensor, cfg: Config | None = None, tiling=bf16_config) -> torch.Tensor:
    """``x @ weight.T`` for bf16/fp16/fp32 operands with the same GEMM (no scales): ``orthrus::invariant_linear``'s
    Triton implementation (``cfg``: a tiling to try, as ``scripts/sweep_linear.py`` does; else ``tiling(N, K,
    SMs)``, :func:`bf16_config`)."""
    x = x.contiguous()
    n, k = weight.shape
    return _gemm(x, None, weight, None, x.dtype, cfg or tiling(n, k, _sms(x.device), x.shape[0]))
