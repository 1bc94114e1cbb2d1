"""FP8 engines: build-time weight quantization and the GPU kernel choice for ``orthrus::fp8_linear``.

Every linear layer of both attention sets and the MLP (``*.qkv``, ``*.o``, ``gate_up``, ``down``) is stored as
``float8_e4m3fn`` with a float32 per-output-channel scale (``<name>.scale``, absmax / 448). The head stays BF16
unless ``fp8_lm_head`` (then a quantized copy ``lm_head`` + ``lm_head.scale``; a tied embedding stays BF16 for the
lookup). Embeddings, norms, activations and the KV cache are BF16; activations are quantized per token on the fly.
"""

from functools import partial

import torch

from orthrus_plugins import fp8_linear as op

LINEAR_SUFFIXES = (".qkv", ".o", ".gate_up", ".down")


def quantize_engine_weights(cfg, weights: dict, fp8_lm_head: bool, device: torch.device,
                            keep_on_device: bool = False, max_batch_size: int = 1) -> tuple[dict, dict]:
    """The engine's weights with the linear layers quantized, and the manifest's ``fp8`` record (the GPU kernel
    chosen by :func:`choose_kernel` for an engine whose passes hold up to ``max_batch_size`` blocks)."""
    out = {}
    home = (lambda t: t) if keep_on_device else (lambda t: t.cpu())
    for name, t in weights.items():
        if name.endswith(LINEAR_SUFFIXES):
            q, s = op.quantize_weight(t.to(device))
            out[name], out[name + ".scale"] = home(q), home(s)
        else:
            out[name] = t
    if fp8_lm_head:
        head = weights["embed"] if cfg.tie_word_embeddings else weights["lm_head"]
        q, s = op.quantize_weight(head.to(device))
        out["lm_head"], out["lm_head.scale"] = home(q), home(s)
    record = {"weights": "float8_e4m3fn, per-output-channel absmax scales (float32), computed at build",
              "activations": "float8_e4m3fn, per-token absmax scales, on the fly",
              "quantized": [s.lstrip(".") for s in LINEAR_SUFFIXES] + (["lm_head"] if fp8_lm_head else []),
              "lm_head": "fp8" if fp8_lm_head else "bf16", "calibration": None,
              "kernel": choose_kernel(cfg, device, max_rows=max_batch_size * cfg.block_size)
              if device.type == "cuda" else
              {"name": "reference", "note": "float32 arithmetic on the CPU (emulated FP8 engine)"}}
    return out, record


def timed_rows(block_size: int, max_rows: int) -> list[int]:
    """The row counts :func:`choose_kernel` times the kernels at: a decode step (1), a batch-1 pass (a block) and an
    engine's largest pass (``max_rows``: max batch size × block), ascending."""
    return sorted({1, block_size, max(max_rows, block_size)})


def choose_kernel(cfg, device, iters: int = 30, max_rows: int = 32) -> dict:
    """Time the CUDA kernels of ``orthrus::fp8_linear`` on the model's largest projection (gate_up) at M = 1 (a
    decode step), M = ``cfg.block_size`` (a batch-1 pass) and, for a batched engine, M = ``max_rows`` (its largest
    pass: max batch size × block), in CUDA graphs as an engine runs them, and pick the fastest (sum over those M) of
    the kernels that are batch-invariant (the rows of the largest call equal, bit for bit, the same rows computed one
    at a time): a verify block and a decode step must compute the same logits for Orthrus output to equal the
    engine's own AR output (DESIGN.md §2). Only when none is invariant the fastest of all, recorded as
    ``"exact_ar": False``. Timing batch-1 shapes only picked ``triton-splitk`` for an 8B batch-8 engine on the
    H100 (0.4% ahead at M = 1 and 32; its 32-row tiles made the batch-8 GEMMs 2.5× slower than ``triton``'s wide
    tiles: benchmarks/h100-2026-12-07-late-profile-8b-fp8-picked-b1-8-inductor.json)."""
    from orthrus_runtime.cycle import graph_time
    n, k = 2 * cfg.intermediate_size, cfg.hidden_size
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(n, k, device=device, generator=g).to(torch.bfloat16) * 0.02
    q, s = op.quantize_weight(w)
    ms = timed_rows(cfg.block_size, max_rows)
    xs = torch.randn(ms[-1], k, device=device, generator=g).to(torch.bfloat16)
    timings, invariant, failed = {}, {}, {}
    for name in op.MATMUL_KERNELS:
        if name == "reference":
            continue
        fn = partial(op.cuda_linear, kernel=name)
        try:
            times = {}
            for m in ms:
                x = xs[:m].contiguous()
                times[f"M={m}"] = round(graph_time(lambda i: fn(x, q, s), 1, 20, iters), 5)
            rows = torch.cat([fn(xs[i:i + 1].contiguous(), q, s) for i in range(ms[-1])])
            invariant[name] = bool(torch.equal(rows, fn(xs, q, s)))
        except Exception as e:  # noqa: BLE001  (a kernel this GPU or Triton cannot run is not a candidate)
            failed[name] = f"{type(e).__name__}: {str(e)[:200]}"
            continue
        timings[name] = times
    exact = [c for c in timings if invariant[c]]
    best = min(exact or timings, key=lambda c: sum(timings[c].values()))
    return {"name": best, "candidates_ms": timings, "batch_invariant": invariant, "exact_ar": bool(exact),
            **({"failed": failed} if failed else {}),
            "shape": [n, k],
            "note": "timed at build on this GPU (20 calls captured in a CUDA graph, median of 30 replays, per call): "
                    "eager calls timed the launches more than the kernels"}
