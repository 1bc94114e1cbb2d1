"""Benchmark core: per-pass and per-cycle latency of an engine against the memory-bandwidth floor.

Every measurement goes through ``Engine.time_step``: on CUDA the CUDA-graph replay decoding runs, timed with CUDA
events; on the CPU the same step body called directly, timed with the host clock. Medians after warm-up. Floor of a pass = (weight bytes it reads + KV bytes of the context) / the device copy
bandwidth measured in the same run (bytes read + written). Used by ``orthrus-export bench`` and
``scripts/bench_gpu.py``.
"""

import statistics
import time

import torch

from orthrus_runtime.config import ModelConfig
from orthrus_runtime.cycle import buckets_for, time_it
from orthrus_export.exporter import PROGRAMS, export_program
from orthrus_runtime.program import program_weights
from orthrus_export.weights import engine_shapes

QWEN3 = {  # the published base shapes (vocabulary 151936, head_dim 128, 8 KV heads)
    "1.7b": dict(hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16, tie_word_embeddings=True),
    "4b": dict(hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32, tie_word_embeddings=False),
}


def qwen3_config(name: str) -> ModelConfig:
    return ModelConfig(vocab_size=151936, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
                       max_position_embeddings=40960, block_size=32, mask_token_id=151669,
                       eos_token_ids=(151645,), **QWEN3[name])


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read and written."""
    n = (1 << 30) if device.type == "cuda" else (1 << 28)
    a = torch.empty(n, dtype=torch.uint8, device=device).random_()
    b = torch.empty_like(a)
    times = time_it(lambda: b.copy_(a), 20, device=device)
    return 2 * n / (statistics.median(times) / 1e3)


def random_weights(cfg: ModelConfig, dtype) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    w = {}
    for name, shape in engine_shapes(cfg).items():
        if len(shape) == 1:
            w[name] = torch.ones(shape, device="cuda", dtype=dtype)
        else:
            w[name] = (torch.randn(shape, device="cuda", generator=g, dtype=torch.float32) * 0.02).to(dtype)
    return w


def pass_bytes(cfg: ModelConfig, weights: dict, view: str) -> int:
    """Weight bytes one pass reads (its view's attention set, the MLPs, norms and the head; one embedding row)."""
    other = "diff" if view == "ar" else "ar"
    total = 0
    for name, t in weights.items():
        if f".{other}." in name or name.startswith("rope.") or name == "embed" and not cfg.tie_word_embeddings:
            continue
        total += t.numel() * t.element_size()
    return total


def pass_matrices(cfg: ModelConfig, weights: dict, view: str) -> list[torch.Tensor]:
    """The weight matrices one pass multiplies by: those ``pass_bytes`` counts that are matrices (the view's
    attention set, the MLPs, the head; the embedding lookup is a gather, counted only where it is also the head:
    tied, and no quantized ``lm_head`` copy)."""
    other = "diff" if view == "ar" else "ar"
    embed_is_head = cfg.tie_word_embeddings and "lm_head" not in weights
    return [t for name, t in weights.items() if t.dim() == 2 and f".{other}." not in name
            and not name.startswith("rope.") and (name != "embed" or embed_is_head)]


def pass_flops(cfg: ModelConfig, weights: dict, view: str, tokens: int, itemsize: int | None = None) -> int:
    """FLOPs of one pass's linear layers over ``tokens`` tokens: 2 per weight element per token over
    ``pass_matrices``; with ``itemsize``, over the matrices of that element size only (an FP8 engine's e4m3 layers
    are 1, its BF16 head 2: they multiply at different rates)."""
    return 2 * tokens * sum(t.numel() for t in pass_matrices(cfg, weights, view)
                            if itemsize is None or t.element_size() == itemsize)


def attention_flops(cfg: ModelConfig, ctx: int, tokens: int) -> int:
    """FLOPs of one pass's attention for ``tokens`` query tokens over ``ctx`` cached keys each: QKᵀ and PV, 2 each
    per query head, key and head dimension, in every layer (the block's own keys not counted: a lower bound)."""
    return 4 * cfg.num_layers * tokens * cfg.num_heads * cfg.head_dim * ctx


def matmul_dtypes(cfg: ModelConfig, weights: dict) -> dict[int, torch.dtype]:
    """Element size -> dtype of the matrices the passes multiply by (an FP8 engine has two: e4m3 and the head's)."""
    return {t.element_size(): t.dtype for view in ("ar", "diff") for t in pass_matrices(cfg, weights, view)}


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in ``dtype`` on ``device`` (8192 on a GPU, 1024 on the CPU): the compute
    roofline of a GEMM floor, measured like ``copy_bandwidth`` in the same run as the timings it bounds. e4m3:
    ``torch._scaled_mm`` with unit scales and a bf16 product (Hopper's FP8 tensor cores, about twice the bf16 rate;
    on the CPU whatever torch runs, not the engine's emulated op)."""
    n = 8192 if device.type == "cuda" else 1024
    g = torch.Generator(device=device).manual_seed(0)
    fp8 = dtype == torch.float8_e4m3fn
    draw = torch.bfloat16 if fp8 else dtype  # drawn in a 2-byte (or the) dtype: no float32 copies on the GPU
    a = torch.randn(n, n, device=device, generator=g, dtype=draw).to(dtype)
    b = torch.randn(n, n, device=device, generator=g, dtype=draw).to(dtype)
    if fp8:
        one, bt = torch.ones((), device=device), b.t()  # _scaled_mm takes its second operand column-major
        times = time_it(lambda: torch._scaled_mm(a, bt, one, one, out_dtype=torch.bfloat16), 10, device=device)
    else:
        times = time_it(lambda: torch.mm(a, b), 10, device=device)
    return 2 * n ** 3 / (statistics.median(times) / 1e3)


def matmul_rates(device: torch.device, cfg: ModelConfig, weights: dict) -> dict[int, float]:
    """``matmul_rate`` for each element size of the matrices the passes multiply by: the rates
    ``profile.bounds_ms`` takes (FLOPs of each size over its own rate)."""
    return {size: matmul_rate(device, dtype) for size, dtype in sorted(matmul_dtypes(cfg, weights).items())}


def rates_tflops(cfg: ModelConfig, weights: dict, rates: dict[int, float]) -> dict[str, float]:
    """``matmul_rates``'s rates in TFLOP/s by dtype name (``{"bfloat16": …, "float8_e4m3fn": …}``), as reports
    print and store them."""
    dtypes = matmul_dtypes(cfg, weights)
    return {str(dtypes[s]).removeprefix("torch."): r / 1e12 for s, r in rates.items()}


def kv_bytes(cfg: ModelConfig, ctx: int, elem: int) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * ctx * elem


def bench_engine(engine, cfg, contexts, iters, bandwidth, acceptance_lengths, tiny_acceptance=None, log=print,
                 sampled: bool = True):
    """Per-pass and per-step latency at each context, through the engine's public ``time_step`` (the CUDA-graph
    replays decoding runs). With ``sampled``, also the sampled cycle (T 0.6, top-k 20, top-p 0.95)."""
    elem = engine.k_cache.element_size()
    engine.k_cache.normal_()
    engine.v_cache.normal_()
    w_ar, w_diff = pass_bytes(cfg, engine.weights, "ar"), pass_bytes(cfg, engine.weights, "diff")
    rows = []
    for ctx in contexts:
        t = {k: engine.time_step(k, ctx, iters) for k in ("draft", "verify", "cycle", "decode")}
        if sampled:
            t["sampled_cycle"] = engine.time_step("cycle", ctx, iters, sampled=True)
        kv = kv_bytes(cfg, ctx, elem)
        floor = {"draft": (w_diff + kv) / bandwidth * 1e3, "verify": (w_ar + kv) / bandwidth * 1e3,
                 "decode": (w_ar + kv) / bandwidth * 1e3}
        floor["cycle"] = floor["sampled_cycle"] = floor["draft"] + floor["verify"]
        row = {"context": ctx, "ms": t, "floor_ms": floor,
               "ratio_to_floor": {k: t[k] / floor[k] for k in t},
               "cycle_over_single_pass_floor": t["cycle"] / floor["verify"],
               "ar_decode_tokens_per_s": 1e3 / t["decode"],
               "orthrus_tokens_per_s": {str(a): a * 1e3 / t["cycle"] for a in acceptance_lengths}}
        if tiny_acceptance:
            row["orthrus_tokens_per_s"][f"tiny {tiny_acceptance:.2f}"] = tiny_acceptance * 1e3 / t["cycle"]
        rows.append(row)
        extra = f"  sampled cycle {t['sampled_cycle']:.3f} ms" if sampled else ""
        log(f"  ctx {ctx:6d}: draft {t['draft']:.3f} ms ({t['draft'] / floor['draft']:.2f}x floor)  verify "
            f"{t['verify']:.3f} ms ({t['verify'] / floor['verify']:.2f}x)  cycle {t['cycle']:.3f} ms "
            f"({row['cycle_over_single_pass_floor']:.2f}x single-pass floor){extra}  AR step {t['decode']:.3f} ms")
    return {"weight_bytes": {"ar_pass": w_ar, "draft_pass": w_diff}, "contexts": rows}


def bench_batches(engine, contexts, batches, iters, acceptance_lengths, log=print, sampled: bool = True,
                  bandwidth: float | None = None, matmul_rate: float | dict | None = None) -> dict:
    """Cycle latency over ``b`` sequences (each at the context, in slots 0 … b-1) for each batch size: the CUDA-graph
    replay of the bucket decoding runs. Reports each size's ratio to batch 1 (the first size given when 1 is not
    among them), the aggregate tokens/s at each acceptance length (b × acceptance / cycle) and, given the copy
    ``bandwidth`` (and a ``matmul_rate``), the cycle's floor at that size (``profile.floors_ms``: weight bytes or
    FLOPs, whichever binds, plus every row's K/V) and the cycle's ratio to it."""
    from orthrus_export.profile import floors_ms  # profile builds on this module's byte and FLOP counts
    engine.k_cache.normal_()
    engine.v_cache.normal_()
    elem = engine.k_cache.element_size()
    rows = []
    for ctx in contexts:
        base = None
        for b in batches:
            t = {"cycle": engine.time_step("cycle", ctx, iters, batch=b)}
            if sampled:
                t["sampled_cycle"] = engine.time_step("cycle", ctx, iters, sampled=True, batch=b)
            base = base or t
            row = {"context": ctx, "batch": b, "bucket": engine.steps.bucket(b), "ms": t,
                   "ratio_to_first": {k: t[k] / base[k] for k in t},
                   "aggregate_tokens_per_s": {str(a): b * a * 1e3 / t["cycle"] for a in acceptance_lengths}}
            floor = ""
            if bandwidth:
                row["floor_ms"] = sum(floors_ms(engine.config, engine.weights, "cycle", ctx, b, elem, bandwidth,
                                                matmul_rate).values())
                row["cycle_over_floor"] = t["cycle"] / row["floor_ms"]
                floor = f", {row['cycle_over_floor']:.2f}x its {row['floor_ms']:.3f} ms floor"
            rows.append(row)
            extra = f"  sampled {t['sampled_cycle']:.3f} ms ({row['ratio_to_first']['sampled_cycle']:.2f}x)" \
                if sampled else ""
            tps = ", ".join(f"{v:,.0f} tok/s at {k}" for k, v in row["aggregate_tokens_per_s"].items())
            log(f"  ctx {ctx:6d} batch {b:3d}: cycle {t['cycle']:.3f} ms ({row['ratio_to_first']['cycle']:.2f}x "
                f"batch {batches[0]}{floor}){extra}  {tps}")
    return {"batches": rows}


def hf_generate_tokens_per_s(cfg: ModelConfig, dtype, prompt_len=512, new=32) -> float:
    from transformers import Qwen3Config, Qwen3ForCausalLM
    hf = Qwen3Config(**cfg.hf_config_dict())
    hf._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(hf).eval()
    torch.set_default_dtype(old)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), device="cuda")
    kw = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, **kw)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    del model
    torch.cuda.empty_cache()
    return new / dt


def build_random(name, dtype, max_ctx, compile=False, autotune_contexts=None, log=print, precision="bf16",
                 max_batch_size: int = 1, fp8_kernel: str | None = None, fp8_quant: str = "fused",
                 attention_launch: str = "", attention_block_n: int | None = None, split_reductions: bool = True):
    """An in-memory engine at a published shape with random weights, run by the same ``orthrus_runtime.Engine``.
    With ``autotune_contexts`` the build-time autotuner picks the backend (``compile`` ignored) and the attention
    splits, as ``orthrus-export build`` does; ``fp8_kernel`` overrides the FP8 kernel the build's timing picks,
    ``fp8_quant`` the compiled programs' activation quantization ("kernel": the op's own launch, for comparisons),
    ``attention_launch`` the engine option of that name (``Launch.from_spec``), ``attention_block_n`` that one (None:
    its default), ``split_reductions`` that one (compiled programs).
    Returns ``(cfg, engine, export seconds, load seconds, tuning record or None)``."""
    from orthrus_runtime import Engine
    from orthrus_runtime.program import KernelOptions
    cfg = qwen3_config(name)
    weights = random_weights(cfg, dtype)
    fp8 = None
    if precision == "fp8":  # e4m3 linear layers with per-channel scales, as an FP8 build makes them (head bf16)
        from orthrus_export.fp8 import quantize_engine_weights
        weights, fp8 = quantize_engine_weights(cfg, weights, False, torch.device("cuda"), keep_on_device=True,
                                               max_batch_size=max_batch_size)
    max_seq_len = max_ctx + 2 * cfg.block_size
    capacity = max_seq_len + cfg.block_size
    full = program_weights(cfg, weights, capacity)
    t0 = time.perf_counter()
    programs = {p: export_program(cfg, full, p, capacity, slots=max_batch_size + 1, max_rows=max_batch_size)
                for p in PROGRAMS}
    export_s = time.perf_counter() - t0
    options = KernelOptions(backend="inductor" if compile and not autotune_contexts else "none",
                            compute_dtype=str(dtype).removeprefix("torch."),
                            fp8_kernel=fp8_kernel or (fp8 or {}).get("kernel", {}).get("name", "auto"),
                            fp8_quant=fp8_quant, attention_launch=attention_launch, split_reductions=split_reductions,
                            **({} if attention_block_n is None else {"attention_block_n": attention_block_n}))
    manifest = {"name": f"qwen3-{name}", "precision": precision, "model": {"config": cfg.to_dict()}, "fp8": fp8,
                "build": {"max_seq_len": max_seq_len, "cache_capacity": capacity, "options": options.to_dict(),
                          "max_batch_size": max_batch_size, "batch_buckets": list(buckets_for(max_batch_size))}}
    t0 = time.perf_counter()
    engine = Engine(manifest["name"], manifest, torch.device("cuda"), full, programs, None, options)
    load_s = time.perf_counter() - t0
    if autotune_contexts:
        from orthrus_export.autotune import autotune
        engine, tuning = autotune(engine, ["none", "inductor"], autotune_contexts, log=log)
        return cfg, engine, export_s, tuning["prepare_seconds"][tuning["backend"]], tuning
    return cfg, engine, export_s, load_s, None
