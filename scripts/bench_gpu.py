"""GPU benchmark: Orthrus engines at the real Qwen3-1.7B/4B/8B shapes (random weights) and the trained ``tiny``.

    python scripts/bench_gpu.py --out benchmarks/h100.json [--shapes 1.7b,4b,8b] [--contexts 512,4096,16384,32768]

Measures in one run, on one GPU: the device-to-device copy bandwidth (bytes read + written); per shape and context,
the draft pass, the verify pass, a whole greedy cycle and an AR decode step, each a CUDA-graph replay timed with
CUDA events (median of --iters after warm-up); their ratio to the floor (weight bytes the pass reads + KV bytes,
over the measured bandwidth); tokens/s at given acceptance lengths; peak GPU memory; `transformers` AR `generate`
tokens/s (512-token prompt). Random weights cost what trained ones cost per pass; acceptance comes from `tiny`.
"""

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orthrus_export.bench import bench_engine, build_random, copy_bandwidth, hf_generate_tokens_per_s  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="1.7b,4b,8b")
    ap.add_argument("--contexts", default="512,4096,16384,32768")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--acceptance", default="9.6,11.7")
    ap.add_argument("--tiny-acceptance", type=float, default=None, help="tiny's measured acceptance length")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--compile", action="store_true", help="Inductor-compile the passes before graph capture")
    ap.add_argument("--autotune", action="store_true",
                    help="pick backend and attention splits with the build's autotuner (at the --contexts)")
    ap.add_argument("--no-tiny", action="store_true")
    ap.add_argument("--precisions", default="bf16", help="bf16,fp8: FP8 results go under '<shape>-fp8', with "
                                                         "their ratio to the BF16 figures of the same run")
    a = ap.parse_args()
    contexts = [int(c) for c in a.contexts.split(",")]
    if a.tiny_acceptance is None:  # tiny's measured acceptance (scripts/eval_tiny.py), if it has been measured
        ev = Path(__file__).resolve().parents[1] / "orthrus_export" / "assets" / "tiny" / "eval.json"
        if ev.exists():
            a.tiny_acceptance = json.loads(ev.read_text())["full"]["acceptance_length_token_weighted"]
    acc = [float(x) for x in a.acceptance.split(",")]
    import transformers
    import triton
    result = {"device": torch.cuda.get_device_name(0), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "triton": triton.__version__},
              "method": "CUDA-graph replays timed with CUDA events, median of --iters after 5 warm-ups; floor = "
                        "(weight bytes of the pass + KV bytes) / measured copy bandwidth", "iters": a.iters}
    result["copy_bandwidth_GBps"] = copy_bandwidth(torch.device("cuda")) / 1e9
    print(f"{result['device']}: device copy bandwidth {result['copy_bandwidth_GBps']:.0f} GB/s", flush=True)
    result["shapes"] = {}
    runs = [(n, p) for n in a.shapes.split(",") for p in a.precisions.split(",")]
    for name, precision in runs:
        key = name if precision == "bf16" else f"{name}-{precision}"
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cfg, engine, export_s, capture_s, tuning = build_random(
            name, torch.bfloat16, max(contexts), a.compile, contexts if a.autotune else None, precision=precision)
        print(f"qwen3-{name} {precision}: export {export_s:.1f} s, load+capture {capture_s:.1f} s", flush=True)
        r = bench_engine(engine, cfg, contexts, a.iters, result["copy_bandwidth_GBps"] * 1e9, acc,
                         a.tiny_acceptance)
        r["export_s"], r["capture_s"] = export_s, capture_s
        r["options"] = engine.options.to_dict()
        r["tuning"] = tuning
        r["peak_gpu_memory_GB"] = torch.cuda.max_memory_allocated() / 1e9
        r["kv_cache_GB"] = 2 * engine.k_cache.numel() * engine.k_cache.element_size() / 1e9
        r["diffusion_view_persistent_kv_GB"] = 0.0  # the draft pass writes no cache: one cache serves both views
        r["precision"] = precision
        r["weights_GB"] = sum(t.numel() * t.element_size() for k, t in engine.weights.items()
                              if not k.startswith("rope.")) / 1e9
        if precision == "fp8":
            from orthrus_export.fp8 import choose_kernel
            r["fp8_kernel"] = engine.options.fp8_kernel
            r["fp8_kernel_timing"] = choose_kernel(cfg, torch.device("cuda"))
            base = result["shapes"].get(name)
            if base:
                r["cycle_vs_bf16"] = [f["ms"]["cycle"] / b["ms"]["cycle"]
                                      for f, b in zip(r["contexts"], base["contexts"])]
                print("  fp8 cycle / bf16 cycle: " + ", ".join(
                    f"{x:.3f} @ {c}" for x, c in zip(r["cycle_vs_bf16"], contexts)), flush=True)
        del engine
        torch.cuda.empty_cache()
        if not a.no_hf and precision == "bf16":
            r["transformers_generate_tokens_per_s"] = hf_generate_tokens_per_s(cfg, torch.bfloat16)
            print(f"  transformers generate (512-token prompt): {r['transformers_generate_tokens_per_s']:.1f} tok/s",
                  flush=True)
        result["shapes"][key] = r
        Path(a.out).write_text(json.dumps(result, indent=1))
    result["compile"] = "autotuned" if a.autotune else "inductor" if a.compile else "none"
    if not a.no_tiny:
        result["tiny"] = bench_tiny(a.iters, result["copy_bandwidth_GBps"] * 1e9, acc)
    Path(a.out).write_text(json.dumps(result, indent=1))


def bench_tiny(iters, bandwidth, acc):
    """The trained tiny model as a built bf16 GPU engine: real acceptance on its held-out prompts, real tokens/s."""
    import tempfile

    from orthrus_export.builder import build
    from orthrus_export.checkpoint import TINY_DIR
    from orthrus_runtime import Engine
    prompts = json.loads((TINY_DIR / "heldout_prompts.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine.load(build("tiny", gpu="auto", precision="bf16", out=Path(tmp) / "e", max_seq_len=1024,
                                   progress=False))
        cycles = tokens = 0
        decode_s = ar_s = 0.0
        ar_tokens = 0
        for p in prompts:
            r = engine.generate(p["text"], max_new_tokens=128)
            ar = engine.generate(p["text"], max_new_tokens=128, use_drafts=False)
            cycles += r.stats.cycles
            tokens += r.stats.cycle_tokens
            decode_s += r.stats.decode_s
            ar_s += ar.stats.decode_s
            ar_tokens += ar.stats.new_tokens - 1
        out = {"prompts": len(prompts), "acceptance_length": tokens / cycles,
               "orthrus_decode_tokens_per_s": tokens / decode_s, "ar_decode_tokens_per_s": ar_tokens / ar_s}
        print(f"tiny (bf16 engine): acceptance {out['acceptance_length']:.2f}, Orthrus "
              f"{out['orthrus_decode_tokens_per_s']:.0f} tok/s vs AR {out['ar_decode_tokens_per_s']:.0f} tok/s "
              "(host loop, one read per cycle)", flush=True)
        out.update(bench_engine(engine, engine.config, [128, 512], iters, bandwidth, acc, out["acceptance_length"]))
        return out


if __name__ == "__main__":
    main()
