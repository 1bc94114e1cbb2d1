"""GPU tests (CUDA + Triton): kernels against their reference implementations, CUDA-graph cycles against the eager
loop, fp32 token-exactness with transformers on the GPU, bf16 self-consistency, tiny's acceptance on GPU vs CPU."""

import json
import math

import pytest
import torch

pytestmark = pytest.mark.gpu

import orthrus_plugins  # noqa: E402,F401


def tolerance(dtype):
    return {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,hq,hkv,d", [(32, 32, 8, 128), (32, 16, 8, 128), (1, 32, 8, 128), (32, 4, 2, 64),
                                        (32, 4, 4, 16)])
@pytest.mark.parametrize("n", [0, 5, 1000, 4133])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("query_block", [0, 16])
def test_triton_attention_matches_reference(dtype, b, hq, hkv, d, n, causal, query_block):
    from orthrus_plugins.attention_common import kernel as ta
    g = torch.Generator(device="cuda").manual_seed(n + 7 * b + hq)
    layers, cap = 3, 4200

    def r(*shape):
        return torch.randn(*shape, device="cuda", generator=g, dtype=torch.float32).to(dtype)
    q, k, v = r(b, hq, d), r(b, hkv, d), r(b, hkv, d)
    kc, vc = r(layers, hkv, cap, d), r(layers, hkv, cap, d)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    # the reference implementation's arithmetic, called directly (the op itself dispatches to Triton on CUDA)
    from orthrus_plugins.attention_common import attend
    if causal:
        kc_ref[1, :, n:n + b] = k.transpose(0, 1)
        vc_ref[1, :, n:n + b] = v.transpose(0, 1)
        mask = torch.arange(n + b, device="cuda")[None, :] <= (n + torch.arange(b, device="cuda"))[:, None]
        expected = attend(q, kc_ref[1, :, :n + b], vc_ref[1, :, :n + b], d ** -0.5, mask)
    else:
        keys = torch.cat([kc_ref[1, :, :n], k.transpose(0, 1)], 1)
        values = torch.cat([vc_ref[1, :, :n], v.transpose(0, 1)], 1)
        expected = attend(q, keys, values, d ** -0.5, None)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    ta.attention(q, k, v, kc, vc, torch.tensor(n, device="cuda"), 1, d ** -0.5, causal, out=out,
                 query_block=query_block)
    assert torch.isfinite(out).all()
    err = (out.double() - expected.double()).abs().max().item()
    assert err <= tolerance(dtype) * (1 + expected.double().abs().max().item()), err
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("query_block", [0, 16, 32, 64])
@pytest.mark.parametrize("block_n", [64, 32])
def test_triton_batched_attention_matches_reference_and_is_row_invariant(dtype, causal, query_block, block_n):
    """Rows of different lengths and slots (two consecutive chunks of one slot among them) against the reference;
    each row's output is bitwise the same as the row run alone (batch invariance of the kernel), at every query
    block size and both key tiles an engine may use."""
    from dataclasses import replace

    from orthrus_plugins.attention_common import kernel as ta
    from orthrus_plugins.attention_common import reference
    g = torch.Generator(device="cuda").manual_seed(3 + causal)
    t, hq, hkv, d, layers, slots_n, cap = 32, 32, 8, 128, 2, 6, 4300

    def r(*shape):
        return torch.randn(*shape, device="cuda", generator=g, dtype=torch.float32).to(dtype)
    # lengths and slots as strided columns of one buffer, as the runtime's row inputs pass them
    rowbuf = torch.tensor([[0, 5, 9], [4133, 0, 9], [77, 3, 9], [1000, 1, 9], [1000 + t, 1, 9]], device="cuda")
    lens, slots = rowbuf[:, 0], rowbuf[:, 1]
    rows = len(lens)
    q, k = r(rows * t, hq, d), r(rows * t, hkv, d)
    v = r(rows * t, 3 * hkv, d)[:, hkv:2 * hkv]  # a strided view, as the slice of the QKV product the engines pass
    kc, vc = r(layers, slots_n, hkv, cap, d), r(layers, slots_n, hkv, cap, d)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    expected = reference("test", q, k, v, kc_ref, vc_ref, lens.cpu(), 1, d ** -0.5, causal, slots.cpu())
    out = torch.full_like(q, float("nan"))
    launch = replace(ta.DEFAULT_LAUNCH, block_n=block_n)
    ta.attention(q, k, v, kc, vc, lens, 1, d ** -0.5, causal, slots=slots, out=out, query_block=query_block,
                 launch=launch)
    assert torch.isfinite(out).all()
    err = (out.double() - expected.double()).abs().max().item()
    assert err <= tolerance(dtype) * (1 + expected.double().abs().max().item()), err
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    for i in (0, 1, 2):  # rows on their own slots: alone, bitwise the same
        rows_i = slice(i * t, (i + 1) * t)
        kc1, vc1 = kc.clone(), vc.clone()
        alone = ta.attention(q[rows_i], k[rows_i], v[rows_i], kc1, vc1, lens[i:i + 1], 1, d ** -0.5,
                             causal, slots=slots[i:i + 1], query_block=query_block, launch=launch)
        assert torch.equal(alone, out[rows_i]), i
        # a lone row's K/V are written by the split kernel itself: its slot as the reference's, the rest untouched
        kc_own, vc_own = kc.clone(), vc.clone()
        kc_own[:, slots[i]], vc_own[:, slots[i]] = kc_ref[:, slots[i]], vc_ref[:, slots[i]]
        assert torch.equal(kc1, kc_own) and torch.equal(vc1, vc_own), i


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("spec", ["num_stages=2,max_registers=128", "partials=float32", "programs_per_sm=1"])
def test_attention_ops_launch_attribute_runs_that_launch(causal, spec):
    """The ops' ``launch`` attribute (an engine's ``attention_launch``; these are the autotuner's candidates) reaches
    the kernels: the op called with it is bitwise the kernel called with that launch, within bf16 tolerance of the
    reference, and a row alone is bitwise its row in the batch."""
    from orthrus_plugins.attention_common import LAUNCH_CANDIDATES, Launch, reference
    from orthrus_plugins.attention_common import kernel as ta
    assert spec in LAUNCH_CANDIDATES
    g = torch.Generator(device="cuda").manual_seed(11 + causal)
    t, hq, hkv, d, cap = 32, 32, 8, 128, 4300

    def r(*shape):
        return torch.randn(*shape, device="cuda", generator=g, dtype=torch.float32).to(torch.bfloat16)
    lens, slots = torch.tensor([4133, 77, 1000], device="cuda"), torch.tensor([2, 0, 1], device="cuda")
    q, k, v = r(3 * t, hq, d), r(3 * t, hkv, d), r(3 * t, hkv, d)
    kc, vc = r(2, 3, hkv, cap, d), r(2, 3, hkv, cap, d)
    op = torch.ops.orthrus.cached_attention if causal else torch.ops.orthrus.diffusion_attention
    expected = reference("test", q, k, v, kc.clone(), vc.clone(), lens.cpu(), 1, d ** -0.5, causal, slots.cpu())
    kc_op, vc_op = kc.clone(), vc.clone()
    out = op(q, k, v, kc_op, vc_op, lens, 1, d ** -0.5, splits=16, slots=slots, launch=spec)
    direct = ta.attention(q, k, v, kc.clone(), vc.clone(), lens, 1, d ** -0.5, causal, splits=16, slots=slots,
                          launch=Launch.from_spec(spec))
    assert torch.equal(out, direct)
    err = (out.double() - expected.double()).abs().max().item()
    assert err <= tolerance(torch.bfloat16) * (1 + expected.double().abs().max().item()), err
    alone = op(q[t:2 * t], k[t:2 * t], v[t:2 * t], kc.clone(), vc.clone(), lens[1:2], 1, d ** -0.5, splits=16,
               slots=slots[1:2], launch=spec)
    assert torch.equal(alone, out[t:2 * t])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("programs_per_sm", [1, 2])
def test_attention_folded_split_programs_bitwise_unfolded(causal, programs_per_sm):
    """``Launch.programs_per_sm`` folds consecutive splits into one program as rows grow: 8 rows at 8B heads and 16
    splits fold (4 or 2 splits a program on 132 SMs) and each row equals, bitwise, that row alone (128 programs: not
    folded) and the whole batch at the default launch; within bf16 tolerance of the reference."""
    from orthrus_plugins.attention_common import Launch, reference
    from orthrus_plugins.attention_common import kernel as ta
    g = torch.Generator(device="cuda").manual_seed(5 + causal)
    rows, t, hq, hkv, d, cap = 8, 32, 32, 8, 128, 4200
    launch = Launch(programs_per_sm=programs_per_sm)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert launch.fold(16, hkv * 16 * rows, sms) > 1 and launch.fold(16, hkv * 16, sms) == 1

    def r(*shape):
        return torch.randn(*shape, device="cuda", generator=g, dtype=torch.float32).to(torch.bfloat16)
    lens = torch.randint(0, 4096, (rows,), device="cuda", generator=g)
    slots = torch.randperm(rows, device="cuda", generator=g)
    q, k, v = r(rows * t, hq, d), r(rows * t, hkv, d), r(rows * t, hkv, d)
    kc, vc = r(2, rows, hkv, cap, d), r(2, rows, hkv, cap, d)
    expected = reference("test", q, k, v, kc.clone(), vc.clone(), lens.cpu(), 1, d ** -0.5, causal, slots.cpu())
    out = torch.full_like(q, float("nan"))
    ta.attention(q, k, v, kc.clone(), vc.clone(), lens, 1, d ** -0.5, causal, splits=16, slots=slots, out=out,
                 launch=launch)
    unfolded = ta.attention(q, k, v, kc.clone(), vc.clone(), lens, 1, d ** -0.5, causal, splits=16, slots=slots)
    assert torch.equal(out, unfolded)
    err = (out.double() - expected.double()).abs().max().item()
    assert err <= tolerance(torch.bfloat16) * (1 + expected.double().abs().max().item()), err
    for i in range(rows):
        rows_i = slice(i * t, (i + 1) * t)
        alone = ta.attention(q[rows_i], k[rows_i], v[rows_i], kc.clone(), vc.clone(), lens[i:i + 1], 1, d ** -0.5,
                             causal, splits=16, slots=slots[i:i + 1], launch=launch)
        assert torch.equal(alone, out[rows_i]), i


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_bf16_batched_passes_rows_match_alone(tiny_gpu, batch):
    """Every row of a batched bf16 verify pass against the same block alone: equal within bf16 rounding (GEMMs at
    another M may round differently: batch_invariance.py measures what that does to tokens)."""
    from orthrus_runtime import Engine
    engine = Engine.load(tiny_gpu["bf16"])
    prog, b = engine.programs["verify"], engine.block_size
    g = torch.Generator(device="cuda").manual_seed(batch)
    tokens = torch.randint(0, engine.config.vocab_size, (batch, b), device="cuda", generator=g)
    start = torch.arange(batch, device="cuda") * 37
    slots = torch.arange(batch, device="cuda")
    with torch.no_grad():
        together = prog(engine.weights, tokens, start, slots, engine.k_cache, engine.v_cache)
        alone = torch.stack([prog(engine.weights, tokens[i:i + 1], start[i:i + 1], slots[i:i + 1], engine.k_cache,
                                  engine.v_cache)[0] for i in range(batch)])
    # random tokens make near-tied logits: a rare argmax flip is rounding (batch_invariance.py measures real text)
    assert (together.argmax(-1) == alone.argmax(-1)).float().mean() > 0.95
    assert (together - alone).abs().max() < 0.05 * (1 + alone.abs().max())
    engine.close()


@pytest.fixture(scope="module")
def tiny_gpu(tmp_path_factory):
    from orthrus_export.builder import build
    root = tmp_path_factory.mktemp("gpu")
    return {p: build("tiny", gpu="auto", precision=p, out=root / p, max_seq_len=512, progress=False)
            for p in ("fp32", "bf16")}


def heldout(n):
    from orthrus_export.checkpoint import TINY_DIR
    return json.loads((TINY_DIR / "heldout_prompts.json").read_text())[:n]


def test_fp32_gpu_engine_token_exact_with_transformers_on_gpu(tiny_gpu):
    from orthrus_export.checkpoint import open_checkpoint
    from orthrus_export.reference import Reference
    from orthrus_runtime import Engine
    engine = Engine.load(tiny_gpu["fp32"])
    assert engine.cuda_graphs
    ref = Reference(open_checkpoint("tiny"))
    ref.ar.cuda()
    for p in heldout(8):
        ids = engine.encode(p["text"])
        r = engine.generate(ids, max_new_tokens=64)
        engine.cuda_graphs = False
        eager = engine.generate(ids, max_new_tokens=64)
        engine.cuda_graphs = True
        with torch.inference_mode():
            hf = ref.ar.generate(torch.tensor([ids], device="cuda"), do_sample=False, max_new_tokens=64,
                                 eos_token_id=list(engine.config.eos_token_ids), pad_token_id=0)[0, len(ids):]
        assert r.output_ids == hf.tolist() == eager.output_ids


def test_graphed_cycles_equal_eager_cycles(tiny_gpu):
    from orthrus_runtime import Engine
    engine = Engine.load(tiny_gpu["bf16"])
    for p in heldout(6):
        graphed = engine.generate(p["text"], max_new_tokens=80)
        engine.cuda_graphs = False
        eager = engine.generate(p["text"], max_new_tokens=80)
        engine.cuda_graphs = True
        assert graphed.output_ids == eager.output_ids
        assert graphed.stats.acceptance_hist == eager.stats.acceptance_hist


def test_sampled_cycles_run_in_graphs_and_equal_eager(tiny_gpu):
    """Sampled requests replay the sampled cycle graph; with the same seed the graphed and eager runs agree, and
    the same seed gives the same text again."""
    from orthrus_runtime import Engine
    engine = Engine.load(tiny_gpu["fp32"])
    assert ("cycle", True, 1) in engine.steps.graphs and ("cycle", True, engine.max_batch_size) in engine.steps.graphs
    for i, p in enumerate(heldout(4)):
        kw = dict(max_new_tokens=60, temperature=0.8, top_k=20, top_p=0.9, seed=i)
        graphed = engine.generate(p["text"], **kw)
        engine.cuda_graphs = False
        eager = engine.generate(p["text"], **kw)
        engine.cuda_graphs = True
        assert graphed.output_ids == eager.output_ids == engine.generate(p["text"], **kw).output_ids


def test_two_engines_with_different_kernel_options_in_one_process(tiny_gpu):
    from orthrus_runtime import Engine
    from orthrus_runtime.program import kernel_attributes
    a = Engine.load(tiny_gpu["bf16"])
    b = Engine.load(tiny_gpu["bf16"])
    other = 8 if a.options.attention_splits != 8 else 32
    spec = "num_stages=2,max_registers=128"  # one of the autotuner's launches
    b.with_options(b.options.replace(attention_splits=other, attention_block_n=32, attention_launch=spec,
                                     backend="none"))
    assert kernel_attributes(b.programs["verify"])["cached_attention"] == {("splits", other), ("block_n", 32),
                                                                           ("launch", spec)}
    ids = a.encode(heldout(1)[0]["text"])
    ra, rb = a.generate(ids, max_new_tokens=64), b.generate(ids, max_new_tokens=64)
    assert a.generate(ids, max_new_tokens=64).output_ids == ra.output_ids  # a still runs its own setting
    assert b.generate(ids, max_new_tokens=64, use_drafts=False).output_ids == rb.output_ids  # b: Orthrus == own AR
    print(f"splits {a.options.attention_splits} vs {other} (and 32-key tiles): same tokens "
          f"{ra.output_ids == rb.output_ids}")


def test_bf16_orthrus_equals_its_own_ar(tiny_gpu):
    from orthrus_runtime import Engine
    engine = Engine.load(tiny_gpu["bf16"])
    same = 0
    prompts = heldout(20)
    for p in prompts:
        a = engine.generate(p["text"], max_new_tokens=64)
        b = engine.generate(p["text"], max_new_tokens=64, use_drafts=False)
        same += a.output_ids == b.output_ids
    print(f"bf16 engine: Orthrus == its own AR on {same}/{len(prompts)} prompts")
    assert same >= len(prompts) * 0.5


def test_tiny_acceptance_on_gpu_within_3_percent_of_cpu(tiny_gpu):
    from orthrus_export.checkpoint import TINY_DIR
    from orthrus_runtime import Engine
    ev = json.loads((TINY_DIR / "eval.json").read_text())["test"]
    engine = Engine.load(tiny_gpu["fp32"])
    cycles = tokens = 0
    for p in heldout(ev["prompts"]):
        r = engine.generate(p["text"], max_new_tokens=ev["max_new_tokens"])
        cycles += r.stats.cycles
        tokens += r.stats.cycle_tokens
    gpu, cpu = tokens / cycles, ev["acceptance_length_token_weighted"]
    print(f"tiny acceptance length: GPU {gpu:.3f}, CPU {cpu:.3f}")
    assert math.isclose(gpu, cpu, rel_tol=0.03)


@pytest.mark.parametrize("splits", [8, 32])
@pytest.mark.parametrize("n", [0, 77, 4133])
def test_triton_attention_every_tuned_split_count(splits, n):
    """The autotuner's alternatives compute the same attention (bf16, the 8B head layout)."""
    from orthrus_plugins.attention_common import kernel as ta
    from orthrus_plugins.attention_common import attend
    g = torch.Generator(device="cuda").manual_seed(n + splits)
    q = torch.randn(32, 32, 128, device="cuda", generator=g).bfloat16()
    k, v = (torch.randn(32, 8, 128, device="cuda", generator=g).bfloat16() for _ in range(2))
    kc, vc = (torch.randn(2, 8, 4200, 128, device="cuda", generator=g).bfloat16() for _ in range(2))
    keys = torch.cat([kc[0, :, :n], k.transpose(0, 1)], 1)
    values = torch.cat([vc[0, :, :n], v.transpose(0, 1)], 1)
    expected = attend(q, keys, values, 128 ** -0.5, None)
    out = torch.full_like(q, float("nan"))
    ta.attention(q, k, v, kc, vc, torch.tensor(n, device="cuda"), 0, 128 ** -0.5, False, splits=splits, out=out)
    err = (out.double() - expected.double()).abs().max().item()
    assert err <= tolerance(torch.bfloat16) * (1 + expected.double().abs().max().item()), err


def test_build_autotunes_and_records_the_choice(tiny_gpu):
    from orthrus_runtime import Engine
    for precision, backends in (("bf16", {"none", "inductor"}), ("fp32", {"none"})):
        m = json.loads((tiny_gpu[precision] / "manifest.json").read_text())
        t = m["build"]["tuning"]
        assert {c["backend"] for c in t["candidates"]} == backends
        assert {c["attention_splits"] for c in t["candidates"] if c["backend"] == "none"} == {8, 16, 32}
        assert t["batches"] == sorted({1, m["build"]["max_batch_size"]})
        assert t["points"] == [[c, b] for c in t["contexts"] for b in t["batches"]]
        assert all(len(c["cycle_ms"]) == len(t["points"]) and min(c["cycle_ms"]) > 0 for c in t["candidates"])
        best = min(t["candidates"], key=lambda c: sum(c["cycle_ms"]))
        o = m["build"]["options"]
        assert (o["backend"], o["attention_splits"]) == (best["backend"], best["attention_splits"])
        assert set(t["prepare_seconds"]) == backends and "autotune" in m["build"]["timings_s"]
        assert (m["build"]["compiled"] is not None) == (o["backend"] == "inductor")
        engine = Engine.load(tiny_gpu[precision])
        assert engine.options.attention_splits == t["attention_splits"]


def test_compiled_artifacts_are_reused_in_a_fresh_process(tiny_gpu, tmp_path):
    """A fresh process with an empty Inductor cache loads the bf16 engine's stored artifacts instead of compiling,
    and says what differs (and recompiles) when the stack does not match; --strict refuses then."""
    import os
    import subprocess
    import sys
    m = json.loads((tiny_gpu["bf16"] / "manifest.json").read_text())
    if m["build"]["options"]["backend"] != "inductor":
        pytest.skip("the autotuner kept the traced programs: no compiled artifacts")
    code = ("import json, sys; from orthrus_runtime import Engine; e = Engine.load(sys.argv[1], log=print); "
            "print(json.dumps(e.load_stats))")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    out = subprocess.run([sys.executable, "-c", code, str(tiny_gpu["bf16"])], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    print("fresh-process load:", stats)
    assert stats["compiled"]["artifacts"] == "loaded"


def poison_empty(monkeypatch) -> None:
    """Every floating buffer of 2+ bytes that ``torch.empty`` allocates starts as NaN (so a kernel that leaves an output
    element unwritten fails the test)."""
    real_empty = torch.empty

    def poisoned_empty(*a, **kw):
        t = real_empty(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() and t.dtype.itemsize > 1 else t
    monkeypatch.setattr(torch, "empty", poisoned_empty)


@pytest.mark.parametrize("m", [1, 7, 32, 100, 130, 256])  # 100: four 32-row tiles; 130, 256: the wide tiling's
@pytest.mark.parametrize("n,k", [(512, 256), (6144, 4096), (301, 96), (4096, 12288)])
def test_fp8_linear_cuda_kernels_match_reference(m, n, k, monkeypatch):
    from orthrus_export.parity import compare
    from orthrus_plugins import fp8_linear as op
    poison_empty(monkeypatch)
    g = torch.Generator(device="cuda").manual_seed(m * n + k)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    q, s = op.quantize_weight(torch.randn(n, k, device="cuda", generator=g) * 0.05)
    expected = op._reference(x, q, s)  # exact float64 product-sum
    xq, xs = op.quantize_rows(x)
    dq, ds = op.quantize_device(x)  # fp8_linear's quantization on the GPU: quantize_rows's values
    assert torch.equal(dq.float(), xq.float()) and torch.equal(ds, xs)
    for name in op.MATMUL_KERNELS:
        out = op.cuda_linear(x, q, s, name)
        assert out.dtype == torch.bfloat16 and out.shape == (m, n) and torch.isfinite(out).all()
        r = compare(out.float(), expected.float(), torch.bfloat16)
        assert r["ok"], (name, r)
        # fp8_matmul (compiled programs: the rows quantized by Inductor) is the same kernel on the same rows
        assert torch.equal(torch.ops.orthrus.fp8_matmul(xq, xs, q, s, torch.bfloat16, name), out), name
    for name in ("triton", "triton-splitk", "triton-tma"):  # batch invariance: each row alone equals its row
        if name in op.MATMUL_KERNELS:                         # inside the block
            full = op.cuda_linear(x, q, s, name)
            rows = torch.cat([op.cuda_linear(x[i:i + 1], q, s, name) for i in range(m)])
            assert torch.equal(rows, full), name
    if "triton-tma" in op.MATMUL_KERNELS:  # TMA loads on 32-row tiles, triton's K order and MMAs (on 32- or 128-row
        # tiles): the same bits
        assert torch.equal(op.cuda_linear(x, q, s, "triton-tma"), op.cuda_linear(x, q, s, "triton"))


@pytest.mark.parametrize("m", [1, 32, 100])
@pytest.mark.parametrize("n,k", [(6144, 256), (151936, 4096), (301, 96)])  # tiny's head, 8B's head, ragged
def test_invariant_linear_matches_float64_and_rows_are_invariant(m, n, k, monkeypatch):
    """``orthrus::invariant_linear`` (an FP8 engine's BF16 head) on the GPU: within bf16 rounding of the float64
    product, every output written (poisoned buffers), and each row alone bitwise equal to its row in the block."""
    from orthrus_export.parity import compare
    poison_empty(monkeypatch)
    g = torch.Generator(device="cuda").manual_seed(m + n)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).bfloat16()
    out = torch.ops.orthrus.invariant_linear(x, w)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n) and torch.isfinite(out).all()
    r = compare(out.float(), (x.double() @ w.double().t()).float(), torch.bfloat16)
    assert r["ok"], r
    for i in sorted({0, m // 2, m - 1}):
        assert torch.equal(torch.ops.orthrus.invariant_linear(x[i:i + 1], w), out[i:i + 1]), i


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (4, 2, 64)])  # 8B's heads, tiny's
def test_qk_norm_rope_kernel_matches_reference_and_tokens_are_invariant(dtype, hq, hkv, d, monkeypatch):
    """``orthrus::qk_norm_rope`` on the GPU (the Triton kernel): within a rounding of the reference at every element
    (strided qkv rows, poisoned outputs), and each token alone bitwise equal to its row in a 32-token block — a
    decode step's q/k heads equal a verify block's."""
    from orthrus_plugins.qk_norm_rope import random_inputs, reference
    poison_empty(monkeypatch)
    qkv, qw, kw, cos, sin = random_inputs(32, hq, hkv, d, dtype, torch.Generator(device="cuda").manual_seed(hq + d),
                                          pad=8)
    q, k = torch.ops.orthrus.qk_norm_rope(qkv, qw, kw, cos, sin, hq, hkv, 1e-6)
    rq, rk = reference(qkv, qw, kw, cos, sin, hq, hkv, 1e-6)
    # the kernel rounds where the reference rounds; only the float32 sum and rsqrt may differ in their last bit,
    # which can move the normalized row by one unit of the dtype — and the rotation's sum of two products can cancel,
    # so the bound scales with the head row's largest value, not each element's
    ulp = 1e-6 if dtype == torch.float32 else 2 ** -7  # the last bit of bf16 at magnitude 1
    for got, want in ((q, rq), (k, rk)):
        assert got.shape == want.shape and got.dtype == dtype and torch.isfinite(got).all()
        scale = want.double().abs().amax(-1, keepdim=True)
        assert ((got.double() - want.double()).abs() <= 4 * ulp * (1 + scale)).all()
    for i in (0, 13, 31):
        qi, ki = torch.ops.orthrus.qk_norm_rope(qkv[i:i + 1], qw, kw, cos[i:i + 1], sin[i:i + 1], hq, hkv, 1e-6)
        assert torch.equal(qi[0], q[i]) and torch.equal(ki[0], k[i]), i


@pytest.mark.parametrize("n", [100, 1000, 4000])  # 1000: the block's key counts straddle 16 splits · 64-key tiles
@pytest.mark.parametrize("splits,query_block", [(16, 0), (4, 16), (16, 32), (16, 64), (4, 64)])
def test_cached_attention_verify_rows_equal_decode_steps(n, splits, query_block):
    """A verify block of 32 tokens at cache length n against 32 one-token decode steps at n, n + 1, ...: each query
    row's output bitwise equal (each query splits and tiles its own keys as its decode step does) — what Orthrus ==
    own AR needs of attention."""
    from orthrus_plugins.attention_common import kernel as ta
    g = torch.Generator(device="cuda").manual_seed(n + splits)
    b, hq, hkv, d = 32, 32, 8, 128

    def r(*shape):
        return torch.randn(*shape, device="cuda", generator=g).bfloat16()
    kc, vc = r(2, hkv, 4200, d), r(2, hkv, 4200, d)
    q, k, v = r(b, hq, d), r(b, hkv, d), r(b, hkv, d)
    block = ta.attention(q, k, v, kc, vc, torch.tensor(n, device="cuda"), 1, d ** -0.5, True, splits=splits,
                         query_block=query_block)
    for i in range(b):
        step = ta.attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], kc, vc, torch.tensor(n + i, device="cuda"), 1,
                            d ** -0.5, True, splits=splits, query_block=query_block)
        assert torch.equal(step[0], block[i]), (i, (step[0].float() - block[i].float()).abs().max().item())


@pytest.mark.parametrize("m_tile", [64, 128])
def test_fp8_gemm_wider_row_tiles_are_exact_and_row_invariant(m_tile, monkeypatch):
    """The GEMM with wider row tiles (swept for batched passes by ``scripts/sweep_linear.py --wide``; engines take
    ``wide_config`` from 128 rows): exact against the float64 reference at 300 rows (ragged last tile), every output
    written (poisoned buffers), each row alone (as a decode step computes it: the 32-row tiling) equal to its row in
    the full call."""
    import dataclasses
    from orthrus_export.parity import compare
    from orthrus_plugins import fp8_linear as op
    from orthrus_plugins.fp8_linear import kernel as fk
    poison_empty(monkeypatch)
    g = torch.Generator(device="cuda").manual_seed(m_tile)
    n, k, m = 6144, 4096, 300
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    q, s = op.quantize_weight(torch.randn(n, k, device="cuda", generator=g) * 0.05)
    xq, xs = op.quantize_rows(x)
    base = fk.config(n, k, torch.cuda.get_device_properties(0).multi_processor_count)
    # as many stages as fit the wider tile (six 128 + 64-row stages need 288 KB: on 2026-12-07 the H100 refused them)
    cfg = dataclasses.replace(base, m_tile=m_tile, num_stages=fk.stages_that_fit(base, m_tile, base.block_n))
    out = fk.fp8_matmul(xq, xs, q, s, torch.bfloat16, cfg)
    assert torch.isfinite(out).all()
    r = compare(out.float(), op._reference(x, q, s).float(), torch.bfloat16)
    assert r["ok"], r
    for i in (0, 37, m - 1):
        assert torch.equal(fk.fp8_matmul(xq[i:i + 1], xs[i:i + 1], q, s, torch.bfloat16), out[i:i + 1]), i


@pytest.mark.parametrize("compile", ["none", "inductor"])  # inductor: quantization fused, fp8_matmul (split_linear)
def test_fp8_gpu_engine_orthrus_equals_its_own_ar(tmp_path, compile):
    from orthrus_export.builder import build
    from orthrus_export.parity import ar_consistency
    from orthrus_plugins import fp8_linear as op
    from orthrus_runtime import Engine
    path = build("tiny", gpu="auto", precision="fp8", out=tmp_path / "fp8", max_seq_len=512, progress=False,
                 compile=compile)
    m = json.loads((path / "manifest.json").read_text())
    print("fp8 kernel choice:", json.dumps(m["fp8"]["kernel"]))
    assert m["fp8"]["kernel"]["name"] in set(op.MATMUL_KERNELS) - {"reference"}
    # timed at a decode step, a batch-1 block and the engine's largest pass (default max batch size: 8 blocks)
    rows = {1, 32, 32 * m["build"]["max_batch_size"]}
    assert all(set(t) == {f"M={r}" for r in rows} for t in m["fp8"]["kernel"]["candidates_ms"].values())
    engine = Engine.load(path)
    prompts = heldout(20)
    same = cycles = tokens = 0
    diverged = []  # (prompt, first differing output position)
    for i, p in enumerate(prompts):
        a = engine.generate(p["text"], max_new_tokens=64)
        b = engine.generate(p["text"], max_new_tokens=64, use_drafts=False)
        same += a.output_ids == b.output_ids
        if a.output_ids != b.output_ids:
            diverged.append((i, next((j for j, (x, y) in enumerate(zip(a.output_ids, b.output_ids)) if x != y),
                                     min(len(a.output_ids), len(b.output_ids)))))
        cycles += a.stats.cycles
        tokens += a.stats.cycle_tokens
    # what a failure needs to be read: whether a verify block's logits equal one-token decode logits bit for bit
    # (they must, for Orthrus == own AR to hold by construction rather than by the absence of near-ties)
    consistency = ar_consistency(engine)["verify_vs_decode"]
    print(f"fp8 GPU engine: Orthrus == its own AR on {same}/{len(prompts)} prompts (diverged: {diverged}); acceptance "
          f"{tokens / cycles:.2f}; verify vs decode max |dlogits| {consistency['max_abs_diff']:.3g}")
    assert same == len(prompts), (diverged, consistency)


def test_profile_step_sorts_the_gpu_kernels(tiny_gpu):
    """``Engine.profile_step`` on a GPU engine: a verify pass runs the attention plugin's three kernels once per layer
    (cache write, split, merge), all of kind attention, and every kernel's time is counted in one kind."""
    from orthrus_export.profile import breakdown, floors_ms
    from orthrus_runtime import Engine
    engine = Engine.load(tiny_gpu["bf16"])
    entries = engine.profile_step("verify", 200, iters=3)
    assert {"_split_kernel", "_merge_kernel", "_cache_write_kernel"} <= {e["name"] for e in entries}
    b = breakdown(entries, floors_ms(engine.config, engine.weights, "verify", 200, 1, 2, 3e12),
                  engine.time_step("verify", 200, 20))
    assert b["kinds"]["attention"]["launches"] == 3 * engine.config.num_layers
    assert math.isclose(b["kernel_ms"], sum(e["ms"] for e in entries), rel_tol=1e-9) and b["kernel_ms"] > 0
    assert b["replay_ms"] > 0
