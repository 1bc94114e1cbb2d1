"""Every Triton kernel an engine launches, compiled for a Hopper GPU on a machine without one.

The plugins' real launch code runs on CPU tensors of a model's shapes (the strides and views ``model.py`` gives the
kernels: v a slice of the QKV product, cache_len and slots columns of the runtime's row buffers); Triton specializes
and compiles each launch as its JIT does on the GPU (pointer alignment, integers equal to 1 or divisible by 16), down
to the cubin with the ptxas it ships, and a compile-only driver records the binary instead of launching it. Per
launch: programs, warps, stages, dynamic shared memory, registers, local memory (spills), the matrix instructions in
the SASS (``HGMMA``/``QGMMA``: Hopper's warpgroup MMA, bf16/fp8; ``HMMA``: the older warp MMA), its asynchronous
copies (``LDGSTS``: cp.async, a software-pipelined main loop; ``UTMALDG``: TMA), CTAs per SM from those resources
(H100/H200 limits) and the SMs the launch keeps busy. Then, per kernel and weight shape, the number of distinct
binaries over the engine's row counts: one binary for a decode step, a verify block and a batched pass is part of
batch invariance by construction (the same instructions for every row). The FP8 GEMM may take wider tiles from
``WIDE_ROWS`` rows (a second binary): for it what must be one is each output element's K loop (``K_LOOP``) and
its matrix instructions' M and K (``arithmetic``). The attention's split kernel has a second binary for a lone row
(it takes the row's new K/V from the projections and writes them into the cache itself), the same but for those
loads and stores (``LOADS_AND_STORES``).

Static facts, not timings: ``sms_used`` below the SM count names a launch that leaves SMs idle, whatever its speed.
``--check`` exits 1 when a launch does not compile for the target, needs more shared memory than a CTA may have,
spills, or a kernel compiles to more than one binary over row counts (the GEMM: more than one K loop).

    pip install --target /tmp/tritonpkg triton==3.6.0   # the GPU machine's Triton; not a dependency
    PYTHONPATH=/tmp/tritonpkg python scripts/kernel_report.py --shape 8b --batches 1,8 --out report.json --check
"""

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Hopper (sm_90) per-SM limits: threads, CTAs, 32-bit registers, shared memory (a CTA may take 227 KB of the 228,
# and each CTA reserves 1 KB); registers are allocated per warp in units of 256
SM90 = dict(threads=2048, ctas=32, registers=65536, shared_sm=233472, shared_cta=232448, reserved=1024)
MMA = ("HGMMA", "QGMMA", "HMMA", "IMMA")
COPIES = ("LDGSTS", "UTMALDG", "UBLKCP")


def resources(cubin: bytes) -> dict:
    """Registers, local memory, static shared memory and an opcode census of a cubin (``cuobjdump``)."""
    import triton
    tool = triton.knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    opcode = r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)"  # "/*0120*/  @!P0 LDGSTS.E ..."
    full = Counter(re.findall(opcode, sass))
    ops = Counter()
    for m, c in full.items():
        ops[m.split(".")[0]] += c
    return {"registers": int(fields["REG"]), "local_bytes": int(fields["LOCAL"]), "stack_bytes": int(fields["STACK"]),
            "static_shared": int(fields["SHARED"]), "mma": {k: ops[k] for k in MMA if ops[k]},
            # with their shapes and types ("QGMMA.64x32x32.F32.E4M3.E4M3": m64 n32 k32, e4m3 into fp32)
            "mma_shapes": {m: c for m, c in sorted(full.items()) if m.split(".")[0] in MMA},
            "async_copies": {k: ops[k] for k in COPIES if ops[k]}}


def ctas_per_sm(warps: int, registers: int, shared: int) -> int:
    """Resident CTAs per SM for a kernel's warps, registers per thread and shared memory per CTA (sm_90 limits)."""
    per_warp = math.ceil(registers * 32 / 256) * 256
    by_regs = (SM90["registers"] // per_warp) // warps if per_warp else SM90["ctas"]
    by_shared = SM90["shared_sm"] // (shared + SM90["reserved"])
    return max(0, min(SM90["ctas"], SM90["threads"] // (32 * warps), by_regs, by_shared))


class CompileOnly:
    """A Triton driver for a GPU this machine does not have: Triton's own compiler builds each launch's binary for
    ``arch``; the launch is recorded (label, grid, binary), not run."""

    def __init__(self, arch: int, sms: int):
        from triton.backends.compiler import GPUTarget
        self.target, self.sms = GPUTarget("cuda", arch, 32), sms
        self.label = self.group = None
        self.records: list[dict] = []
        self.binaries: dict[int, dict] = {}
        self.utils = SimpleNamespace(load_binary=self._load,
                                     get_device_properties=lambda device: {"max_shared_mem": SM90["shared_cta"],
                                                                           "multiprocessor_count": sms})

    # what triton.runtime.jit and triton.compiler ask of the active driver
    def is_active(self):
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("kernel_report compiles; it times nothing")

    def map_python_to_cpp_type(self, ty):
        raise RuntimeError("kernel_report builds no launcher")

    def _load(self, name, cubin, shared, device):
        handle = len(self.binaries) + 1
        self.binaries[handle] = resources(cubin)
        return None, handle, self.binaries[handle]["registers"], self.binaries[handle]["local_bytes"], 1024

    def launcher_cls(self, src, metadata):
        def launch(g0, g1, g2, stream, function, packed, launch_metadata, enter, exit_, *args):
            res = self.binaries[function]
            shared = max(metadata.shared, res["static_shared"])
            ctas = ctas_per_sm(metadata.num_warps, res["registers"], shared)
            programs = g0 * g1 * g2
            self.records.append({
                "launch": self.label, "group": self.group, "kernel": metadata.name, "binary": metadata.hash[:12],
                "constants": {k: v for (i,), v in src.constants.items()
                              for k in [src.fn.arg_names[i]] if isinstance(v, (int, bool, str))},
                "grid": [g0, g1, g2], "programs": programs, "num_warps": metadata.num_warps,
                "num_stages": metadata.num_stages, "shared_bytes": shared, **res, "ctas_per_sm": ctas,
                "waves": round(programs / (ctas * self.sms), 3) if ctas else None,
                "sms_used": min(programs, self.sms)})
        return launch


def projections(cfg) -> dict[str, tuple[int, int]]:
    """A layer's linear projections as an engine packs them: name -> (N, K) of the [N, K] weight."""
    hidden, hq, hkv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    return {"qkv": ((hq + 2 * hkv) * d, hidden), "o": (hidden, hq * d), "gate_up": (2 * cfg.intermediate_size, hidden),
            "down": (hidden, cfg.intermediate_size)}


def wide_launches(name: str, rows: int):
    """``(label, group, call)`` for the wider-row FP8 tilings ``scripts/sweep_linear.py --wide`` times on a GPU, at
    every projection of the model ``name`` with ``rows`` rows (so that none of them fails there for want of shared
    memory or registers)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import sweep_linear
    from orthrus_export.bench import qwen3_config
    from orthrus_plugins.fp8_linear import kernel as fk
    out = []
    for p, (n, k) in projections(qwen3_config(name)).items():
        w, ws = torch.zeros(n, k, dtype=torch.float8_e4m3fn), torch.ones(n)
        xq, xs = torch.zeros(rows, k, dtype=torch.float8_e4m3fn), torch.ones(rows, 1)
        for c in sweep_linear.wide(fk.config(n, k, 132)):
            out.append((f"wide {p} fp8 GEMM [{rows}, {k}] x [{n}, {k}] {c}", f"wide {p} {c}",
                        lambda w=w, ws=ws, xq=xq, xs=xs, c=c: fk._gemm(xq, xs, w, ws, torch.bfloat16, c)))
    return out


def kernel_launches(name: str, batches: list[int], context: int, attention_launch=None):
    """``(label, group, call)`` for every kernel launch of an engine of the model ``name`` at each batch size: the FP8
    GEMM of each projection (its quantization too, as uncompiled engines run it; the TMA tiling, kernel
    ``triton-tma``, too), the q/k heads' norm and RoPE, the BF16 head of an FP8 engine
    (``orthrus::invariant_linear``) and both attention modes, for decode steps (1 token a row) and draft/verify
    blocks (32 tokens a row); ``attention_launch``: the attention kernels' ``Launch`` (default: theirs)."""
    from orthrus_export.bench import qwen3_config
    from orthrus_plugins.attention_common import kernel as attn
    from orthrus_plugins.fp8_linear import kernel as fk
    from orthrus_plugins.qk_norm_rope import kernel as qkn_kernel
    attention_launch = attention_launch or attn.DEFAULT_LAUNCH
    cfg = qwen3_config(name)
    hidden, hq, hkv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    block = cfg.block_size
    e4m3 = torch.float8_e4m3fn
    weights = {p: (torch.zeros(n, k, dtype=e4m3), torch.ones(n)) for p, (n, k) in projections(cfg).items()}
    head = torch.zeros(cfg.vocab_size, hidden, dtype=torch.bfloat16)
    out = []
    for s in batches:
        cap = context + 2 * block
        k_cache = torch.zeros(2, s + 1, hkv, cap, d, dtype=torch.bfloat16)  # layer 1 of two: a non-zero offset
        v_cache = torch.zeros_like(k_cache)
        ints = torch.zeros(s, 2 * block + 8, dtype=torch.int64)  # the runtime's row buffer: lengths and slots are
        ints[:, 1] = context                                      # int64 columns of it
        ints[:, 0] = torch.arange(s)
        slots, lens = ints[:, 0], ints[:, 1]
        for t in sorted({1, block}):
            m = s * t
            step = "decode" if t == 1 else "block"
            for p, (w, ws) in weights.items():
                n, k = w.shape
                x = torch.zeros(m, k, dtype=torch.bfloat16)
                xq, xs = torch.zeros(m, k, dtype=e4m3), torch.ones(m, 1)
                out.append((f"S={s} {step} {p} quantize [{m}, {k}]", f"{p} quantize [M, {k}]",
                            lambda x=x: fk.quantize(x)))
                out.append((f"S={s} {step} {p} fp8_matmul [{m}, {k}] x [{n}, {k}]",
                            f"{p} fp8_matmul [M, {k}] x [{n}, {k}]",
                            lambda xq=xq, xs=xs, w=w, ws=ws: fk.fp8_matmul(xq, xs, w, ws, torch.bfloat16)))
                out.append((f"S={s} {step} {p} fp8_matmul tma [{m}, {k}] x [{n}, {k}]",
                            f"{p} fp8_matmul tma [M, {k}] x [{n}, {k}]",
                            lambda xq=xq, xs=xs, w=w, ws=ws: fk.fp8_matmul(xq, xs, w, ws, torch.bfloat16,
                                                                           tiling=fk.tma_config)))
            x = torch.zeros(m, hidden, dtype=torch.bfloat16)
            out.append((f"S={s} {step} head invariant_linear [{m}, {hidden}] x {list(head.shape)}",
                        f"head invariant_linear [M, {hidden}] x {list(head.shape)}", lambda x=x: fk.linear(x, head)))
            qkv = torch.zeros(m, (hq + 2 * hkv) * d, dtype=torch.bfloat16)
            qkn, cs = torch.ones(d, dtype=torch.bfloat16), torch.zeros(m, 1, d, dtype=torch.bfloat16)
            out.append((f"S={s} {step} qk_norm_rope [{m}, {qkv.shape[1]}]", "qk_norm_rope",
                        lambda qkv=qkv, cs=cs: qkn_kernel.qk_norm_rope(qkv, qkn, qkn, cs, cs, hq, hkv, 1e-6)))
            q = torch.zeros(m, hq, d, dtype=torch.bfloat16)   # after the norm and RoPE: new tensors
            k = torch.zeros(m, hkv, d, dtype=torch.bfloat16)
            v = qkv[:, (hq + hkv) * d:].reshape(m, hkv, d)    # a strided view, as model.py passes it
            modes = [("verify" if t > 1 else "decode", True)] + ([("draft", False)] if t > 1 else [])
            for mode, causal in modes:
                kind = "cached" if causal else "diffusion"
                out.append((f"S={s} {mode} attention ({kind}, {context} keys)", f"{kind} attention",
                            lambda q=q, k=k, v=v, kc=k_cache, vc=v_cache, ln=lens, sl=slots, c=causal:
                            attn.attention(q, k, v, kc, vc, ln, 1, d ** -0.5, causal=c, slots=sl,
                                           launch=attention_launch)))
    return out


# kernels whose tiles may follow the row count (plugins/fp8_linear/kernel.py, wide_config), and the constants that
# fix each output element's arithmetic, which may not: the K steps, the K slices, the operand order
K_LOOP = {"_gemm_kernel": ("BLOCK_K", "K_PER_SPLIT", "SPLIT_K", "SWAP", "SCALED")}
# kernels with a specialization that moves data only (plugins/attention_common/kernel.py: a lone row's split kernel
# loads its new keys from K and V, not the cache, and writes them into the cache, WRITE; a batch's rows get a launch
# of their own for that), which may follow the row count: what may not is every other constant and the matrix
# instructions (the GPU tests show a row alone bitwise equal to its batched row)
LOADS_AND_STORES = {"_split_kernel": ("WRITE",)}


def distinct_binaries(records: list[dict], what=lambda r: r["binary"]) -> dict:
    """Per kernel and group (one weight shape, or one attention mode: the launches whose rows must compute alike
    whatever the row count), the binaries compiled over the row counts (``what``: another property of a launch)."""
    groups: dict[str, set] = {}
    for r in records:
        groups.setdefault(f"{r['kernel']}: {r['group']}", set()).add(what(r))
    return {k: sorted(v) for k, v in sorted(groups.items())}


def arithmetic(r: dict) -> str:
    """What must not change over row counts in the launch ``r``: its binary; for a kernel of ``LOADS_AND_STORES`` its
    constants but those and its matrix instructions; for a kernel of ``K_LOOP`` the
    constants of its K loop and its matrix instructions but for their N (``QGMMA.64x32x32`` and ``QGMMA.64x128x32``
    both sum 32 e4m3 products into an fp32 element; N is the row tile, with the weight tile on the MMA's M side)."""
    if r["kernel"] in LOADS_AND_STORES:
        return json.dumps({**{c: v for c, v in r["constants"].items() if c not in LOADS_AND_STORES[r["kernel"]]},
                           "mma": r.get("mma_shapes", {})}, sort_keys=True)
    keep = K_LOOP.get(r["kernel"])
    if not keep:
        return r["binary"]
    mma = sorted({re.sub(r"^(\w+\.\d+)x\d+x", r"\1xNx", m) for m in r.get("mma_shapes", {})})
    return json.dumps({**{c: r["constants"].get(c) for c in keep}, "mma": mma}, sort_keys=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=["1.7b", "4b", "8b"], default="8b")
    ap.add_argument("--batches", default="1,8", help="batch sizes (rows of 32 tokens), comma-separated")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100, H200)")
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--wide", action="store_true", help="also the wider-row FP8 tilings scripts/sweep_linear.py "
                                                        "--wide times, at 32 rows a batch row of the largest batch")
    ap.add_argument("--attention-launch", default="", help="the attention kernels' launch as field=value,... "
                    "(Launch.from_spec, e.g. num_stages=2,max_registers=128; default: the kernels' own)")
    ap.add_argument("--out", help="write the report as JSON")
    ap.add_argument("--check", action="store_true", help="exit 1 on a failed compile, a spill, shared memory over "
                                                         "the limit or a kernel with several binaries (the GEMM: "
                                                         "K loops) over row counts")
    a = ap.parse_args(argv)
    import triton
    from triton.runtime import driver

    import orthrus_plugins  # noqa: F401  (the ops and their kernels)
    drv = CompileOnly(a.arch, a.sms)
    driver.set_active(drv)
    problems = []  # (the driver stays active: without a GPU Triton has no default one to go back to)
    batches = [int(b) for b in a.batches.split(",")]
    from orthrus_plugins.attention_common.kernel import Launch
    try:
        attention_launch = Launch.from_spec(a.attention_launch)
    except ValueError as e:
        ap.error(str(e))
    launches = kernel_launches(a.shape, batches, a.context, attention_launch)
    launches += wide_launches(a.shape, 32 * max(batches)) if a.wide else []
    for label, group, call in launches:
        drv.label, drv.group = label, group
        try:
            call()
        except Exception as e:  # noqa: BLE001  (a compile error is a finding: report it, go on)
            problems.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    for r in drv.records:
        mma = ",".join(f"{k}×{v}" for k, v in r["mma"].items()) or "-"
        copies = ",".join(f"{k}×{v}" for k, v in r["async_copies"].items()) or "-"
        print(f"{r['launch']:70s} {r['kernel']:20s} programs {r['programs']:6d} warps {r['num_warps']} "
              f"stages {r['num_stages']} smem {r['shared_bytes'] // 1024:3d} KB regs {r['registers']:3d} "
              f"local {r['local_bytes']} CTAs/SM {r['ctas_per_sm']} SMs {r['sms_used']:3d}/{a.sms} mma {mma} "
              f"async {copies}")
        if r["local_bytes"] or r["ctas_per_sm"] == 0:
            problems.append(f"{r['launch']}: {r['kernel']} spills {r['local_bytes']} bytes / fits "
                            f"{r['ctas_per_sm']} CTAs per SM")
    binaries, arithmetics = distinct_binaries(drv.records), distinct_binaries(drv.records, arithmetic)
    for group, kinds in arithmetics.items():
        if len(kinds) > 1:
            kernel = group.split(":")[0]
            what = "K loops" if kernel in K_LOOP else "arithmetics" if kernel in LOADS_AND_STORES else "binaries"
            problems.append(f"{group}: {len(kinds)} {what} over row counts ({', '.join(kinds)})")
    for p in problems:
        print("PROBLEM", p)
    print(f"{len(drv.records)} launches compiled for sm_{a.arch} with Triton {triton.__version__}, "
          f"{len(problems)} problems")
    if a.out:
        Path(a.out).write_text(json.dumps({"shape": a.shape, "batches": a.batches, "context": a.context,
                                           "arch": a.arch, "sms": a.sms, "triton": triton.__version__,
                                           "launches": drv.records, "binaries": binaries,
                                           "arithmetic": arithmetics, "problems": problems},
                                          indent=1) + "\n")
    return 1 if a.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
