"""Where one batched cycle's GPU time goes, by kernel, at a Qwen3 shape (random weights, bf16).

    python scripts/profile_cycle.py --shape 8b --batches 1,8 --context 4096 --compile none --out prof.json

Per batch size: the graph-replay time of the greedy cycle (CUDA events, median), then torch.profiler over eager
calls of the same step body, kernels grouped by name (total CUDA time per call, launches per call), the top
``--top`` printed. The eager profile includes nothing the graph does not run; its sum exceeds the replay by the
launch gaps only.
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def profile_body(engine, rows: int, context: int, iters: int) -> dict:
    from orthrus_runtime.cycle import CHUNK, Row
    steps = engine.steps
    bucket = steps.bucket(rows)
    steps.fill([Row(slot=i, x=5, s=context) for i in range(rows)], bucket)
    steps.ints[:bucket, CHUNK:].random_(0, steps.vocab)
    with torch.no_grad():
        for _ in range(3):
            steps.body("cycle", False, bucket)
        torch.cuda.synchronize()
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(iters):
                steps.body("cycle", False, bucket)
            torch.cuda.synchronize()
    by_name = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_name[e.name][0] += e.device_time_total / 1e3 / iters
            by_name[e.name][1] += 1 / iters
    kernels = sorted(({"name": k[:160], "ms": v[0], "launches": round(v[1], 2)} for k, v in by_name.items()),
                     key=lambda r: -r["ms"])
    return {"kernel_ms_total": sum(k["ms"] for k in kernels), "launches": sum(k["launches"] for k in kernels),
            "kernels": kernels}


def main() -> int:
    from orthrus_export.bench import build_random
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--compile", choices=["none", "inductor"], default="none")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    cfg, engine, export_s, load_s, _ = build_random(a.shape, torch.bfloat16, a.context,
                                                    compile=a.compile == "inductor", max_batch_size=max(batches))
    print(f"qwen3-{a.shape}: traced {export_s:.1f} s, compiled+captured {load_s:.1f} s", flush=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": a.shape,
              "context": a.context, "compile": a.compile, "batches": {}}
    report["batch1_ms"] = {k: engine.time_step(k, a.context, 30) for k in ("cycle", "verify", "draft", "decode")}
    print("batch 1 replays: " + ", ".join(f"{k} {v:.3f} ms" for k, v in report["batch1_ms"].items()), flush=True)
    for b in batches:
        replay = engine.time_step("cycle", a.context, 20, batch=b)
        prof = profile_body(engine, b, a.context, a.iters)
        report["batches"][str(b)] = {"replay_ms": replay, **prof}
        print(f"batch {b}: replay {replay:.3f} ms; eager kernels {prof['kernel_ms_total']:.3f} ms in "
              f"{prof['launches']:.0f} launches", flush=True)
        for k in prof["kernels"][:a.top]:
            print(f"  {k['ms']:8.3f} ms {k['launches']:6.0f}x  {k['name'][:110]}", flush=True)
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
