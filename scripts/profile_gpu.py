"""Where a pass's time goes: GPU kernel time by kind (GEMM, attention plugin, other) for one verify and one draft
pass at a Qwen3 shape (random weights, bf16), from torch.profiler over eager calls of the traced programs.

    python scripts/profile_gpu.py --shape 8b --context 4096 --out benchmarks/h100-profile-8b.json
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orthrus_export.bench import build_random, copy_bandwidth, kv_bytes, pass_bytes  # noqa: E402


def kind(name: str) -> str:
    n = name.lower()
    if "_split_kernel" in n or "_merge_kernel" in n:
        return "attention plugin (Triton)"
    if "gemm" in n or "gemv" in n or "cutlass" in n or "sm90_xmma" in n or "nvjet" in n or "splitk" in n:
        return "GEMM"
    if "index_copy" in n or "indexcopy" in n:
        return "cache write"
    return "other (elementwise, norms, rope, argmax, copies)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    bw = copy_bandwidth(torch.device("cuda"))
    cfg, engine, _, _, _ = build_random(a.shape, torch.bfloat16, a.context + 64)
    block = torch.randint(0, cfg.vocab_size, (cfg.block_size,), device="cuda")
    result = {"device": torch.cuda.get_device_name(0), "shape": a.shape, "context": a.context,
              "copy_bandwidth_GBps": bw / 1e9, "passes": {}}
    for name, view in (("verify", "ar"), ("draft", "diff")):
        with torch.inference_mode():
            for _ in range(3):
                engine.run_pass(name, block, a.context)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    engine.run_pass(name, block, a.context)
                torch.cuda.synchronize()
        per_kind, count = defaultdict(float), defaultdict(int)
        top = defaultdict(float)
        for ev in prof.key_averages():
            if ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
            t = ev.device_time_total / 10 / 1e3  # ms per pass
            per_kind[kind(ev.key)] += t
            count[kind(ev.key)] += ev.count // 10
            top[ev.key[:90]] += t
        floor = (pass_bytes(cfg, engine.weights, view) + kv_bytes(cfg, a.context, 2)) / bw * 1e3
        result["passes"][name] = {"floor_ms": floor, "kernel_ms_by_kind": dict(per_kind),
                                  "kernels_per_pass_by_kind": dict(count),
                                  "kernel_ms_total": sum(per_kind.values()),
                                  "top_kernels_ms": dict(sorted(top.items(), key=lambda kv: -kv[1])[:12])}
        r = result["passes"][name]
        print(f"{name}: floor {floor:.2f} ms, kernel time {r['kernel_ms_total']:.2f} ms "
              f"({sum(count.values())} kernels)", flush=True)
        for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1]):
            print(f"   {v:7.3f} ms  {count[k]:5d} kernels  {k}")
        for k, v in list(r["top_kernels_ms"].items())[:6]:
            print(f"   top {v:7.3f} ms  {k}")
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
