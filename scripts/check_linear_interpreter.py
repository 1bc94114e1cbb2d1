"""``orthrus::fp8_linear``'s Triton GEMM on the CPU, under Triton's interpreter (no GPU needed): every tiling kind
(the weight tile on either MMA side, split K or not, shapes that divide the tiles and shapes that do not, rows beyond
one 32-row tile) against a float64 product, outputs poisoned first, each row bitwise equal to its run alone; TMA
tilings also bitwise equal to the same tiling without TMA; and the engines' rule (``config`` by M): a 130-row call
on the wide tiling, its rows bitwise equal to rows computed alone on the 32-row tiling. fp32 and fp16 operands
through ``linear``; e4m3 operands through the GEMM with torch's own quantization (the interpreter's e4m3 conversion
rounds some values differently from torch's, so the quantization kernel is checked on the GPU,
``tests/test_gpu.py``). Exit 1 on the first failure.

    pip install --target /tmp/tritonpkg triton "numpy<2.3"  # not dependencies (the CPU wheels of torch need no
    # Triton); NumPy 2.3 on refuses the interpreter's size-1 loop bounds
    PYTHONPATH=/tmp/tritonpkg TRITON_INTERPRET=1 python scripts/check_linear_interpreter.py   # ~2 min on 2 cores

The interpreter's products are NumPy's: with ``OPENBLAS_CORETYPE=Haswell`` (set on some of this workplace's
processors) OpenBLAS gives a row a result that depends on its place in the tile, and "rows alone equal" fails for
the interpreter's arithmetic, not the kernel's; prefix ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE`` there.
"""

import dataclasses
import sys

import torch

from orthrus_plugins.fp8_linear import _reference, kernel as fk, quantize_rows, quantize_weight

CONFIGS = [fk.Config(64, 64, 1), fk.Config(64, 64, 3, swap=True), fk.Config(16, 32, 2), fk.Config(32, 64, 4),
           fk.Config(64, 64, 1, swap=True, m_tile=64), fk.Config(32, 64, 2, m_tile=128),  # wider row tiles
           fk.Config(64, 64, 1, swap=True, tma=True), fk.Config(64, 256, 1, swap=True, tma=True)]  # TMA loads
SHAPES = [(1, 96, 256), (40, 130, 320), (64, 128, 512)]  # (M, N, K): one row; ragged N, K; two row tiles
TOLERANCE = {torch.float32: 1e-6, torch.float16: 2e-3, "e4m3": 1e-6}


def poisoned_gemm(xq, xs, w, ws, dtype, cfg):
    """``kernel._gemm`` into an output that starts as NaN (every element must be written)."""
    real_empty = torch.empty

    def nan_empty(*a, **kw):
        t = real_empty(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    torch.empty = nan_empty
    try:
        return fk._gemm(xq, xs, w, ws, dtype, cfg)
    finally:
        torch.empty = real_empty


def operands(kind, m: int, n: int, k: int, g):
    """``(xq, xs, w, ws, out dtype, float64 reference)`` of an [m, k] x [n, k] GEMM: e4m3 operands with their scales
    (torch's quantization), or fp32/fp16 ones without."""
    if kind == "e4m3":
        x = torch.randn(m, k, generator=g).half()
        w, ws = quantize_weight(torch.randn(n, k, generator=g) * 0.05)
        xq, xs = quantize_rows(x)
        return xq, xs.reshape(-1), w, ws, torch.float32, _reference(x.float(), w, ws).double()
    xq, w = torch.randn(m, k, generator=g).to(kind), torch.randn(n, k, generator=g).to(kind)
    return xq, None, w, None, kind, xq.double() @ w.double().t()


def main() -> int:
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for (m, n, k), cfg in [(s, c) for s in SHAPES for c in CONFIGS + [fk.config(s[1], s[2], 132)]]:
        for kind in (torch.float32, torch.float16, "e4m3"):
            xq, xs, w, ws, dtype, ref = operands(kind, m, n, k, g)
            out = poisoned_gemm(xq, xs, w, ws, dtype, cfg)
            err = float((out.double() - ref).norm() / ref.norm())
            alone = torch.cat([fk._gemm(xq[i:i + 1], None if xs is None else xs[i:i + 1], w, ws, dtype, cfg)
                               for i in range(m)])
            ok = not torch.isnan(out).any() and err < TOLERANCE[kind] and torch.equal(alone, out)
            if cfg.tma:  # the same tiles and K order as without TMA: the same bits
                ok = ok and torch.equal(out, fk._gemm(xq, xs, w, ws, dtype, dataclasses.replace(cfg, tma=False)))
            worst = max(worst, err) if kind == torch.float32 else worst
            print(f"M {m:3d} N {n:3d} K {k:3d} {str(kind):14s} {cfg}: rel err {err:.1e}, rows alone equal "
                  f"{torch.equal(alone, out)} {'ok' if ok else 'FAILED'}", flush=True)
            if not ok:
                return 1
    # the engines' rule: a call of WIDE_ROWS rows or more takes a wide tiling (64-row tiles below 256 rows at this
    # narrow N, 128-row tiles from 256; the same K loop), a decode step the 32-row one: each row alone equals its row
    # in the wide call
    n, k = 3072, 512  # 48 tiles of 64 channels: no K split, so the wide tiling applies
    for m, kind in [(fk.WIDE_ROWS + 2, kind) for kind in (torch.float32, torch.float16, "e4m3")] + [
            (2 * fk.WIDE_ROWS + 2, torch.float32)]:
        wide, narrow = fk.config(n, k, 132, m), fk.config(n, k, 132, 1)
        assert wide.m_tile == (64 if m < 2 * fk.WIDE_ROWS else 128) and narrow.m_tile == 32
        assert (wide.block_k, wide.split_k) == (narrow.block_k, 1)
        xq, xs, w, ws, dtype, ref = operands(kind, m, n, k, g)
        out = poisoned_gemm(xq, xs, w, ws, dtype, wide)
        err = float((out.double() - ref).norm() / ref.norm())
        rows = [0, 1, 63, 64, 127, 128, 129, m - 1]
        alone = torch.cat([fk._gemm(xq[i:i + 1], None if xs is None else xs[i:i + 1], w, ws, dtype, narrow)
                           for i in rows])
        ok = not torch.isnan(out).any() and err < TOLERANCE[kind] and torch.equal(alone, out[rows])
        worst = max(worst, err) if kind == torch.float32 else worst
        print(f"M {m:3d} N {n} K {k} {str(kind):14s} engine rule {wide} vs rows alone on {narrow}: rel err "
              f"{err:.1e}, rows alone equal {torch.equal(alone, out[rows])} {'ok' if ok else 'FAILED'}", flush=True)
        if not ok:
            return 1
    print(f"all passed (fp32 worst relative error {worst:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
