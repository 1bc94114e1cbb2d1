"""The attention Triton kernel against the reference on the CPU, under Triton's interpreter (no GPU needed), at every
query block and two split counts, and four launch configurations besides the default (two of them folding several
splits into one program, bitwise the default's output): batched rows of different
lengths and slots (two consecutive chunks of one slot among them), fp32 and fp16 (the interpreter mishandles bf16:
the kernel before query blocks fails there too), causal and diffusion mode, v a strided view and lengths and slots
strided columns (read in place); outputs poisoned first, cache contents checked, each row bitwise equal to its run
alone (whose K/V the split kernel writes itself: its cache checked too); in cached mode also rows of one token
(decode steps, their query rows padded to a block's). Exit 1 on the first failure.

    pip install --target /tmp/tritonpkg triton "numpy<2.3"  # not dependencies (the CPU wheels of torch need no
    # Triton); NumPy 2.3 on refuses the interpreter's size-1 loop bounds
    PYTHONPATH=/tmp/tritonpkg TRITON_INTERPRET=1 python scripts/check_attention_interpreter.py   # ~100 s on 2 cores
"""

import sys

import torch

from orthrus_plugins.attention_common import kernel as ta
from orthrus_plugins.attention_common import reference

TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3}


def check(causal: bool, dtype: torch.dtype, t: int = 8) -> float:
    """Rows of ``t`` tokens (``t`` = 1: decode steps, whose 4 query rows a cached-mode program pads to a 32-token
    block's 128)."""
    hq, hkv, d, layers, slots_n, cap = 8, 2, 16, 2, 5, 300

    def r(*shape):
        return torch.randn(*shape).to(dtype)
    lens, slots = torch.tensor([0, 133, 77, 100, 100 + t]), torch.tensor([4, 0, 3, 1, 1])
    rows = len(lens)
    q, k = r(rows * t, hq, d), r(rows * t, hkv, d)
    v = r(rows * t, 3 * hkv, d)[:, hkv:2 * hkv]  # a strided view, as the slice of a QKV product the engines pass
    # lengths and slots as strided int64 columns of a row buffer, as the runtime passes them
    lens, slots = torch.stack([lens, slots], 1)[:, 0], torch.stack([slots, lens], 1)[:, 0]
    kc, vc = r(layers, slots_n, hkv, cap, d), r(layers, slots_n, hkv, cap, d)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    expected = reference("check", q, k, v, kc_ref, vc_ref, lens, 1, d ** -0.5, causal, slots)
    worst = 0.0
    # query blocks 0 (all rows), 16, 32 (a row here has 8·4 = 32 query rows) × 4 and 16 splits at the default launch,
    # then two other launches (key tile, warps, stages, merge rows)
    configs = [(qb, splits, ta.DEFAULT_LAUNCH) for qb in ta.QUERY_BLOCK_CHOICES[:3] for splits in (4, 16)]
    configs += [(0, 16, ta.Launch(block_n=32, num_warps=4, num_stages=2, merge_rows=4)),
                (0, 4, ta.Launch(block_n=128, num_warps=8, num_stages=1, merge_rows=32))]
    # folded split programs (off CUDA a device counts as one SM): 16 splits a program here, and 4 (batched) against
    # 2 (a row alone) at query block 16 — each bitwise the default launch's output
    configs += [(0, 16, ta.Launch(programs_per_sm=1)), (16, 4, ta.Launch(programs_per_sm=8))]
    unfolded = {}
    for qb, splits, launch in configs:
        kc2, vc2 = kc.clone(), vc.clone()
        out = torch.full_like(q, float("nan"))
        ta.attention(q, k, v, kc2, vc2, lens, 1, d ** -0.5, causal, splits=splits, slots=slots, out=out,
                     query_block=qb, launch=launch)
        what = f"causal={causal} {dtype} tokens={t} query_block={qb} splits={splits} {launch}"
        if not torch.isfinite(out).all():
            raise SystemExit(f"{what}: outputs left unwritten")
        err = (out.double() - expected.double()).abs().max().item()
        if err > TOLERANCE[dtype] * (1 + expected.double().abs().max().item()):
            raise SystemExit(f"{what}: max difference {err} from the reference")
        if launch == ta.DEFAULT_LAUNCH:
            unfolded[qb, splits] = out
        elif launch.programs_per_sm and not torch.equal(out, unfolded[qb, splits]):
            raise SystemExit(f"{what}: folded split programs differ from one split a program")
        if not (torch.equal(kc2, kc_ref) and torch.equal(vc2, vc_ref)):
            raise SystemExit(f"{what}: cache contents differ from the reference's")
        for i in (0, 1, 2):  # rows on their own slots: alone, bitwise the same
            rows_i = slice(i * t, (i + 1) * t)
            kc1, vc1 = kc.clone(), vc.clone()
            alone = ta.attention(q[rows_i], k[rows_i], v[rows_i], kc1, vc1, lens[i:i + 1], 1,
                                 d ** -0.5, causal, splits=splits, slots=slots[i:i + 1], query_block=qb,
                                 launch=launch)
            if not torch.equal(alone, out[rows_i]):
                raise SystemExit(f"{what}: row {i} alone differs from the batched call")
            # a lone row's K/V are written by the split kernel itself: its slot as the reference's, the rest untouched
            own = (slice(None), slots[i])
            kc_own, vc_own = kc.clone(), vc.clone()
            kc_own[own], vc_own[own] = kc_ref[own], vc_ref[own]
            if not (torch.equal(kc1, kc_own) and torch.equal(vc1, vc_own)):
                raise SystemExit(f"{what}: row {i} alone left cache contents other than the reference's")
        worst = max(worst, err)
    return worst


def main() -> int:
    torch.manual_seed(0)
    for causal in (True, False):
        for dtype in TOLERANCE:
            print(f"causal={causal} {dtype}: ok, max difference {check(causal, dtype):.2e}", flush=True)
    for dtype in TOLERANCE:  # decode steps: one token a row
        print(f"causal=True {dtype}, one token a row: ok, max difference {check(True, dtype, t=1):.2e}", flush=True)
    try:
        ta.attention(*[torch.zeros(1)] * 6, 0, 1.0, True, query_block=8)
    except ValueError as e:
        print(f"refused: {e}")
    else:
        raise SystemExit("query_block 8 was not refused")
    try:
        ta.attention(*[torch.zeros(1)] * 6, 0, 1.0, True, launch=ta.Launch(block_n=48))
    except ValueError as e:
        print(f"refused: {e}")
    else:
        raise SystemExit("a 48-key tile was not refused")
    return 0


if __name__ == "__main__":
    sys.exit(main())
