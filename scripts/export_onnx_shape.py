"""Export the ONNX graphs of a published Qwen3 shape with random weights (external data), on the CPU.

    python scripts/export_onnx_shape.py --shape 1.7b --out /tmp/onnx-1.7b --json benchmarks/onnx-export-1.7b.json

Traces the draft/verify/decode programs exactly as a build does, converts them (orthrus-domain nodes, then
``--decompose``d), writes one shared ``weights.bin`` per variant, runs onnx.checker's full check and strict shape
inference on every graph, and reports wall time per step, the process's peak resident memory and the file sizes.
"""

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orthrus_export.bench import qwen3_config  # noqa: E402
from orthrus_export.exporter import PROGRAMS, export_program  # noqa: E402
from orthrus_runtime.program import program_weights  # noqa: E402
from orthrus_export.onnx_export import write_graphs  # noqa: E402
from orthrus_export.weights import engine_shapes  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1.7b", choices=["1.7b", "4b", "8b"])
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--max-seq-len", type=int, default=4096)
    ap.add_argument("--out", required=True)
    ap.add_argument("--json")
    a = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.precision]
    cfg = qwen3_config(a.shape)
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    report = {"shape": a.shape, "precision": a.precision, "max_seq_len": a.max_seq_len, "torch": torch.__version__,
              "steps_s": {}, "variants": {}}
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    weights = {}
    for name, shape in engine_shapes(cfg).items():
        weights[name] = (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02).to(dtype)
    capacity = a.max_seq_len + cfg.block_size
    weights = program_weights(cfg, weights, capacity)
    report["weight_bytes"] = sum(t.numel() * t.element_size() for t in weights.values())
    report["steps_s"]["random weights"] = round(time.perf_counter() - t0, 1)
    print(f"qwen3-{a.shape} {a.precision}: {report['weight_bytes'] / 1e9:.2f} GB of weights", flush=True)
    t0 = time.perf_counter()
    programs = {name: export_program(cfg, weights, name, capacity) for name in PROGRAMS}
    report["steps_s"]["torch.export (3 programs)"] = round(time.perf_counter() - t0, 1)
    print(f"traced in {report['steps_s']['torch.export (3 programs)']} s", flush=True)
    for variant, decompose in (("orthrus", False), ("decomposed", True)):
        d = out / variant
        d.mkdir(parents=True)
        t0 = time.perf_counter()
        write_graphs(programs, cfg, weights, d, decompose, external=True, progress=print)
        secs = round(time.perf_counter() - t0, 1)
        files = {p.name: p.stat().st_size for p in sorted(d.iterdir())}
        report["variants"][variant] = {"convert_write_check_s": secs, "file_bytes": files}
        print(f"{variant}: {secs} s; " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in files.items()), flush=True)
    report["peak_rss_GB"] = round(peak_rss_gb(), 2)
    print(f"peak resident memory {report['peak_rss_GB']} GB", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
