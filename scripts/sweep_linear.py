"""The linear layers of a decoding pass on this GPU: ``orthrus::fp8_linear``'s Triton GEMM at many tilings
(``plugins/fp8_linear/kernel.py``: block sizes, split K, the weight tile on the MMA's M side or not, warps, stages)
against its current tiling, ``torch._scaled_mm`` and bf16 cuBLAS, and the same GEMM on bf16 weights against cuBLAS,
at the Qwen3 projection shapes and M = 32 · rows (one verify block, a batch of 8) and 1.

    python scripts/sweep_linear.py --shapes 8b,1.7b --out benchmarks/h100-linear-sweep.json
    python scripts/sweep_linear.py --shapes 8b --kinds fp8 --wide --out benchmarks/h100-linear-wide-rows-8b.json

``--wide``: only the fp8 default tiling with wider row tiles (``m_tile`` 64, 128; 64- and 128-channel weight tiles;
4 and 8 warps), for batched passes (M = 256). A wider tile may serve calls of more than 32 rows only if each row
comes out bit for bit as the default 32-row tiles give it (then a row's result still does not depend on the batch):
each is checked for that (``equal_to_default``) besides the exact reference, and timed either way.

Timing: each call captured ``reps`` times into one CUDA graph over several copies of the weights (together several
times the L2, so every call reads its weight from device memory), the graph replayed and timed with CUDA events, the
median per call over ``--iters`` replays. Floor: the weight bytes over the device-to-device copy bandwidth measured in
the same run. Every tiling is checked first: the fp8 product against the exact reference (``_reference``, float64),
bf16 against a float64 product, by relative norm; a row of a 256-row call must equal, bit for bit, the same row
computed alone (batch invariance). A tiling that fails either is reported and not timed.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orthrus_export.bench import copy_bandwidth  # noqa: E402
from orthrus_plugins import fp8_linear as op  # noqa: E402
from orthrus_plugins.fp8_linear import kernel as fk  # noqa: E402
from orthrus_runtime.cycle import graph_time as graph_ms  # noqa: E402

SHAPES = {  # name -> (K, N) of the projections a pass reads
    "8b": {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 24576), "down": (12288, 4096)},
    "1.7b": {"qkv": (2048, 4096), "o": (2048, 2048), "gate_up": (2048, 12288), "down": (6144, 2048)},
}
L2_MULTIPLE = 150e6  # bytes of weights cycled through per graph: three times an H100's 50 MB L2


def splits_for(n: int, k: int, block_n: int, block_k: int, sms: int) -> list[int]:
    """1, and the fewest K slices giving at least one and two programs per SM."""
    steps, tiles = k // block_k, -(-n // block_n)
    return sorted({1, fk.split_for(tiles, steps, sms), fk.split_for(tiles, steps, 2 * sms)})


def candidates(n: int, k: int, sms: int, fp8: bool) -> list[tuple[str, fk.Config]]:
    """(label, tiling): the previous and the current default first (fp8), then block sizes × splits at 4 warps and
    4 stages (phase 1; ``refine`` adds warps and stages around the best)."""
    out = [("previous tiling", fk.splitk_config(n, k, sms)), ("default tiling", fk.config(n, k, sms))] if fp8 else []
    sizes = [(True, 64, 128), (True, 128, 128), (True, 64, 256), (True, 128, 256), (False, 32, 128),
             (False, 64, 128), (False, 32, 256)] if fp8 else [(True, 64, 64), (True, 128, 64), (False, 64, 64)]
    for swap, bn, bk in sizes:
        for split in splits_for(n, k, bn, bk, sms):
            out.append(("triton", fk.Config(bn, bk, split, swap)))
    seen, unique = set(), []
    for label, cfg in out:
        if cfg not in seen:
            seen.add(cfg)
            unique.append((label, cfg))
    return unique


def wide(cfg: fk.Config) -> list[fk.Config]:
    """The 32-row tiling with wider row tiles (the K loop, hence each element's summation order, unchanged), each
    with as many of its pipeline stages as fit in shared memory (``fk.stages_that_fit``; compiled for sm_90a by
    ``scripts/kernel_report.py``'s driver, the six-stage wide tilings but one did not fit). Engines take
    ``fk.wide_config``, one of these, from ``fk.WIDE_ROWS`` rows."""
    return [dataclasses.replace(cfg, m_tile=mt, block_n=bn, num_warps=w, num_stages=fk.stages_that_fit(cfg, mt, bn))
            for mt in (64, 128) for bn in (64, 128) for w in (4, 8)]


def refine(cfg: fk.Config) -> list[fk.Config]:
    return [fk.Config(cfg.block_n, cfg.block_k, cfg.split_k, cfg.swap, w, st) for w, st in ((4, 3), (4, 6), (8, 4))]


def graph_time(fn_of, copies: int, reps: int, iters: int) -> float:
    """Microseconds a call (``orthrus_runtime.cycle.graph_time``: CUDA-graph replays over ``copies`` input sets)."""
    return graph_ms(fn_of, copies, reps, iters) * 1e3


def rel(out, ref) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def sweep_shape(name, k, n, ms, sms, bw, a, log) -> list[dict]:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(n + k)
    w16 = [torch.randn(n, k, device=dev, generator=g).to(torch.bfloat16) * 0.02]
    copies16 = max(2, int(L2_MULTIPLE // (n * k * 2)) + 1)
    copies8 = max(2, int(L2_MULTIPLE // (n * k)) + 1)
    w16 += [torch.randn_like(w16[0]) * 0.02 for _ in range(copies16 - 1)]
    q8 = [op.quantize_weight(w16[i % copies16]) for i in range(copies8)]
    x_all = torch.randn(max(ms), k, device=dev, generator=g).to(torch.bfloat16)
    rows = []

    def record(kind, variant, m, us, cfg=None, err=None, floor_bytes=None):
        floor = floor_bytes / bw * 1e6
        row = {"shape": name, "k": k, "n": n, "m": m, "kind": kind, "variant": variant, "us": us,
               "floor_us": floor, "ratio": us / floor, "config": cfg.__dict__ if cfg else None, "rel_err": err}
        rows.append(row)
        return row

    # baselines
    for m in ms:
        x = x_all[:m].contiguous()
        us = graph_time(lambda i: torch.nn.functional.linear(x, w16[i % copies16]), copies16, a.reps, a.iters)
        record("bf16", "cublas", m, us, floor_bytes=2 * n * k)
        us = graph_time(lambda i: op.cuda_linear(x, *q8[i], kernel="torch._scaled_mm"), copies8, a.reps, a.iters)
        record("fp8", "torch._scaled_mm", m, us, floor_bytes=n * k)
        us = graph_time(lambda i: fk.quantize(x), 1, a.reps, a.iters)
        record("fp8", "quantize only", m, us, floor_bytes=n * k)
    x32, x256 = x_all[:32].contiguous(), x_all[:256].contiguous()

    def try_config(cfg, fp8, variant):
        kind = "fp8" if fp8 else "bf16"
        ref = op._reference(x32, *q8[0]) if fp8 else (x32.double() @ w16[0].double().t())
        try:
            if fp8:
                out = fk.fp8_linear(x32, *q8[0], cfg)
                big, one = fk.fp8_linear(x256, *q8[0], cfg), fk.fp8_linear(x256[:1], *q8[0], cfg)
            else:
                out = fk.linear(x32, w16[0], cfg)
                big, one = fk.linear(x256, w16[0], cfg), fk.linear(x256[:1], w16[0], cfg)
            torch.cuda.synchronize()
        except Exception as e:  # a tiling the compiler refuses (shared memory, registers): reported, not timed
            log(f"  {kind} {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            rows.append({"shape": name, "k": k, "n": n, "kind": kind, "config": cfg.__dict__,
                         "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            return
        err = rel(out, ref)
        invariant = bool(torch.equal(big[:32], out) and torch.equal(big[:1], one))
        if not err < 5e-3 or not invariant:
            log(f"  {kind} {cfg}: WRONG rel err {err:.2e}, invariant {invariant}")
            rows.append({"shape": name, "k": k, "n": n, "kind": kind, "config": cfg.__dict__, "rel_err": err,
                         "batch_invariant": invariant, "error": "failed the check"})
            return
        for m in ms:
            x = x_all[:m].contiguous()
            if fp8:
                us = graph_time(lambda i: fk.fp8_linear(x, *q8[i], cfg), copies8, a.reps, a.iters)
            else:
                us = graph_time(lambda i: fk.linear(x, w16[i % copies16], cfg), copies16, a.reps, a.iters)
            r = record(kind, variant, m, us, cfg, err, floor_bytes=(1 if fp8 else 2) * n * k)
            r["batch_invariant"] = invariant

    if a.wide:  # the default tiling, then its wider row tiles, each compared with it bit for bit at 256 rows
        default = fk.config(n, k, sms)
        try_config(default, True, "default tiling")
        ref256 = fk.fp8_linear(x256, *q8[0], default)
        for cfg in wide(default):
            before = len(rows)
            try_config(cfg, True, "wide rows")
            try:
                same = bool(torch.equal(fk.fp8_linear(x256, *q8[0], cfg), ref256))
            except Exception:  # the compiler refused it: try_config recorded why
                same = None
            for r in rows[before:]:
                r["equal_to_default"] = same
            log(f"  fp8 {cfg}: rows equal to the default tiling's at M = 256: {same}")
    for fp8 in [] if a.wide else [kind == "fp8" for kind in a.kinds.split(",")]:
        kind = "fp8" if fp8 else "bf16"
        for label, cfg in candidates(n, k, sms, fp8):
            try_config(cfg, fp8, label)
        timed = [r for r in rows if r["kind"] == kind and r.get("m") == 32 and r.get("variant") == "triton"]
        for r in sorted(timed, key=lambda r: r["us"])[:2]:
            for cfg in refine(fk.Config(**r["config"])):
                try_config(cfg, fp8, "triton")
    for m in ms:
        sel = [r for r in rows if r.get("m") == m and "us" in r]
        for kind in ("fp8", "bf16"):
            base = {r["variant"]: r for r in sel if r["kind"] == kind and r["variant"] not in ("triton", "wide rows")}
            tri = [r for r in sel if r["kind"] == kind and r["variant"] in ("triton", "wide rows")]
            best = min(tri, key=lambda r: r["us"]) if tri else None
            basics = "  ".join(f"{v} {r['us']:.1f}" for v, r in base.items())
            floor = (base or {"x": best or {"floor_us": 0}})
            floor = next(iter(floor.values()))["floor_us"]
            log(f"{name:8s} M={m:3d} {kind}: floor {floor:.1f} us | "
                f"{basics} | best triton {best['us']:.1f} us ({best['ratio']:.2f}x) {best['config']}"
                if best else f"{name} M={m} {kind}: no triton tiling passed")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="8b,1.7b")
    ap.add_argument("--ms", default="32,256,1")
    ap.add_argument("--kinds", default="fp8,bf16", help="Triton GEMMs swept: fp8, bf16 or both")
    ap.add_argument("--reps", type=int, default=24, help="calls per captured graph")
    ap.add_argument("--iters", type=int, default=15, help="graph replays (median)")
    ap.add_argument("--wide", action="store_true", help="only the fp8 default tiling's wider row tiles (see above)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    bw = copy_bandwidth(dev)
    ms = [int(m) for m in a.ms.split(",")]
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "sms": sms,
              "copy_bandwidth_GBps": bw / 1e9, "rows": []}
    for shape in a.shapes.split(","):
        for name, (k, n) in SHAPES[shape].items():
            print(f"{shape} {name}: K {k}, N {n}", flush=True)
            report["rows"] += sweep_shape(f"{shape} {name}", k, n, ms, sms, bw, a,
                                          lambda s: print(s, flush=True))
            Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
