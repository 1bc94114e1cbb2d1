"""Verify rows vs decode steps, op by op: each op an engine's forward runs, called once on a 32-token block and
then once per token (as a decode step computes it), compared bit for bit. A verify block's logits equal one-token
decode logits only if every op is row-invariant in this sense; Orthrus output equals the engine's own AR output by
construction only then (DESIGN.md §2). Random inputs at a model's shapes, on the GPU (its kernels, each FP8 kernel
and attention at several split counts and query blocks) or the CPU (the reference implementations CPU engines run);
prints one line per op and setting (max |difference|, rows equal) and writes them as JSON.

    python scripts/row_invariance.py --shape tiny --out r.json     # and --shape 8b; --device cpu
"""

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # hidden, query heads, kv heads, head dim, intermediate, vocab
    "tiny": (256, 4, 2, 64, 768, 6144),
    "8b": (4096, 32, 8, 128, 12288, 151936),
}


def main(argv=None) -> int:
    import torch.nn.functional as F

    import orthrus_plugins  # noqa: F401  (registers the ops)
    from orthrus_plugins import fp8_linear as op
    from orthrus_plugins.qk_norm_rope import rms_norm
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    hidden, hq, hkv, d, inter, vocab = SHAPES[a.shape]
    b, dev = a.block, torch.device(a.device)
    gpu = dev.type == "cuda"
    g = torch.Generator(device=dev).manual_seed(0)

    def r(*shape, s=1.0):
        return (torch.randn(*shape, device=dev, generator=g) * s).to(torch.bfloat16)
    results = []

    def report(name, setting, block, steps):
        diff = (block.float() - steps.float()).abs().max().item()
        rows = sum(bool(torch.equal(block[i], steps[i])) for i in range(block.shape[0]))
        results.append({"op": name, **setting, "max_abs_diff": diff, "rows_equal": rows, "rows": block.shape[0]})
        print(f"{name:34s} {json.dumps(setting):44s} rows equal {rows}/{block.shape[0]}  max |diff| {diff:.3g}",
              flush=True)

    def check(name, fn, x, **setting):
        report(name, setting, fn(x), torch.cat([fn(x[i:i + 1]) for i in range(x.shape[0])]))

    x = r(b, hidden)
    norm_w = r(hidden, s=0.1) + 1
    check("rms_norm (eager)", lambda t: rms_norm(t, norm_w, 1e-6), x)
    compiled = torch.compile(lambda t: rms_norm(t, norm_w, 1e-6), dynamic=False)
    check("rms_norm (inductor, static shapes)", compiled, x)
    qn = r(d, s=0.1) + 1
    q_norm = lambda t: rms_norm(t.reshape(-1, hq, d), qn, 1e-6).reshape(t.shape[0], -1)  # noqa: E731
    xq = r(b, hq * d)
    check("q rms_norm (eager)", q_norm, xq)
    # rows of head_dim elements: Inductor autotunes among several row-per-program tilings for reductions this short
    # (torch 2.13's heuristics), and a decode step's program compiles apart from a verify block's
    check("q rms_norm (inductor, static shapes)", torch.compile(q_norm, dynamic=False), xq)
    # what engines run since: the q/k heads' norm and RoPE as one op (one program per token and head on a GPU)
    qkv, kn = r(b, (hq + 2 * hkv) * d), r(d, s=0.1) + 1
    cos, sin = r(b, 1, d), r(b, 1, d)

    def qk(rows):
        q, k = torch.ops.orthrus.qk_norm_rope(qkv[rows], qn, kn, cos[rows], sin[rows], hq, hkv, 1e-6)
        return torch.cat([q.reshape(q.shape[0], -1), k.reshape(k.shape[0], -1)], 1)
    report("q/k norm + RoPE orthrus::qk_norm_rope", {}, qk(slice(0, b)),
           torch.cat([qk(slice(i, i + 1)) for i in range(b)]))
    head = r(vocab, hidden, s=0.02)
    check("head F.linear (cuBLAS on a GPU)", lambda t: F.linear(t, head), x)
    check("head orthrus::invariant_linear", lambda t: torch.ops.orthrus.invariant_linear(t, head), x)
    wq, ws = op.quantize_weight(r(2 * inter, hidden, s=0.02).float())
    for kernel in [k for k in op.MATMUL_KERNELS if k != "reference"] if gpu else ["auto"]:  # the CPU: reference
        check("gate_up orthrus::fp8_linear", lambda t: torch.ops.orthrus.fp8_linear(t, wq, ws, kernel), x,
              kernel=kernel)
    check("gate_up split_linear (inductor)", torch.compile(lambda t: op.split_linear(t, wq, ws, "auto"), dynamic=False),
          x)

    # cached attention (the op: the Triton kernel on a GPU, the reference on the CPU, which ignores the kernel
    # settings): a verify block of b tokens at cache length n vs b decode steps at n, n + 1, ...
    attend = torch.ops.orthrus.cached_attention
    layers, cap = 2, 4200
    for n in (100, 1000, 4000):
        for splits, query_block in [(4, 0), (4, 16), (16, 0), (16, 16)] if gpu else [(16, 0)]:
            kc, vc = r(layers, hkv, cap, d), r(layers, hkv, cap, d)
            q, k, v = r(b, hq, d), r(b, hkv, d), r(b, hkv, d)
            kw = {"splits": splits, "query_block": query_block}
            block = attend(q, k, v, kc, vc, torch.tensor(n, device=dev), 1, d ** -0.5, **kw)
            steps = torch.cat([attend(q[i:i + 1], k[i:i + 1], v[i:i + 1], kc, vc, torch.tensor(n + i, device=dev), 1,
                                      d ** -0.5, **kw) for i in range(b)])
            report("cached attention", {"n": n, **(kw if gpu else {})}, block, steps)
    if a.out:
        Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(dev) if gpu else "cpu",
                                           "torch": torch.__version__,
                                           "shape": a.shape, "block": b, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
