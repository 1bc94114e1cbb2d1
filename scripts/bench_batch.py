"""Batched cycle latency at the published Qwen3 shapes (random weights), through the runtime's batch buckets.

    python scripts/bench_batch.py --shapes 1.7b,8b --batches 1,2,4,8,16 --contexts 4096 --out benchmarks/h200-batch.json

Per shape: an in-memory engine (``orthrus_export.bench.build_random``: the engine's batched programs, traced with a
dynamic row dimension, captured as CUDA graphs per bucket) with ``--max-batch-size`` the largest batch; then the
greedy and sampled cycle over b sequences, each at every context (``Engine.time_step(..., batch=b)``: CUDA events
around graph replays, median of ``--iters``), its ratio to batch 1 and the aggregate tokens/s at acceptance 9.6 and
11.7. Results are written after each shape.
"""

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    from orthrus_export.bench import bench_batches, build_random, copy_bandwidth, matmul_rate
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="1.7b,8b")
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--contexts", default="4096")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--compile", choices=["none", "inductor"], default="inductor")
    ap.add_argument("--no-sampled", action="store_true")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    contexts = [int(c) for c in a.contexts.split(",")]
    device = torch.device("cuda")
    bw, rate = copy_bandwidth(device), matmul_rate(device, torch.bfloat16)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s, bf16 matmul rate {rate / 1e12:.0f} TFLOP/s", flush=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "compile": a.compile,
              "date": datetime.date.today().isoformat(), "copy_bandwidth_GBps": bw / 1e9,
              "matmul_TFLOPs": rate / 1e12, "shapes": {}}
    for shape in a.shapes.split(","):
        t0 = time.perf_counter()
        cfg, engine, export_s, load_s, _ = build_random(shape, torch.bfloat16, max(contexts),
                                                        compile=a.compile == "inductor",
                                                        max_batch_size=max(batches))
        print(f"qwen3-{shape}: traced in {export_s:.1f} s, compiled and captured {len(engine.steps.graphs)} graphs "
              f"(buckets {engine.buckets}) in {load_s:.1f} s", flush=True)
        result = bench_batches(engine, contexts, batches, a.iters, [9.6, 11.7],
                               log=lambda m: print(m, flush=True), sampled=not a.no_sampled, bandwidth=bw,
                               matmul_rate=rate)
        result.update(export_s=export_s, load_s=load_s, buckets=list(engine.buckets), total_s=time.perf_counter() - t0,
                      kv_cache_GB=2 * engine.k_cache.numel() * engine.k_cache.element_size() / 1e9)
        report["shapes"][shape] = result
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
        engine.close()
        del engine
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
