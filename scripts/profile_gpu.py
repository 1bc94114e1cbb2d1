"""Where each decoding step's time goes, by kind (GEMM, attention, other, time between kernels), each kind against
its own floor, bytes or FLOPs (``orthrus_export.profile`` defines the kinds and floors), at a Qwen3 shape with
random weights.

    python scripts/profile_gpu.py --shape 8b --context 4096 --batches 1,8 --steps verify,draft,cycle \
        --compile inductor --out benchmarks/h100-profile-8b.json
    python scripts/profile_gpu.py --from benchmarks/h200-profile-cycle-8b-none.json \
        --bandwidth-from benchmarks/h200-attention-splits.json --out benchmarks/h200-profile-cycle-8b-none-kinds.json

Per step and batch size: the CUDA-graph replay (``Engine.time_step``, CUDA events, median) and the kernels of eager
calls of the same step body (``Engine.profile_step``, torch.profiler); the copy bandwidth is measured in the same
run. ``--from`` re-reads a profile in the layout of the cycle profiler this script replaced (per batch size: the
replay and the kernels by name, as ``benchmarks/h200-profile-cycle-8b-none.json``) and adds the kinds and floors,
with the bandwidth measured on that device (``--bandwidth-from``: a benchmark JSON with
``copy_bandwidth_GBps``, or ``--bandwidth`` in GB/s; ``--matmul-tflops`` adds the GEMMs' compute bound). A measured
profile times a large matmul in the same run for each operand dtype the engine multiplies in (``bench.matmul_rates``:
bf16; FP8 engines e4m3 through ``torch._scaled_mm`` and their bf16 head): the GEMM floor is the larger of the weight
bytes over the copy bandwidth and each dtype's FLOPs over its rate (until 2026-12-07 FP8 FLOPs went at the bf16
rate, which overstated a batched FP8 pass's compute floor about twofold).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orthrus_export.bench import build_random, copy_bandwidth, matmul_rates, qwen3_config, rates_tflops  # noqa: E402
from orthrus_export.profile import bounds_ms, breakdown, floors_of, profile_engine, table  # noqa: E402
from orthrus_export.weights import engine_shapes  # noqa: E402


def measure(a) -> dict:
    batches = [int(b) for b in a.batches.split(",")]
    device = torch.device("cuda")
    cfg, engine, export_s, load_s, _ = build_random(a.shape, torch.bfloat16, a.context, precision=a.precision,
                                                    compile=a.compile == "inductor", max_batch_size=max(batches),
                                                    fp8_kernel=a.fp8_kernel, fp8_quant=a.fp8_quant,
                                                    attention_launch=a.attention_launch,
                                                    attention_block_n=a.attention_block_n,
                                                    split_reductions=not a.no_split_reductions)
    print(f"qwen3-{a.shape}: traced {export_s:.1f} s, compiled+captured {load_s:.1f} s", flush=True)
    # the roofs, measured in this run: copy bandwidth, and a matmul rate per operand dtype (FP8: e4m3 and the head)
    bw, rate = copy_bandwidth(device), matmul_rates(device, cfg, engine.weights)
    tflops = rates_tflops(cfg, engine.weights, rate)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s, matmul rate " +
          ", ".join(f"{d} {r:.0f} TFLOP/s" for d, r in tflops.items()), flush=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": a.shape,
              "precision": a.precision, "fp8_kernel": engine.options.fp8_kernel if a.precision == "fp8" else None,
              "fp8_quant": engine.options.fp8_quant if a.precision == "fp8" and a.compile == "inductor" else None,
              # the build's timing of the FP8 kernels (fp8.choose_kernel: candidates, batch invariance, failures)
              "fp8_choice": (engine.manifest.get("fp8") or {}).get("kernel") if a.precision == "fp8" else None,
              "attention_launch": a.attention_launch, "attention_block_n": engine.options.attention_block_n,
              "split_reductions": engine.options.split_reductions,
              "context": a.context, "compile": a.compile,
              "copy_bandwidth_GBps": bw / 1e9,
              "matmul_TFLOPs": tflops,
              "steps": profile_engine(engine, [a.context], batches, a.steps.split(","), a.iters, bw, a.top,
                                      log=lambda m: print(m, flush=True), matmul_rate=rate)}
    Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    engine.close()
    return report


def reread(a) -> dict:
    """A profile of the replaced cycle profiler (``batches`` → {replay_ms, kernels}) with kinds and floors added."""
    old = json.loads(Path(a.src).read_text())
    gbps = a.bandwidth or json.loads(Path(a.bandwidth_from).read_text())["copy_bandwidth_GBps"]
    bw = gbps * 1e9
    cfg = qwen3_config(old["shape"])
    # only the shapes and dtypes matter to the floors: the engine's bf16 tensors, unallocated
    weights = {n: torch.empty(shape, dtype=torch.bfloat16, device="meta") for n, shape in engine_shapes(cfg).items()}
    report = {k: old[k] for k in ("device", "torch", "shape", "context", "compile") if k in old}
    rate = a.matmul_tflops * 1e12 if a.matmul_tflops else None
    report.update(source=a.src, copy_bandwidth_GBps=bw / 1e9, bandwidth_source=a.bandwidth_from or "--bandwidth",
                  matmul_TFLOPs=a.matmul_tflops, steps={})
    for b, r in old["batches"].items():
        bounds = bounds_ms(cfg, weights, "cycle", old["context"], int(b), 2, bw, rate)
        out = breakdown(r["kernels"], floors_of(bounds), r["replay_ms"])
        out["bounds_ms"] = bounds
        report["steps"][f"cycle batch {b}"] = out
        print("\n".join(table(f"cycle batch {b}", out)))
    Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", default="verify,draft,cycle")
    ap.add_argument("--precision", choices=["bf16", "fp8"], default="bf16",
                    help="fp8: e4m3 linear layers as an FP8 build makes them (the GEMM floor is then bytes only)")
    ap.add_argument("--fp8-kernel", default=None,
                    help="with --precision fp8: the fp8_linear CUDA kernel (triton, triton-tma, triton-splitk, "
                         "torch._scaled_mm); default: what the build's timing picks")
    ap.add_argument("--fp8-quant", choices=["fused", "kernel"], default="fused",
                    help="compiled FP8 programs: quantization fused by Inductor (the runtime's default) or the op's "
                         "own launch (the comparison)")
    ap.add_argument("--compile", choices=["none", "inductor"], default="none")
    ap.add_argument("--attention-launch", default="", help="the engine option attention_launch (Launch.from_spec, "
                    "e.g. programs_per_sm=1; default: the kernels' own launch)")
    ap.add_argument("--attention-block-n", type=int, default=None, help="the engine option attention_block_n (keys a "
                    "split-kernel iteration: 64 or 32; default: the kernels' own)")
    ap.add_argument("--no-split-reductions", action="store_true", help="the engine option split_reductions off "
                    "(compiled programs: no reduction split into partial ones)")
    ap.add_argument("--iters", type=int, default=30, help="graph replays timed per step (median)")
    ap.add_argument("--top", type=int, default=12, help="kernels kept per step in the JSON")
    ap.add_argument("--from", dest="src", default=None, help="re-read an earlier profile instead of measuring")
    ap.add_argument("--bandwidth-from", default=None)
    ap.add_argument("--bandwidth", type=float, default=None, help="GB/s (with --from)")
    ap.add_argument("--matmul-tflops", type=float, default=None,
                    help="bf16 matmul rate of that device in TFLOP/s (with --from): adds the GEMMs' compute bound")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.src:
        if not (a.bandwidth or a.bandwidth_from):
            ap.error("--from needs --bandwidth-from or --bandwidth (the device's measured copy bandwidth)")
        reread(a)
    else:
        measure(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
