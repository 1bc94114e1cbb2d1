"""Time a layer's residual add + RMSNorm as Inductor compiles it, by default and with every reduction persistent, at
the rows of a decode step, a batch-1 block and a batch-8 pass; check each variant's rows bitwise equal across those
row counts (batch invariance) and against float64.

Why: a compiled 8B batch-1 cycle on the H100 spends 0.36 ms in 136 launches of these rows (32 rows of 4,096, 2.5-2.9
µs each: `triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_*` in benchmarks/h100-2026-12-08-tenth-profile-8b-b1-*).
Inductor makes a reduction persistent (the whole row in one block: one read) only up to 1,024 elements for inner
reductions (``InductorChoices.should_use_persistent_reduction``, torch 2.13), so 4,096-wide rows get a looped one.
The persistent variant here swaps in an ``InductorChoices`` that says yes to every reduction (``V.set_choices_handler``
around the compile, this script only). Each variant compiles with Inductor's caches off (a cached entry would ignore
the choice) and reports whether its generated code loops over the row (``looped``).

    python scripts/bench_rms_norm.py --out $OUT/rms-norm.json          # a GPU: µs a call (CUDA-graph replays)
    python scripts/bench_rms_norm.py --hidden 64 --rows 1,4              # the CPU: the checks only, no timings

Exit 1 when a variant's rows differ across row counts or from float64. On the CPU (torch 2.13, C++ code) both
variants' 1-row compile gave a row that is not bitwise the 4- and 32-row calls' (hidden 64 and 4,096, bf16), where
those two agree; with ``--emulate-precision-casts`` (Inductor's option that keeps eager's bf16 roundings, as the
engines' fused-FP8 programs compile) the rows agreed at every row count (and in one check were eager's bits). So
it is a rounding Inductor elides differently at one row, not the reduction's order. On the GPU the same check says
whether BF16 programs (compiled without that option; a decode step's graph is static at batch 1) have it too.
"""

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
from torch._inductor.choices import InductorChoices
from torch._inductor.utils import run_and_get_code
from torch._inductor.virtualized import V

from orthrus_plugins.qk_norm_rope import rms_norm

EPS = 1e-6


class Persistent(InductorChoices):
    """Every reduction persistent (Inductor's own heuristic: inner reductions up to 1,024 elements)."""

    @staticmethod
    def should_use_persistent_reduction(features, cooperative_reduction: bool) -> bool:
        return True


def layer_norm_step(x: torch.Tensor, o: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x = x + o`` then ``rms_norm(x)``, as ``orthrus_export.model.forward`` spells a layer's residual and norm."""
    x = x + o
    return x, rms_norm(x, w, EPS)


def compiled(variant: str, args: tuple, emulate: bool) -> tuple:
    """The step compiled for ``args``' shapes (static) as ``variant`` ("default" or "persistent"; ``emulate``:
    Inductor's ``emulate_precision_casts``), its output on ``args`` and whether the generated code loops over a
    row."""
    torch._dynamo.reset()
    fn = torch.compile(layer_norm_step, fullgraph=True, dynamic=False,
                       options={"fx_graph_cache": False, "emulate_precision_casts": emulate})
    with V.set_choices_handler(Persistent()) if variant == "persistent" else contextlib.nullcontext():
        out, code = run_and_get_code(fn, *args)
    source = "\n".join(code)
    looped = "r0_offset in range" in source if args[0].is_cuda else None  # (the CPU's code is C++: not told)
    return fn, out, looped


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", default="4096,2048", help="row widths (8B: 4096, 1.7B: 2048)")
    ap.add_argument("--rows", default="1,32,256", help="row counts: a decode step, a batch-1 block, a batch-8 pass")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--emulate-precision-casts", action="store_true", help="Inductor's option of that name (the "
                    "fused-FP8 programs' compile; BF16 programs compile without it)")
    ap.add_argument("--out")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda":  # (its module needs Triton: a GPU machine's)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_attention_splits import timed
    g = torch.Generator(device=dev).manual_seed(0)
    rows = sorted(int(r) for r in a.rows.split(","))
    results = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "torch": torch.__version__,
               "emulate_precision_casts": a.emulate_precision_casts, "runs": []}
    failures = []
    for hidden in (int(h) for h in a.hidden.split(",")):
        x = torch.randn(rows[-1], hidden, generator=g, device=dev).bfloat16()
        o = torch.randn(rows[-1], hidden, generator=g, device=dev).bfloat16()
        w = (1 + 0.1 * torch.randn(hidden, generator=g, device=dev)).bfloat16()
        xs = (x.double() + o.double()).bfloat16().double()  # the residual sum as bf16 rounds it
        want = xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + EPS) * w.double()
        for variant in ("default", "persistent"):
            full = None
            for m in reversed(rows):  # the most rows first: the others' rows are compared with it
                args = (x[:m].clone(), o[:m].clone(), w)
                fn, (_, h), looped = compiled(variant, args, a.emulate_precision_casts)
                full = h if full is None else full
                err = ((h.double() - want[:m]).abs() / (1 + want[:m].abs())).max().item()
                same = torch.equal(h, full[:m])
                us = timed(lambda: fn(*args), a.reps) if dev == "cuda" else float("nan")
                run = {"hidden": hidden, "rows": m, "variant": variant, "looped": looped, "us": us,
                       "max_rel_err_vs_fp64": err, "rows_equal_to_most_rows": same}
                results["runs"].append(run)
                shape = {True: "looped", False: "one pass", None: "-"}[looped]
                print(f"hidden {hidden:5d} rows {m:4d} {variant:10s} {shape:8s}: "
                      f"{us:7.2f} us  max rel err {err:.2e}  rows == the {rows[-1]}-row call's: {same}", flush=True)
                if not same or err > 2 ** -7:
                    failures.append(run)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
    if failures:
        print(f"{len(failures)} runs not batch-invariant or off the float64 reference", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
