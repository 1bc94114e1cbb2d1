"""Where a decoding step's time goes, by kind, each kind against its own floor (bytes or FLOPs).

Input: the per-kernel (GPU) or per-operator (CPU) times of one step, ``Engine.profile_step``'s list, and the
step's CUDA-graph replay time (``Engine.time_step``). Output: time per kind, launches per kind, each kind's floor
and its ratio to it, and the time between kernels (replay less the kernels' sum). The kinds:

- ``gemm`` — the linear layers: cuBLAS kernels (``nvjet``, ``*gemm*``, ``*gemv*``, ``cutlass``, ``xmma``, split-K
  reduces, Inductor's matmul templates) and the fp8 linear's Triton kernels; on the CPU ``aten::mm``/``addmm``/
  ``bmm`` outside the attention ops, and everything inside ``orthrus::fp8_linear``/``fp8_matmul`` (a compiled
  program's quantization, fused by Inductor into the kernel before, is "other"). Floor: the weight bytes the
  step's passes read (``bench.pass_bytes``: the view's attention set, the MLPs, the norms, the head) over the copy
  bandwidth or, where a matmul rate is given and it is larger, the passes' FLOPs (``bench.pass_flops`` over every
  row's tokens) over that rate — each operand size at its own rate (``bench.matmul_rates``: an FP8 engine's e4m3
  layers at the FP8 tensor cores' rate, its BF16 head at bf16's): a batched pass of many tokens is bound by
  compute, not by its weight bytes.
- ``attention`` — the attention ops: their Triton kernels (split, merge, cache write); on the CPU everything inside
  ``orthrus::cached_attention``/``orthrus::diffusion_attention``. Floor: the K/V bytes of every row's cache at
  the context (``bench.kv_bytes``), read once per pass, or, where a matmul rate is given and it is larger, the
  attention's FLOPs over it (``bench.attention_flops``: QKᵀ and PV over the cached keys).
- ``other`` — norms, RoPE, residual adds, activations, casts and copies, argmax, sampling and acceptance
  (elementwise and reduction kernels, Inductor's fused ``triton_*`` kernels). Floor 0: their bytes are the
  activations, which can be consumed inside the GEMMs' prologues and epilogues; all of their time is overhead.
- ``between kernels`` — the step's time less the kernels' sum: on a GPU the gaps inside the replayed graph, on the
  CPU the host time between operators (dispatch, Python). Floor 0.

The floors of gemm and attention add up to the step floor that ``orthrus-export bench`` reports (one definition)
where the weight bytes bind (always at batch 1 on a GPU).
"""

from orthrus_export.bench import attention_flops, kv_bytes, matmul_dtypes, pass_bytes, pass_flops

KINDS = ("gemm", "attention", "other")
Rates = float | dict[int, float] | None  # a matmul rate (FLOP/s) for every operand, or one per element size
VIEWS = {"verify": ("ar",), "decode": ("ar",), "draft": ("diff",), "cycle": ("diff", "ar")}  # passes of a step
ATTENTION_KERNELS = ("_split_kernel", "_merge_kernel", "_cache_write_kernel")  # plugins/attention_common/kernel.py
FP8_KERNELS = ("_quant_kernel", "_gemm_kernel", "_gemm_tma_kernel", "_reduce_kernel")  # plugins/fp8_linear/kernel.py
GEMM_MARKS = ("nvjet", "gemm", "gemv", "cutlass", "xmma", "splitkreduce", "scaled_mm", "triton_tem_fused")
# the CPU operators that do a matmul's work (``aten::linear`` and ``aten::matmul`` only dispatch to them: their
# self time is dispatch overhead, kind "other")
CPU_GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_mm")


def kind_of(entry: dict) -> str:
    """The kind of one ``profile_step`` entry (a CUDA kernel, or a CPU operator with the ``orthrus::`` op it ran
    inside)."""
    name, within = entry["name"], entry.get("within")
    op = within or name
    if op.startswith("orthrus::") and op.endswith("_attention"):
        return "attention"
    if op in ("orthrus::fp8_linear", "orthrus::fp8_matmul"):
        return "gemm"
    if name.startswith("aten::"):
        return "gemm" if name in CPU_GEMM_OPS else "other"
    bare = name.split("(")[0].strip().split(" ")[-1]  # a Triton kernel's bare name; "void f<...>(args)" otherwise
    if bare in ATTENTION_KERNELS:
        return "attention"
    if bare in FP8_KERNELS or any(m in name.lower() for m in GEMM_MARKS):
        return "gemm"
    return "other"


def bound(bytes_ms: float, compute_ms: float | None) -> dict:
    """A kind's floor from its two bounds (milliseconds; ``compute_ms`` None without a matmul rate): the larger, and
    which one it is."""
    which = "compute" if compute_ms is not None and compute_ms > bytes_ms else "bytes"
    return {"bytes": bytes_ms, "compute": compute_ms, "floor": compute_ms if which == "compute" else bytes_ms,
            "bound": which}


def bounds_ms(cfg, weights: dict, step: str, context: int, rows: int, elem: int, bandwidth: float,
              matmul_rate: Rates = None) -> dict:
    """The GEMMs' and the attention's ``bound`` for ``step`` over ``rows`` sequences at cache length ``context`` (K/V
    elements of ``elem`` bytes): bytes over ``bandwidth`` bytes/s (the copy bandwidth: bytes read plus written),
    FLOPs over ``matmul_rate`` FLOP/s where given (``bench.pass_flops``, ``bench.attention_flops``; every row's
    tokens). ``matmul_rate`` is one rate for every operand, or a rate per element size (``bench.matmul_rates``):
    then each size's GEMM FLOPs go at its own rate (an FP8 engine's e4m3 layers at the FP8 rate, its head at the
    bf16 one) and the attention's at the K/V element size's; a size without a rate leaves that bound out."""
    views = VIEWS[step]
    tokens = rows * (1 if step == "decode" else cfg.block_size)

    def ms(amount, rate):
        return amount / rate * 1e3 if rate else None

    def rate_of(size):
        return matmul_rate.get(size) if isinstance(matmul_rate, dict) else matmul_rate

    per_size = [ms(sum(pass_flops(cfg, weights, v, tokens, size) for v in views), rate_of(size))
                for size in matmul_dtypes(cfg, weights)]
    gemm = bound(ms(sum(pass_bytes(cfg, weights, v) for v in views), bandwidth),
                 None if None in per_size else sum(per_size))
    attention = bound(ms(len(views) * rows * kv_bytes(cfg, context, elem), bandwidth),
                      ms(len(views) * attention_flops(cfg, context, tokens), rate_of(elem)))
    return {"gemm": gemm, "attention": attention}


def floors_ms(cfg, weights: dict, step: str, context: int, rows: int, elem: int, bandwidth: float,
              matmul_rate: Rates = None) -> dict:
    """Each kind's floor in milliseconds (``bounds_ms``'s floors; "other" 0)."""
    return floors_of(bounds_ms(cfg, weights, step, context, rows, elem, bandwidth, matmul_rate))


def floors_of(bounds: dict) -> dict:
    """Each kind's floor from ``bounds_ms``'s bounds ("other" 0: see the module's doc)."""
    return {"gemm": bounds["gemm"]["floor"], "attention": bounds["attention"]["floor"], "other": 0.0}


def breakdown(entries: list[dict], floors: dict, replay_ms: float | None = None) -> dict:
    """Time, launches, floor and ratio per kind; the kernels' sum; with ``replay_ms``, the time between kernels and
    the whole step against its floor."""
    kinds = {k: {"ms": 0.0, "launches": 0.0, "floor_ms": floors[k]} for k in KINDS}
    for e in entries:
        k = kinds[kind_of(e)]
        k["ms"] += e["ms"]
        k["launches"] += e.get("launches", 0)
    for k in kinds.values():
        k["ratio_to_floor"] = k["ms"] / k["floor_ms"] if k["floor_ms"] > 0 else None
        k["launches"] = round(k["launches"], 2)
    total = sum(k["ms"] for k in kinds.values())
    floor = sum(floors.values())
    out = {"kinds": kinds, "kernel_ms": total, "floor_ms": floor}
    if replay_ms is not None:
        out.update(replay_ms=replay_ms, between_kernels_ms=replay_ms - total, ratio_to_floor=replay_ms / floor)
    return out


def table(name: str, b: dict) -> list[str]:
    """Printable lines of one ``breakdown``."""
    head = f"{name}: kernels {b['kernel_ms']:.3f} ms, floor {b['floor_ms']:.3f} ms"
    if "replay_ms" in b:
        head += (f", step {b['replay_ms']:.3f} ms ({b['ratio_to_floor']:.2f}x floor), between kernels "
                 f"{b['between_kernels_ms']:.3f} ms")
    lines = [head]
    for kind, k in b["kinds"].items():
        ratio = f"{k['ratio_to_floor']:6.2f}x" if k["ratio_to_floor"] is not None else "   (0 floor)"
        line = f"  {kind:9s} {k['ms']:8.3f} ms {k['launches']:8.0f} launches  floor {k['floor_ms']:7.3f} ms {ratio}"
        bounds = b.get("bounds_ms", {}).get(kind)
        if bounds and bounds["compute"] is not None:
            line += (f"  ({bounds['bound']}-bound: bytes {bounds['bytes']:.3f} ms, "
                     f"FLOPs {bounds['compute']:.3f} ms)")
        lines.append(line)
    return lines


def profile_engine(engine, contexts: list[int], batches: list[int], steps: list[str], iters: int, bandwidth: float,
                   top: int = 12, log=print, matmul_rate: Rates = None) -> dict:
    """``breakdown`` of each step at each context and batch size: the step as decoding runs it
    (``Engine.time_step``: a CUDA-graph replay, or the eager body on the CPU) and its kernels or operators
    (``Engine.profile_step``); ``top`` of them kept per step, and the kinds' two bounds (``bounds_ms``). Fills
    the engine's cache with random K/V (never time zeros). Used by ``orthrus-export bench --profile`` and
    ``scripts/profile_gpu.py``."""
    engine.k_cache.normal_()
    engine.v_cache.normal_()
    elem = engine.k_cache.element_size()
    out = {}
    for ctx in contexts:
        for step in steps:
            for b in batches:
                replay = engine.time_step(step, ctx, iters, batch=b)
                entries = engine.profile_step(step, ctx, min(iters, 5), batch=b)
                bounds = bounds_ms(engine.config, engine.weights, step, ctx, b, elem, bandwidth, matmul_rate)
                r = breakdown(entries, floors_of(bounds), replay)
                r["bounds_ms"] = bounds
                r["top"] = entries[:top]
                name = f"{step} ctx {ctx} batch {b}"
                out[name] = r
                for line in table(name, r):
                    log(line)
    return out
