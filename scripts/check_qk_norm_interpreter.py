"""``orthrus::qk_norm_rope``'s Triton kernel on the CPU, under Triton's interpreter (no GPU needed): fp32 and fp16
(the interpreter mishandles bf16), head dims 16 and 128, qkv rows strided (a view into a wider buffer, as a fused
projection's output can be), against the reference; every output written; each token alone bitwise equal to its row
in the block. Exit 1 on the first failure.

    PYTHONPATH=/tmp/tritonpkg TRITON_INTERPRET=1 python scripts/check_qk_norm_interpreter.py   # seconds
"""

import sys

import torch

from orthrus_plugins.qk_norm_rope import kernel as qk
from orthrus_plugins.qk_norm_rope import random_inputs, reference

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}


def main() -> int:
    g = torch.Generator().manual_seed(0)
    for dtype in TOLERANCE:
        for n, hq, hkv, d in [(5, 4, 2, 16), (33, 32, 8, 128)]:
            qkv, qw, kw, cos, sin = random_inputs(n, hq, hkv, d, dtype, g, pad=8)  # strided rows
            q, k = qk.qk_norm_rope(qkv, qw, kw, cos, sin, hq, hkv, 1e-6)
            rq, rk = reference(qkv, qw, kw, cos, sin, hq, hkv, 1e-6)
            err = max((q.double() - rq.double()).abs().max().item(), (k.double() - rk.double()).abs().max().item())
            alone = [qk.qk_norm_rope(qkv[i:i + 1], qw, kw, cos[i:i + 1], sin[i:i + 1], hq, hkv, 1e-6) for i in range(n)]
            same = all(torch.equal(a[0][0], q[i]) and torch.equal(a[1][0], k[i]) for i, a in enumerate(alone))
            ok = torch.isfinite(q).all() and torch.isfinite(k).all() and err <= TOLERANCE[dtype] * 8 and same
            print(f"{dtype} N {n} Hq {hq} Hkv {hkv} D {d}: max difference {err:.2e}, tokens alone equal {same} "
                  f"{'ok' if ok else 'FAILED'}", flush=True)
            if not ok:
                return 1
    print("all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
