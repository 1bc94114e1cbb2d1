"""FP8 engines: build-time weight quantization and the GPU kernel choice for ``orthrus::fp8_linear``.

Every linear layer of both attention sets and the MLP (``*.qkv``, ``*.o``, ``gate_up``, ``down``) is stored as
``float8_e4m3fn`` with a float32 per-output-channel scale (``<name>.scale``, absmax / 448). The head stays BF16
unless ``fp8_lm_head`` (then a quantized copy ``lm_head`` + ``lm_head.scale``; a tied embedding stays BF16 for the
lookup). Embeddings, norms, activations and the KV cache are BF16; activations are quantized per token on the fly.
"""

import statistics

import torch

from orthrus_plugins import fp8_linear as op

LINEAR_SUFFIXES = (".qkv", ".o", ".gate_up", ".down")


def quantize_engine_weights(cfg, weights: dict, fp8_lm_head: bool, device: torch.device) -> tuple[dict, dict]:
    out = {}
    for name, t in weights.items():
        if name.endswith(LINEAR_SUFFIXES):
            q, s = op.quantize_weight(t.to(device))
            out[name], out[name + ".scale"] = q.cpu(), s.cpu()
        else:
            out[name] = t
    if fp8_lm_head:
        head = weights["embed"] if cfg.tie_word_embeddings else weights["lm_head"]
        q, s = op.quantize_weight(head.to(device))
        out["lm_head"], out["lm_head.scale"] = q.cpu(), s.cpu()
    record = {"weights": "float8_e4m3fn, per-output-channel absmax scales (float32), computed at build",
              "activations": "float8_e4m3fn, per-token absmax scales, on the fly",
              "quantized": [s.lstrip(".") for s in LINEAR_SUFFIXES] + (["lm_head"] if fp8_lm_head else []),
              "lm_head": "fp8" if fp8_lm_head else "bf16", "calibration": None,
              "kernel": choose_kernel(cfg, device) if device.type == "cuda" else
              {"name": "reference", "note": "float32 arithmetic on the CPU (emulated FP8 engine)"}}
    return out, record


def choose_kernel(cfg, device, iters: int = 30) -> dict:
    """Time the candidate CUDA kernels of ``orthrus::fp8_linear`` at M = 1 and M = 32 on the model's largest
    projection (gate_up) and pick the faster (sum of both). Candidates: ``torch._scaled_mm`` (tensor-core FP8)
    and the reference arithmetic (dequantize to float32 and multiply) — the floor any kernel must beat."""
    from orthrus_export.bench import time_it
    n, k = 2 * cfg.intermediate_size, cfg.hidden_size
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
    q, s = op.quantize_weight(w)
    timings = {}
    for name, fn in (("torch._scaled_mm", op.scaled_mm), ("reference", op._reference)):
        timings[name] = {}
        for m in (1, 32):
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            timings[name][f"M={m}"] = round(statistics.median(time_it(lambda: fn(x, q, s), iters, device=device)), 5)
    best = min(timings, key=lambda c: sum(timings[c].values()))
    return {"name": best, "candidates_ms": timings, "shape": [n, k],
            "note": "torch._scaled_mm needs K and N multiples of 16; other shapes use the reference"}
