"""The attention plugins and the q/k norm + RoPE op against independent float64 loop implementations; tracing keeps
them as single nodes; importing the plugins loads no ONNX package."""

import math
import subprocess
import sys

import pytest
import torch

import orthrus_plugins  # noqa: F401


def naive_attention(q, keys, values, scale, visible):
    """Per query, per head loops in float64. keys/values: [S, Hkv, D]; visible(i) -> number of leading keys seen,
    or a list of key indices."""
    b, hq, d = q.shape
    hkv = keys.shape[1]
    out = torch.zeros(b, hq, d, dtype=torch.float64)
    for i in range(b):
        idx = visible(i)
        for h in range(hq):
            kh = keys[idx, h // (hq // hkv)].double()
            vh = values[idx, h // (hq // hkv)].double()
            s = (kh @ q[i, h].double()) * scale
            out[i, h] = torch.softmax(s, 0) @ vh
    return out


def random_case(gen, b=5, hq=4, hkv=2, d=8, layers=3, cap=20, dtype=torch.float32):
    q = torch.randn(b, hq, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, d, generator=gen).to(dtype)
    kc = torch.randn(layers, hkv, cap, d, generator=gen).to(dtype)
    vc = torch.randn(layers, hkv, cap, d, generator=gen).to(dtype)
    return q, k, v, kc, vc


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (8, 2)])
@pytest.mark.parametrize("length", [0, 1, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_diffusion_attention_matches_naive(hq, hkv, length, dtype):
    gen = torch.Generator().manual_seed(hq * 100 + hkv * 10 + length)
    q, k, v, kc, vc = random_case(gen, hq=hq, hkv=hkv, dtype=dtype)
    kc0, vc0 = kc.clone(), vc.clone()
    scale = 1 / math.sqrt(q.shape[-1])
    out = torch.ops.orthrus.diffusion_attention(q, k, v, kc, vc, torch.tensor(length), 1, scale)
    keys = torch.cat([kc[1, :, :length].transpose(0, 1), k])  # [S, Hkv, D]
    values = torch.cat([vc[1, :, :length].transpose(0, 1), v])
    expected = naive_attention(q, keys, values, scale, lambda i: list(range(length + q.shape[0])))  # no mask
    tol = 2e-6 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.double() - expected).abs().max() < tol
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0), "the diffusion view must not write the cache"


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (8, 2)])
@pytest.mark.parametrize("length", [0, 3, 15])
def test_cached_attention_writes_block_and_is_causal(hq, hkv, length):
    gen = torch.Generator().manual_seed(hq + hkv + length)
    q, k, v, kc, vc = random_case(gen, hq=hq, hkv=hkv)
    before_k, before_v = kc.clone(), vc.clone()
    scale = 0.3
    out = torch.ops.orthrus.cached_attention(q, k, v, kc, vc, torch.tensor(length), 2, scale)
    b = q.shape[0]
    # the block landed at [length, length+b) of layer 2, nothing else changed
    assert torch.equal(kc[2, :, length:length + b], k.transpose(0, 1))
    assert torch.equal(vc[2, :, length:length + b], v.transpose(0, 1))
    changed = torch.ones_like(kc, dtype=torch.bool)
    changed[2, :, length:length + b] = False
    assert torch.equal(kc[changed], before_k[changed]) and torch.equal(vc[changed], before_v[changed])
    keys = kc[2, :, :length + b].transpose(0, 1)
    values = vc[2, :, :length + b].transpose(0, 1)
    expected = naive_attention(q, keys, values, scale, lambda i: list(range(length + i + 1)))
    assert (out.double() - expected).abs().max() < 2e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cached_attention_block_rows_equal_decode_steps_bitwise(dtype):
    """bf16/fp16 (the reference, i.e. CPU engines): row j of a verify block equals, bit for bit, the decode step at
    its position, so a bf16 engine's Orthrus output equals its own AR output (a float32 matmul over the whole block
    and masked rows of the longest length rounded differently and flipped near-ties)."""
    g = torch.Generator().manual_seed(0)
    hq, hkv, d, cap, t = 4, 2, 64, 256, 32
    for n in (0, 37, 200):
        kc, vc = (torch.randn(1, hkv, cap, d, generator=g).to(dtype) for _ in range(2))
        q = torch.randn(t, hq, d, generator=g).to(dtype)
        k, v = (torch.randn(t, hkv, d, generator=g).to(dtype) for _ in range(2))
        block = torch.ops.orthrus.cached_attention(q, k, v, kc.clone(), vc.clone(), torch.tensor(n), 0, d ** -0.5)
        kc2, vc2 = kc.clone(), vc.clone()
        for j in range(t):
            step = torch.ops.orthrus.cached_attention(q[j:j + 1], k[j:j + 1], v[j:j + 1], kc2, vc2,
                                                      torch.tensor(n + j), 0, d ** -0.5)
            assert torch.equal(step, block[j:j + 1]), (n, j)


def test_cached_attention_rejects_overflow():
    gen = torch.Generator().manual_seed(0)
    q, k, v, kc, vc = random_case(gen, cap=8)
    with pytest.raises(ValueError, match="exceeds cache capacity"):
        torch.ops.orthrus.cached_attention(q, k, v, kc, vc, torch.tensor(4), 0, 1.0)


def test_ops_survive_export_as_single_nodes():
    gen = torch.Generator().manual_seed(1)
    q, k, v, kc, vc = random_case(gen)

    class Step(torch.nn.Module):
        def forward(self, q, k, v, kc, vc, n):
            a = torch.ops.orthrus.cached_attention(q, k, v, kc, vc, n, 0, 0.5)
            return torch.ops.orthrus.diffusion_attention(a, k, v, kc, vc, n, 1, 0.5)

    ep = torch.export.export(Step(), (q, k, v, kc.clone(), vc.clone(), torch.tensor(3)), strict=False)
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count("orthrus.cached_attention.default") == 1
    assert targets.count("orthrus.diffusion_attention.default") == 1
    kc1, kc2 = kc.clone(), kc.clone()
    vc1, vc2 = vc.clone(), vc.clone()
    eager = Step()(q, k, v, kc1, vc1, torch.tensor(3))
    traced = ep.module()(q, k, v, kc2, vc2, torch.tensor(3))
    assert torch.equal(eager, traced) and torch.equal(kc1, kc2), "the traced step must mutate the cache like eager"


def test_importing_the_plugins_imports_no_onnx():
    """onnx and onnxruntime are optional extras: only the ONNX code paths import the ops' onnx/onnxruntime parts."""
    code = ("import sys, orthrus_plugins; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('onnx', 'onnxruntime', 'onnxruntime_extensions') or m.endswith(('.onnx', '.onnxruntime'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def naive_qk_norm_rope(x, w, cos, sin, eps):
    """One head row at a time in float64: ``w · x / sqrt(mean(x²) + eps)``, then ``y·cos + [-y₂, y₁]·sin``."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    d = x.shape[-1]
    for t in range(x.shape[0]):
        for h in range(x.shape[1]):
            row = x[t, h].double()
            y = w.double() * row / math.sqrt(float((row * row).mean()) + eps)
            rot = torch.cat([-y[d // 2:], y[:d // 2]])
            out[t, h] = y * cos[t, 0].double() + rot * sin[t, 0].double()
    return out


def test_compiled_layers_gather_the_rope_tables_once():
    """``orthrus::qk_norm_rope`` takes any layout (``flexible_layout``): Inductor realizes the cos/sin rows a pass
    gathers once for all its layers. At the default (exact strides) it wrote a copy for every layer's call — in the
    8B batch-1 GPU cycle 36 launches of ~1.7 us. Compiled (caches off: an entry cached before the tag was seen to be
    served) == eager."""
    import re

    from torch._inductor import config
    from torch._inductor.utils import run_and_get_code
    from orthrus_plugins.qk_norm_rope import random_inputs
    n, hq, hkv, d, layers = 8, 4, 2, 16, 3
    qkv, qw, kw, _, _ = random_inputs(n, hq, hkv, d, torch.float32, torch.Generator().manual_seed(5))
    table = torch.randn(64, d, generator=torch.Generator().manual_seed(6))

    class Pass(torch.nn.Module):
        def forward(self, x, cos_t, sin_t, start):
            pos = start + torch.arange(n)
            cos, sin = cos_t.index_select(0, pos)[:, None, :], sin_t.index_select(0, pos)[:, None, :]
            for _ in range(layers):
                q, k = torch.ops.orthrus.qk_norm_rope(x, qw, kw, cos, sin, hq, hkv, 1e-6)
                x = x + torch.cat([q.reshape(n, -1), k.reshape(n, -1), k.reshape(n, -1)], 1)
            return x
    args = (qkv, table.cos(), table.sin(), torch.tensor(5))
    ep = torch.export.export(Pass(), args, strict=False)
    with config.patch(force_disable_caches=True):
        out, code = run_and_get_code(torch.compile(ep.module()), *args)
    assert torch.allclose(out, ep.module()(*args), atol=1e-5)
    gathered = re.findall(rf"empty_strided\w*\(\({n}, (?:1, )?{d}\)", "\n".join(code))
    assert len(gathered) == 2, gathered  # cos and sin, not one pair a layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_rope_matches_naive_and_the_inline_spelling(dtype):
    """``orthrus::qk_norm_rope`` (the reference, CPU): within rounding of a float64 loop; bitwise what the engines'
    forward computed inline before the op (``rms_norm`` then ``rotate`` of the split heads), so CPU engines keep
    their bits; tokens independent; one node when traced; bad shapes refused."""
    from orthrus_plugins.qk_norm_rope import random_inputs, rms_norm, rotate
    n, hq, hkv, d = 6, 4, 2, 16
    qkv, qw, kw, cos, sin = random_inputs(n, hq, hkv, d, dtype, torch.Generator().manual_seed(3))
    q, k = torch.ops.orthrus.qk_norm_rope(qkv, qw, kw, cos, sin, hq, hkv, 1e-6)
    assert q.shape == (n, hq, d) and k.shape == (n, hkv, d) and q.dtype == k.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    heads = ((q, qkv[:, :hq * d].reshape(n, hq, d), qw), (k, qkv[:, hq * d:(hq + hkv) * d].reshape(n, hkv, d), kw))
    for got, rows, w in heads:
        want = naive_qk_norm_rope(rows.float(), w.float(), cos.float(), sin.float(), 1e-6)
        assert ((got.double() - want).abs() <= tol * (1 + want.abs())).all()
        assert torch.equal(got, rotate(rms_norm(rows, w, 1e-6), cos, sin))
    for i in range(n):
        qi, ki = torch.ops.orthrus.qk_norm_rope(qkv[i:i + 1], qw, kw, cos[i:i + 1], sin[i:i + 1], hq, hkv, 1e-6)
        assert torch.equal(qi[0], q[i]) and torch.equal(ki[0], k[i])

    class Heads(torch.nn.Module):
        def forward(self, qkv, qw, kw, cos, sin):
            return torch.ops.orthrus.qk_norm_rope(qkv, qw, kw, cos, sin, hq, hkv, 1e-6)
    ep = torch.export.export(Heads(), (qkv, qw, kw, cos, sin), strict=False)
    targets = [str(node.target) for node in ep.graph.nodes if node.op == "call_function"]
    assert targets.count("orthrus.qk_norm_rope.default") == 1
    with pytest.raises(ValueError, match="qkv"):
        torch.ops.orthrus.qk_norm_rope(qkv[:, 1:], qw, kw, cos, sin, hq, hkv, 1e-6)
    with pytest.raises(ValueError, match="cos/sin"):
        torch.ops.orthrus.qk_norm_rope(qkv, qw, kw, cos[:, 0], sin[:, 0], hq, hkv, 1e-6)
