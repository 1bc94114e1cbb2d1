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
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orthrus_export.config import ModelConfig  # noqa: E402
from orthrus_export.exporter import PROGRAMS, export_program  # noqa: E402
from orthrus_export.model import rope_tables  # noqa: E402
from orthrus_export.weights import engine_shapes  # noqa: E402
from orthrus_runtime import Engine  # noqa: E402

QWEN3 = {  # the published base shapes (vocabulary 151936, head_dim 128, 8 KV heads)
    "1.7b": dict(hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16, tie_word_embeddings=True),
    "4b": dict(hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32, tie_word_embeddings=False),
}


def qwen3_config(name: str) -> ModelConfig:
    return ModelConfig(vocab_size=151936, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
                       max_position_embeddings=40960, block_size=32, mask_token_id=151669,
                       eos_token_ids=(151645,), **QWEN3[name])


def copy_bandwidth() -> float:
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    times = time_it(lambda: b.copy_(a), 20)
    return 2 * n / (statistics.median(times) / 1e3)


def time_it(fn, iters, warmup=5) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e))
    return out


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


def kv_bytes(cfg: ModelConfig, ctx: int, elem: int) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * ctx * elem


class PassGraphs:
    """Standalone graphs of one draft pass and one verify pass (the cycle graph lives in the engine)."""

    def __init__(self, engine):
        lp = engine.loop
        self.block = torch.randint(0, engine.config.vocab_size, (engine.block_size,), device="cuda")
        self.s = engine.loop.graphs.s
        self.graphs = {}
        for name in ("draft", "verify"):
            def body(name=name):
                lp.programs[name](lp.w, self.block, self.s, lp.k_cache, lp.v_cache)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                body()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                body()
            self.graphs[name] = g


def bench_engine(engine, cfg, contexts, iters, bandwidth, acceptance_lengths, tiny_acceptance=None):
    g = engine.loop.graphs
    passes = PassGraphs(engine)
    elem = engine.k_cache.element_size()
    engine.k_cache.normal_()
    engine.v_cache.normal_()
    w_ar, w_diff = pass_bytes(cfg, engine.weights, "ar"), pass_bytes(cfg, engine.weights, "diff")
    rows = []
    for ctx in contexts:
        def at(fn):
            def run():
                g.s.fill_(ctx)
                fn()
            return run
        g.start(5, ctx, [])
        t = {"draft": statistics.median(time_it(at(passes.graphs["draft"].replay), iters)),
             "verify": statistics.median(time_it(at(passes.graphs["verify"].replay), iters)),
             "cycle": statistics.median(time_it(at(g.cycle.replay), iters)),
             "decode": statistics.median(time_it(at(g.decode.replay), iters))}
        kv = kv_bytes(cfg, ctx, elem)
        floor = {"draft": (w_diff + kv) / bandwidth * 1e3, "verify": (w_ar + kv) / bandwidth * 1e3,
                 "decode": (w_ar + kv) / bandwidth * 1e3}
        floor["cycle"] = floor["draft"] + floor["verify"]
        row = {"context": ctx, "ms": t, "floor_ms": floor,
               "ratio_to_floor": {k: t[k] / floor[k] for k in t},
               "cycle_over_single_pass_floor": t["cycle"] / floor["verify"],
               "ar_decode_tokens_per_s": 1e3 / t["decode"],
               "orthrus_tokens_per_s": {str(a): a * 1e3 / t["cycle"] for a in acceptance_lengths}}
        if tiny_acceptance:
            row["orthrus_tokens_per_s"][f"tiny {tiny_acceptance:.2f}"] = tiny_acceptance * 1e3 / t["cycle"]
        rows.append(row)
        print(f"  ctx {ctx:6d}: draft {t['draft']:.3f} ms ({t['draft'] / floor['draft']:.2f}x floor)  verify "
              f"{t['verify']:.3f} ms ({t['verify'] / floor['verify']:.2f}x)  cycle {t['cycle']:.3f} ms "
              f"({row['cycle_over_single_pass_floor']:.2f}x single-pass floor)  AR step {t['decode']:.3f} ms",
              flush=True)
    return {"weight_bytes": {"ar_pass": w_ar, "draft_pass": w_diff}, "contexts": rows}


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


def build_random(name, dtype, max_ctx):
    cfg = qwen3_config(name)
    weights = random_weights(cfg, dtype)
    capacity = max_ctx + 2 * cfg.block_size
    cos, sin = rope_tables(cfg, capacity + cfg.block_size)
    full = dict(weights)
    full["rope.cos"], full["rope.sin"] = cos.cuda(), sin.cuda()
    full = dict(sorted(full.items()))
    t0 = time.perf_counter()
    programs = {p: export_program(cfg, full, p, capacity + cfg.block_size).module() for p in PROGRAMS}
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine = Engine.from_parts(cfg, weights, programs, torch.device("cuda"), capacity, "bf16", f"qwen3-{name}")
    return cfg, engine, export_s, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="1.7b,4b,8b")
    ap.add_argument("--contexts", default="512,4096,16384,32768")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--acceptance", default="9.6,11.7")
    ap.add_argument("--tiny-acceptance", type=float, default=None, help="tiny's measured acceptance length")
    ap.add_argument("--no-hf", action="store_true")
    a = ap.parse_args()
    contexts = [int(c) for c in a.contexts.split(",")]
    acc = [float(x) for x in a.acceptance.split(",")]
    import transformers
    import triton
    result = {"device": torch.cuda.get_device_name(0), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "triton": triton.__version__},
              "method": "CUDA-graph replays timed with CUDA events, median of --iters after 5 warm-ups; floor = "
                        "(weight bytes of the pass + KV bytes) / measured copy bandwidth", "iters": a.iters}
    result["copy_bandwidth_GBps"] = copy_bandwidth() / 1e9
    print(f"{result['device']}: device copy bandwidth {result['copy_bandwidth_GBps']:.0f} GB/s", flush=True)
    result["shapes"] = {}
    for name in a.shapes.split(","):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cfg, engine, export_s, capture_s = build_random(name, torch.bfloat16, max(contexts))
        print(f"qwen3-{name}: export {export_s:.1f} s, load+capture {capture_s:.1f} s", flush=True)
        r = bench_engine(engine, cfg, contexts, a.iters, result["copy_bandwidth_GBps"] * 1e9, acc,
                         a.tiny_acceptance)
        r["export_s"], r["capture_s"] = export_s, capture_s
        r["peak_gpu_memory_GB"] = torch.cuda.max_memory_allocated() / 1e9
        r["kv_cache_GB"] = 2 * engine.k_cache.numel() * engine.k_cache.element_size() / 1e9
        r["diffusion_view_persistent_kv_GB"] = 0.0  # the draft pass writes no cache: one cache serves both views
        del engine
        torch.cuda.empty_cache()
        if not a.no_hf:
            r["transformers_generate_tokens_per_s"] = hf_generate_tokens_per_s(cfg, torch.bfloat16)
            print(f"  transformers generate (512-token prompt): {r['transformers_generate_tokens_per_s']:.1f} tok/s",
                  flush=True)
        result["shapes"][name] = r
        Path(a.out).write_text(json.dumps(result, indent=1))
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
