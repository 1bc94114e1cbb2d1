"""FP8 GEMM choice for decoding (M = 1 and 32): bf16 F.linear vs torch._scaled_mm (e4m3 weights with per-output-
channel scales, activations quantized per token) at the Qwen3-8B projection shapes, on this GPU.

    python scripts/fp8_gemm_bench.py --out fp8_gemm.json

Each figure is the median of 50 CUDA-event-timed calls after warm-up, including the activation quantization for
fp8; floor = weight bytes / measured copy bandwidth. Also reports the max relative error of the fp8 product
against the bf16 product of the dequantized weights (the quantization error itself is not a kernel error).
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orthrus_export.bench import copy_bandwidth  # noqa: E402
from orthrus_runtime.cycle import time_it  # noqa: E402

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 24576), "down": (12288, 4096),
          "lm_head": (4096, 151936)}
E4M3_MAX = 448.0


def quantize_rows(x):
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    rows = []
    for name, (k, n) in SHAPES.items():
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        wq, ws = quantize_rows(w)  # [N, K] e4m3, [N, 1]
        wq_t = wq.t()  # column-major [K, N], what _scaled_mm wants for its second operand
        ws_row = ws.reshape(1, n)
        for m in (1, 32):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)

            def fp8():
                xq, xs = quantize_rows(x)
                return torch._scaled_mm(xq, wq_t, scale_a=xs, scale_b=ws_row, out_dtype=torch.bfloat16)
            ref = torch.nn.functional.linear(x, (wq.float() * ws).to(torch.bfloat16))
            err = float(((fp8().float() - ref.float()).abs().max() / ref.float().abs().max()))
            t_bf16 = statistics.median(time_it(lambda: torch.nn.functional.linear(x, w), 50))
            t_fp8 = statistics.median(time_it(fp8, 50))
            row = {"name": name, "k": k, "n": n, "m": m, "bf16_ms": t_bf16, "fp8_scaled_mm_ms": t_fp8,
                   "bf16_floor_ms": n * k * 2 / bw * 1e3, "fp8_floor_ms": n * k / bw * 1e3,
                   "fp8_rel_err_vs_dequantized_bf16": err}
            rows.append(row)
            print(f"{name:8s} M={m:2d}: bf16 {t_bf16 * 1e3:7.1f} us (floor {row['bf16_floor_ms'] * 1e3:6.1f})  "
                  f"fp8 _scaled_mm {t_fp8 * 1e3:7.1f} us (floor {row['fp8_floor_ms'] * 1e3:6.1f})  err {err:.2e}",
                  flush=True)
    Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                       "copy_bandwidth_GBps": bw / 1e9, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
