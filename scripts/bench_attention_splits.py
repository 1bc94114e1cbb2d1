"""Time the attention kernel alone (split + merge launches) at the batched 8B shapes, for every split count and
query block (query rows per program, ``--query-blocks``), against its byte floor: the lever #14 names for the
batched cycle ("fewer splits as rows grow", "the merge fused"). A query block is an engine setting (not chosen per
batch size), so fewer splits with smaller query blocks stay batch-invariant.

For b rows of 32 tokens with 4k keys each (Qwen3-8B attention: 32 query / 8 KV heads of 128), verify (cached, causal)
and draft (diffusion) mode, every split count of SPLIT_CHOICES: median of CUDA-event timings, the K/V bytes floor
(K and V read once at the measured copy bandwidth) and the fp32 split partials written and read back by the merge.
Each call is captured as a CUDA graph and timed by its replays (as the runtime runs it).

    python scripts/bench_attention_splits.py --out $OUT/attention-splits.json [--query-blocks 0,16,32,64]
    python scripts/bench_attention_splits.py --smoke      # tiny shapes (CPU: TRITON_INTERPRET=1)
    python scripts/bench_attention_splits.py --tokens 1 --rows 1,8 --query-blocks 0,16   # decode steps
    python scripts/bench_attention_splits.py --rows 1,8 --partials bf16,fp32   # the split outputs' stored dtype
    git show REV:plugins/attention_common/kernel.py > old_kernel.py   # a kernel to compare with, in the same run:
    python scripts/bench_attention_splits.py --rows 1,8 --splits 16 --baseline old_kernel.py
    python scripts/bench_attention_splits.py --rows 1,8 --splits 16 --launches "default;num_stages=2,max_registers=128"

``--tokens 1``: one-token decode steps (cached mode only). Their query rows are padded to a 32-token block's (the
tile a verify block uses: one binary for both); query block 16 is the tile a decode step had before (16 rows, warp
MMAs), so ``--query-blocks 0,16`` compares the two in one run.

``--baseline FILE``: another version of ``plugins/attention_common/kernel.py`` (its ``attention`` function), timed
at every setting right after the current one, on the same inputs, with the largest difference between the two
outputs (0 where they compute the same function).

``--launches``: ``;``-separated kernel launches (``Launch.from_spec``: ``field=value,...`` over the defaults, e.g.
``num_stages=2,max_registers=128``), each timed at every setting (the baseline at the default launch only: its
``Launch`` may lack the fields); a launch's ``partials`` is overridden by ``--partials`` where that is given.
"""

import argparse
import importlib.util
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orthrus_plugins.attention_common.kernel import (QUERY_BLOCK_CHOICES, SPLIT_CHOICES,  # noqa: E402
                                                     Launch, attention)

PARTIALS = {"bf16": torch.bfloat16, "fp32": torch.float32}


def timed(fn, reps, warm=3, inner=20):
    """Median over ``reps`` samples of ``inner`` back-to-back calls (µs per call). On a GPU ``fn`` is captured as a
    CUDA graph first and the samples time its replays, so host launch overhead stays out of the figure."""
    for _ in range(warm):
        fn()
    if not torch.cuda.is_available():
        return float("nan")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            graph.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / inner)
    return statistics.median(ts)


def setup(smoke: bool, keys: int, tokens: int | None = None):
    """Device, dtype, shape ``(hq, hkv, d, tokens per row, keys)``, a seeded generator and the results' header: the
    8B attention shape, or a tiny one under ``smoke`` (Triton's interpreter on the CPU)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hq, hkv, d, blk = (32, 8, 128, 32) if not smoke else (4, 2, 16, 4)
    blk = tokens or blk
    keys = keys if not smoke else 96
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    header = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "dtype": str(dtype),
              "shape": {"hq": hq, "hkv": hkv, "d": d, "tokens_per_row": blk, "keys": keys}}
    return dev, dtype, (hq, hkv, d, blk, keys), torch.Generator(device=dev).manual_seed(0), header


def inputs(rows: int, dev, dtype, shape, g):
    """``q``, ``k``, ``v`` for ``rows`` rows of a block each, caches of one layer with a slot more than rows, and
    the rows' slots."""
    hq, hkv, d, blk, keys = shape
    kc = torch.randn(1, rows + 1, hkv, keys + blk, d, generator=g, device=dev, dtype=dtype)
    vc = torch.randn_like(kc)
    q = torch.randn(rows * blk, hq, d, generator=g, device=dev, dtype=dtype)
    k = torch.randn(rows * blk, hkv, d, generator=g, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    return q, k, v, kc, vc, torch.arange(rows, device=dev, dtype=torch.int64)


def load_kernel(path: str):
    """The ``attention`` function of the kernel module at ``path`` (a file, not a package: its imports of
    ``orthrus_plugins`` resolve to the installed package)."""
    spec = importlib.util.spec_from_file_location("baseline_attention_kernel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.attention


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--keys", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--query-blocks", default="0", help="comma-separated, of " + str(QUERY_BLOCK_CHOICES))
    ap.add_argument("--smoke", action="store_true", help="small shapes, for a check on the CPU")
    ap.add_argument("--tokens", type=int, help="tokens per row (default: a block, 32; 1: decode steps, cached mode)")
    ap.add_argument("--partials", default="", help="comma-separated, of " + ",".join(PARTIALS) + " (the split outputs' "
                    "stored dtype, Launch.partials; default: the kernel's, the inputs')")
    ap.add_argument("--splits", default=",".join(map(str, SPLIT_CHOICES)), help="comma-separated, of "
                    + str(SPLIT_CHOICES))
    ap.add_argument("--baseline", help="another kernel.py, timed beside the current one at every setting")
    ap.add_argument("--launches", default="default", help="';'-separated launches (field=value,... over the "
                    "defaults: Launch.from_spec), each timed at every setting")
    a = ap.parse_args()
    kernels = {"current": attention, **({"baseline": load_kernel(a.baseline)} if a.baseline else {})}
    dev, dtype, shape, g, header = setup(a.smoke, a.keys, a.tokens)
    hq, hkv, d, blk, keys = shape
    # bandwidth: a large device-to-device copy (read + write)
    big = torch.empty(2 ** 28 if dev == "cuda" else 2 ** 16, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(big)
    copy_us = timed(lambda: dst.copy_(big), a.reps)
    bw = 2 * big.numel() / (copy_us * 1e-6) if copy_us == copy_us else float("nan")
    results = {**header, "copy_bandwidth_GBps": bw / 1e9, "rows": []}
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    for rows in [int(x) for x in a.rows.split(",")] if not a.smoke else [1, 3]:
        q, k, v, kc, vc, slots = inputs(rows, dev, dtype, shape, g)
        for causal in (True,) if blk == 1 else (True, False):
            n = keys - blk if causal else keys  # verify: the block's own keys are written into the cache first
            lens = torch.full((rows,), n, device=dev, dtype=torch.int64)
            kv_bytes = rows * hkv * keys * d * 2 * kc.element_size()
            floor_us = kv_bytes / bw * 1e6
            ref = None
            partials = [PARTIALS[p] for p in a.partials.split(",")] if a.partials else [None]
            for splits, qb, pdt, spec, name in [(s, b, p, ls, kn) for s in map(int, a.splits.split(","))
                                                for b in map(int, a.query_blocks.split(",")) for p in partials
                                                for ls in a.launches.split(";") for kn in kernels
                                                if kn == "current" or ls in ("", "default")]:  # the baseline: its own
                if a.smoke and splits > 8:
                    continue
                launch = Launch.from_spec(spec)
                launch = replace(launch, partials=pdt) if pdt is not None else launch
                run = lambda: kernels[name](q, k, v, kc, vc, lens, 0, d ** -0.5, causal,  # noqa: E731
                                            splits=splits, slots=slots, query_block=qb, launch=launch)
                us = timed(run, a.reps)
                o = run()
                ref = o if ref is None else ref
                if name == "current":
                    current = o
                query_rows = blk * hq // hkv  # a row's query rows of one KV head (the kernel stores no padding)
                stored = (launch.partials or dtype).itemsize  # written, read back by the merge: out, max, sum
                parts = splits + (0 if causal else 1)  # the current kernel's: draft's block keys are one more part
                partial_bytes = 2 * rows * hkv * parts * query_rows * (d * stored + 2 * 4)
                mode = ("decode" if blk == 1 else "verify") if causal else "draft"
                row = {"rows": rows, "mode": mode, "kernel": name, "launch": spec, "splits": splits, "query_block": qb,
                       "partials": str(launch.partials or dtype).removeprefix("torch."),
                       "us": us,
                       "kv_floor_us": floor_us, "x_floor": us / floor_us, "partial_MB": partial_bytes / 1e6,
                       "kv_MB": kv_bytes / 1e6,
                       "max_abs_diff_vs_fewest_splits": float((o.float() - ref.float()).abs().max())}
                if name == "baseline":
                    row["max_abs_diff_vs_current"] = float((o.float() - current.float()).abs().max())
                results["rows"].append(row)
                vs = f"  vs current {row['max_abs_diff_vs_current']:.2e}" if name == "baseline" else ""
                print(f"rows {rows:2d} {row['mode']:6s} {name:8s} {spec if len(a.launches.split(';')) > 1 else ''} "
                      f"splits {splits:2d} query block {qb:3d} "
                      f"{row['partials']:8s}: {us:8.1f} us  ({row['x_floor']:.2f}x the "
                      f"K/V floor {floor_us:.1f} us; partials {row['partial_MB']:.1f} MB vs K/V {row['kv_MB']:.1f} "
                      f"MB)  diff {row['max_abs_diff_vs_fewest_splits']:.2e}{vs}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
