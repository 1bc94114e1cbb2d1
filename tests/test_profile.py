"""The step profiler (issue 14's "profile first"): kernels and operators sorted into kinds, each kind's floor, and
``Engine.profile_step`` on a real engine."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orthrus_export.bench import (attention_flops, kv_bytes, matmul_dtypes, matmul_rates, pass_bytes, pass_flops,
                                  qwen3_config)
from orthrus_export.weights import engine_shapes
from orthrus_export.profile import bounds_ms, breakdown, floors_ms, kind_of, table
from orthrus_runtime.errors import OrthrusError

ROOT = Path(__file__).resolve().parents[1]
H200_CYCLE = ROOT / "benchmarks" / "h200-profile-cycle-8b-none.json"  # measured on an H200 (8B, eager cycle)


def test_recorded_h200_kernels_fall_into_their_kinds():
    """On the kernels an H200 ran for one 8B cycle (36 layers, two passes): exactly the attention plugin's split and
    merge launches (2 kernels x 36 layers x 2 passes) are attention, and exactly the packed linear layers (QKV, O,
    gate/up, down per layer and pass, the head of each pass) and cuBLAS's split-K reduces are GEMMs."""
    prof = json.loads(H200_CYCLE.read_text())["batches"]["1"]["kernels"]
    launches = {k: 0.0 for k in ("gemm", "attention", "other")}
    for e in prof:
        launches[kind_of(e)] += e["launches"]
    reduces = sum(e["launches"] for e in prof if "splitKreduce" in e["name"])
    assert launches["attention"] == 2 * 36 * 2
    assert launches["gemm"] == 4 * 36 * 2 + 2 + reduces and reduces > 0
    assert kind_of({"name": "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, "
                            "at::native::MeanOps<float, float, float, float>"}) == "other"  # a norm, not fp8's reduce
    assert kind_of({"name": "_reduce_kernel"}) == kind_of({"name": "_quant_kernel"}) == "gemm"  # the fp8 linear's
    assert kind_of({"name": "_cache_write_kernel"}) == "attention"
    assert kind_of({"name": "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0"}) == "other"  # an Inductor norm


def test_floors_add_up_to_the_bench_floor(models):
    """gemm + attention floors of a step = the bench's floor of its passes (weights + K/V of every row)."""
    engine = models.engine("tiny")
    cfg, w, bw, ctx = engine.config, engine.weights, 1e12, 300
    elem = engine.k_cache.element_size()
    for step, views in (("verify", ["ar"]), ("draft", ["diff"]), ("cycle", ["ar", "diff"])):
        for rows in (1, 3):
            f = floors_ms(cfg, w, step, ctx, rows, elem, bw)
            want = sum(pass_bytes(cfg, w, v) + rows * kv_bytes(cfg, ctx, elem) for v in views) / bw * 1e3
            assert f["other"] == 0 and f["gemm"] > 0 and f["attention"] > 0
            assert f["gemm"] + f["attention"] == pytest.approx(want, rel=1e-12)


def test_floors_take_the_compute_bound_when_it_binds(models):
    """A pass's GEMM FLOPs are 2 per weight element per token over its linear layers (QKV, O, gate/up, down per
    layer, the tied head), the same for both views; its attention FLOPs 4 per query head, cached key and head
    dimension per layer. With a matmul rate each kind's floor is the larger bound: bytes for one row, FLOPs once the
    rows' tokens make the pass compute-bound (8 rows here)."""
    engine = models.engine("tiny")
    cfg, w, bw, ctx, elem = engine.config, engine.weights, 1e12, 100, 4
    h, f = cfg.hidden_size, cfg.intermediate_size
    layer = h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h + 2 * f * h + f * h
    per_token = 2 * (cfg.num_layers * layer + cfg.vocab_size * h)
    assert cfg.tie_word_embeddings and "lm_head" not in w
    assert pass_flops(cfg, w, "ar", 32) == pass_flops(cfg, w, "diff", 32) == 32 * per_token
    assert attention_flops(cfg, ctx, 32) == 4 * cfg.num_layers * 32 * cfg.num_heads * cfg.head_dim * ctx
    nbytes = pass_bytes(cfg, w, "ar")
    rate = 4 * 32 * per_token / (nbytes / bw)  # one row's GEMM FLOPs take a quarter of its weight bytes' time
    for rows, which in ((1, "bytes"), (8, "compute")):
        b = bounds_ms(cfg, w, "verify", ctx, rows, elem, bw, rate)
        g = b["gemm"]
        assert g["bytes"] == pytest.approx(nbytes / bw * 1e3)
        assert g["compute"] == pytest.approx(rows * g["bytes"] / 4)
        assert g["bound"] == which and g["floor"] == g[which] == max(g["bytes"], g["compute"])
        a = b["attention"]
        assert a["bytes"] == pytest.approx(rows * kv_bytes(cfg, ctx, elem) / bw * 1e3)
        assert a["compute"] == pytest.approx(attention_flops(cfg, ctx, rows * 32) / rate * 1e3)
        assert a["floor"] == max(a["bytes"], a["compute"])
        f_ = floors_ms(cfg, w, "verify", ctx, rows, elem, bw, rate)
        assert f_ == {"gemm": g["floor"], "attention": a["floor"], "other": 0.0}
        lines = table("verify", {**breakdown([], f_), "bounds_ms": b})
        assert f"({which}-bound" in lines[1] and f"({a['bound']}-bound" in lines[2]
    assert bounds_ms(cfg, w, "decode", ctx, 8, elem, bw, rate)["gemm"]["compute"] == pytest.approx(
        8 * per_token / rate * 1e3)
    assert bounds_ms(cfg, w, "cycle", ctx, 2, elem, bw)["gemm"]["compute"] is None  # no rate: bytes only
    assert floors_ms(cfg, w, "cycle", ctx, 8, elem, bw)["gemm"] == bounds_ms(cfg, w, "cycle", ctx, 8, elem,
                                                                             bw)["gemm"]["bytes"]


def test_fp8_engines_gemm_compute_bound_takes_each_operand_size_at_its_own_rate():
    """An FP8 engine multiplies e4m3 layers (FP8 tensor cores, ~2x bf16 on Hopper) and a BF16 head: with a rate per
    element size (``bench.matmul_rates``) each size's FLOPs go at its own rate, the attention's at the K/V size's;
    one rate for all is the sum at that rate; a size without a rate leaves the compute bound out. The rates are
    measured (``torch._scaled_mm`` for e4m3)."""
    cfg = qwen3_config("8b")
    weights = {n: torch.empty(shape, device="meta", dtype=torch.float8_e4m3fn if len(shape) == 2 and
                              n.startswith("layers.") else torch.bfloat16) for n, shape in engine_shapes(cfg).items()}
    assert matmul_dtypes(cfg, weights) == {1: torch.float8_e4m3fn, 2: torch.bfloat16}
    tokens, views = 8 * cfg.block_size, ("ar", "diff")
    fp8 = sum(pass_flops(cfg, weights, v, tokens, 1) for v in views)
    head = sum(pass_flops(cfg, weights, v, tokens, 2) for v in views)
    assert fp8 > 0 and head == 2 * 2 * tokens * cfg.vocab_size * cfg.hidden_size  # lm_head, both passes
    assert fp8 + head == sum(pass_flops(cfg, weights, v, tokens) for v in views)
    bw, r1, r2 = 3e12, 1.6e15, 0.8e15
    b = bounds_ms(cfg, weights, "cycle", 4096, 8, 2, bw, {1: r1, 2: r2})
    assert b["gemm"]["compute"] == pytest.approx((fp8 / r1 + head / r2) * 1e3)
    assert b["attention"]["compute"] == pytest.approx(2 * attention_flops(cfg, 4096, tokens) / r2 * 1e3)
    one = bounds_ms(cfg, weights, "cycle", 4096, 8, 2, bw, r2)  # the bf16 rate for all: what profiles did before
    assert one["gemm"]["compute"] == pytest.approx((fp8 + head) / r2 * 1e3)
    assert one["gemm"]["compute"] > b["gemm"]["compute"]
    assert bounds_ms(cfg, weights, "cycle", 4096, 8, 2, bw, {2: r2})["gemm"]["compute"] is None
    small = {"layers.0.ar.qkv": torch.randn(8, 8).to(torch.float8_e4m3fn), "lm_head": torch.randn(8, 8).bfloat16(),
             "norm": torch.ones(8, dtype=torch.bfloat16)}
    rates = matmul_rates(torch.device("cpu"), cfg, small)
    assert set(rates) == {1, 2} and all(math.isfinite(r) and r > 0 for r in rates.values())


def test_profile_step_on_the_cpu_engine(models):
    """``Engine.profile_step`` on tiny: a verify pass runs one attention op per layer and the packed linear layers
    (QKV, O, gate/up, down per layer, and the head), its kinds' times add up to the operators' total, and a cycle
    runs both views."""
    engine = models.engine("tiny")
    layers = engine.config.num_layers
    entries = engine.profile_step("verify", 200, iters=2, batch=2)
    assert {e["name"] for e in entries} >= {"aten::mm", "orthrus::cached_attention"}
    attention_calls = [e for e in entries if e["name"] == "orthrus::cached_attention" and e["within"] is None]
    assert attention_calls[0]["launches"] == layers
    b = breakdown(entries, floors_ms(engine.config, engine.weights, "verify", 200, 2, 4, 1e11))
    assert b["kinds"]["gemm"]["launches"] == 4 * layers + 1
    assert all(b["kinds"][k]["ms"] > 0 for k in ("gemm", "attention", "other"))
    assert sum(k["ms"] for k in b["kinds"].values()) == pytest.approx(sum(e["ms"] for e in entries))
    assert b["kinds"]["gemm"]["ratio_to_floor"] > 0 and b["kinds"]["other"]["ratio_to_floor"] is None
    cycle = {e["name"] for e in engine.profile_step("cycle", 200, iters=1)}
    assert {"orthrus::cached_attention", "orthrus::diffusion_attention", "orthrus::accept"} <= cycle
    with pytest.raises(OrthrusError, match="outside 1..8"):
        engine.profile_step("verify", 10, batch=9)


def test_profile_script_rereads_a_recorded_profile(tmp_path):
    """``scripts/profile_gpu.py --from`` adds kinds and floors to a recorded H200 profile with that device's measured
    bandwidth; without a bandwidth it refuses."""
    out = tmp_path / "kinds.json"
    script = ROOT / "scripts" / "profile_gpu.py"
    bw = ROOT / "benchmarks" / "h200-attention-splits.json"
    p = subprocess.run([sys.executable, script, "--from", H200_CYCLE, "--bandwidth-from", bw, "--out", out],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())["steps"]["cycle batch 1"]
    recorded = json.loads(H200_CYCLE.read_text())["batches"]["1"]
    assert r["kernel_ms"] == pytest.approx(recorded["kernel_ms_total"])
    assert r["between_kernels_ms"] == pytest.approx(recorded["replay_ms"] - recorded["kernel_ms_total"])
    # an 8B cycle reads both views' weights once: ~30 GB over ~4.2 TB/s
    assert 6.5 < r["kinds"]["gemm"]["floor_ms"] < 8.0
    p = subprocess.run([sys.executable, script, "--from", H200_CYCLE, "--out", out], capture_output=True, text=True)
    assert p.returncode == 2 and "--bandwidth-from" in p.stderr



def test_bench_profile_cli(models, capsys):
    """``orthrus-export bench --profile --json`` on tiny: every step at every context and batch size, by kind."""
    from orthrus_export.cli import main
    path = models.engine_path("tiny")
    assert main(["bench", "--engine", str(path), "--contexts", "300", "--batch", "1,2", "--iters", "2",
                 "--profile", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    prof, rate = out["profile"], out["matmul_TFLOPs"]["float32"] * 1e12  # fp32 on this CPU, measured
    assert rate > 0
    assert set(prof) == {f"{s} ctx {c} batch {b}" for s in ("verify", "draft", "cycle") for c in (300,)
                         for b in (1, 2)}
    layers = models.engine("tiny").config.num_layers
    for name, r in prof.items():
        passes = 2 if name.startswith("cycle") else 1
        assert r["kinds"]["gemm"]["launches"] == passes * (4 * layers + 1), name
        assert r["replay_ms"] > 0 and r["floor_ms"] > 0 and r["top"]
        g, att = r["bounds_ms"]["gemm"], r["bounds_ms"]["attention"]
        assert r["kinds"]["gemm"]["floor_ms"] == g["floor"] == max(g["bytes"], g["compute"])
        assert r["kinds"]["attention"]["floor_ms"] == att["floor"] == max(att["bytes"], att["compute"])
        engine = models.engine("tiny")
        tokens = int(name.rsplit(" ", 1)[1]) * engine.config.block_size
        flops = sum(pass_flops(engine.config, engine.weights, v, tokens) for v in (("ar", "diff")[:passes]))
        assert g["compute"] == pytest.approx(flops / rate * 1e3, rel=1e-6)
        assert att["compute"] == pytest.approx(passes * attention_flops(engine.config, 300, tokens) / rate * 1e3,
                                               rel=1e-6)
    assert prof["verify ctx 300 batch 2"]["kinds"]["attention"]["floor_ms"] == pytest.approx(
        2 * prof["verify ctx 300 batch 1"]["kinds"]["attention"]["floor_ms"])
    assert main(["bench", "--engine", str(path), "--contexts", "64", "--batch", "9", "--profile"]) == 2


def test_autotune_tries_every_attention_option_at_every_batch_size(models):
    """The build-time autotuner on a real engine (CPU: host-clock timings): every splits × query block candidate,
    then the other key tile at the best of them, then the kernels' other launches at the best of those, is timed at
    every context × batch size, the engine ends with the fastest, and its output is unchanged."""
    from orthrus_export.autotune import autotune
    from orthrus_plugins.attention_common import LAUNCH_CANDIDATES
    from orthrus_runtime import Engine
    from orthrus_runtime.program import kernel_attributes
    engine = Engine.load(models.engine_path("gqa1_tied"))  # its own: autotune re-specialises it in place
    try:
        prompt = list(range(5, 25))
        before = engine.generate(prompt, 12).output_ids
        engine, t = autotune(engine, ["none"], [40, 100], iters=2, splits=(8, 16), query_blocks=(0, 32),
                             batches=(1, 2))
        assert t["points"] == [[40, 1], [40, 2], [100, 1], [100, 2]]
        grid = t["candidates"][:4]  # splits x query blocks at 64-key tiles, then 32-key tiles at the best of them
        assert [(c["attention_splits"], c["attention_query_block"], c["attention_block_n"]) for c in grid] == \
            [(8, 0, 64), (8, 32, 64), (16, 0, 64), (16, 32, 64)]
        best_grid = min(grid, key=lambda c: sum(c["cycle_ms"]))
        keys = ("attention_splits", "attention_query_block", "attention_block_n", "attention_launch")
        assert len(t["candidates"]) == 4 + len(LAUNCH_CANDIDATES)
        assert all(c["attention_launch"] == "" for c in t["candidates"][:5])
        assert tuple(t["candidates"][4][k] for k in keys) == \
            (best_grid["attention_splits"], best_grid["attention_query_block"], 32, "")
        best_tile = min(t["candidates"][:5], key=lambda c: sum(c["cycle_ms"]))
        assert [tuple(c[k] for k in keys) for c in t["candidates"][5:]] == \
            [(*(best_tile[k] for k in keys[:3]), spec) for spec in LAUNCH_CANDIDATES[1:]]
        assert all(len(c["cycle_ms"]) == 4 and min(c["cycle_ms"]) > 0 for c in t["candidates"])
        best = min(t["candidates"], key=lambda c: sum(c["cycle_ms"]))
        assert tuple(getattr(engine.options, k) for k in keys) == tuple(best[k] for k in keys) == \
            tuple(t[k] for k in keys)
        assert (("launch", best["attention_launch"]) in kernel_attributes(engine.programs["draft"])[
            "diffusion_attention"]) == bool(best["attention_launch"])
        assert engine.generate(prompt, 12).output_ids == before
    finally:
        engine.close()
