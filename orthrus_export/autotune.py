"""Build-time autotuning on the GPU the engine is built for.

The tuned quantity is what decoding spends its time on: the latency of one whole greedy cycle (draft, verify and
acceptance, one CUDA-graph replay: ``Engine.time_step("cycle", …)``), median of ``iters`` replays at each tuning
context and batch size, summed over them. Candidates: the attention kernels' key-range splits × query blocks (query
rows per program) at 64-key tiles, then the other key tiles at the best of those (32-key tiles won 10-17% of a
batch-8 attention call on an H100 and lost 2% at batch 1: ``benchmarks/h100-attention-launch.json``), then the
kernels' other launches (``LAUNCH_CANDIDATES``: two programs an SM, fp32 split outputs, folded split programs) at
the best of those, all timed on the first backend (re-specialising the traced programs is cheap), then every other
pass backend (Inductor) at the best attention options, so each backend is compiled once. The engine ends with the
fastest options; every candidate is recorded. Options are engine-wide, never chosen per batch size: that keeps a row's
result independent of what it is batched with.
"""

import time
from collections.abc import Callable

from orthrus_plugins.attention_common import DEFAULT_BLOCK_N, LAUNCH_CANDIDATES

SPLIT_CANDIDATES = (8, 16, 32)
QUERY_BLOCK_CANDIDATES = (0,)  # 0: all of a row's query rows per program (measure before adding more)
BLOCK_N_CANDIDATES = (DEFAULT_BLOCK_N, 32)  # keys per loop iteration of the attention kernel, the default first


def tuning_contexts(max_seq_len: int, block_size: int) -> list[int]:
    """Cache lengths to tune at: every one of 512, 4k, 16k and 32k the engine can hold (the best attention split
    count grows with the context: tuning at short contexts only picks too few splits for long ones)."""
    fits = [c for c in (512, 4096, 16384, 32768) if c + 2 * block_size <= max_seq_len]
    return fits or [max(1, max_seq_len // 2)]


def autotune(engine, backends: list[str], contexts: list[int], iters: int = 20,
             splits: tuple[int, ...] = SPLIT_CANDIDATES, log: Callable[[str], None] | None = None,
             query_blocks: tuple[int, ...] = QUERY_BLOCK_CANDIDATES, batches: tuple[int, ...] | None = None,
             block_ns: tuple[int, ...] = BLOCK_N_CANDIDATES, launches: tuple[str, ...] = LAUNCH_CANDIDATES):
    """Time the candidates on ``engine`` (re-specialised in place) at every context × batch size (by default batch 1
    and the engine's max batch size); return ``(engine with the fastest options, record)``."""
    t_all = time.perf_counter()
    batches = tuple(sorted({1, engine.max_batch_size})) if batches is None else tuple(batches)
    candidates, prepare_s = [], {}
    points = [(c, b) for c in contexts for b in batches]

    def measure(options):
        t0 = time.perf_counter()
        engine.with_options(options)
        prepare_s.setdefault(options.backend, round(time.perf_counter() - t0, 3))
        ms = [engine.time_step("cycle", c, iters, batch=b) for c, b in points]
        cand = {"backend": options.backend, "attention_splits": options.attention_splits,
                "attention_query_block": options.attention_query_block, "attention_block_n": options.attention_block_n,
                "attention_launch": options.attention_launch, "cycle_ms": [round(m, 4) for m in ms], "options": options}
        candidates.append(cand)
        if log:
            log(f"autotune: {options.backend:8s} splits {options.attention_splits:2d} query block "
                f"{options.attention_query_block:2d} key tile {options.attention_block_n:3d} launch "
                f"{options.attention_launch or 'default'}: cycle " + ", ".join(
                    f"{m:.3f} ms @ {c}" + (f" x{b}" if b > 1 else "") for m, (c, b) in zip(ms, points)))
        return cand

    base = engine.options
    first = [measure(base.replace(backend=backends[0], attention_splits=n, attention_query_block=q,
                                  attention_block_n=block_ns[0], attention_launch=launches[0]))
             for n in splits for q in query_blocks]
    best_first = min(first, key=lambda c: sum(c["cycle_ms"]))["options"]
    first += [measure(best_first.replace(attention_block_n=bn)) for bn in block_ns[1:]]
    best_first = min(first, key=lambda c: sum(c["cycle_ms"]))["options"]
    first += [measure(best_first.replace(attention_launch=spec)) for spec in launches[1:]]
    best_first = min(first, key=lambda c: sum(c["cycle_ms"]))["options"]
    for backend in backends[1:]:
        measure(best_first.replace(backend=backend))
    best = min(candidates, key=lambda c: sum(c["cycle_ms"]))
    if engine.options != best["options"]:
        engine.with_options(best["options"])
    record = {"metric": f"greedy cycle latency (CUDA-graph replay), median of {iters}, summed over the contexts "
                        "and batch sizes",
              "contexts": contexts, "batches": list(batches), "points": [list(p) for p in points],
              "candidates": [{k: v for k, v in c.items() if k != "options"} for c in candidates],
              "backend": best["backend"], "attention_splits": best["attention_splits"],
              "attention_query_block": best["attention_query_block"], "attention_block_n": best["attention_block_n"],
              "attention_launch": best["attention_launch"],
              "prepare_seconds": prepare_s, "seconds": round(time.perf_counter() - t_all, 3),
              "note": f"attention options timed on the {backends[0]} backend, other backends at the best of them"}
    return engine, record
