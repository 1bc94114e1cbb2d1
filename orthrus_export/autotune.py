"""Build-time autotuning on the GPU the engine is built for.

The tuned quantity is what decoding spends its time on: the latency of one whole greedy cycle (draft, verify and
acceptance, one CUDA-graph replay: ``Engine.time_step("cycle", …)``), median of ``iters`` replays at each tuning
context, summed over the contexts. Candidates: the attention kernels' key-range splits, timed on the first backend
(re-specialising the traced programs is cheap), then every other pass backend (Inductor) at the best split count,
so each backend is compiled once. The engine ends with the fastest options; every candidate is recorded.
"""

import time
from collections.abc import Callable

SPLIT_CANDIDATES = (8, 16, 32)


def tuning_contexts(max_seq_len: int, block_size: int) -> list[int]:
    """Cache lengths to tune at: every one of 512, 4k, 16k and 32k the engine can hold (the best attention split
    count grows with the context: tuning at short contexts only picks too few splits for long ones)."""
    fits = [c for c in (512, 4096, 16384, 32768) if c + 2 * block_size <= max_seq_len]
    return fits or [max(1, max_seq_len // 2)]


def autotune(engine, backends: list[str], contexts: list[int], iters: int = 20,
             splits: tuple[int, ...] = SPLIT_CANDIDATES, log: Callable[[str], None] | None = None):
    """Time the candidates on ``engine`` (re-specialised in place); return ``(engine with the fastest options,
    record)``."""
    t_all = time.perf_counter()
    candidates, prepare_s = [], {}

    def measure(options):
        t0 = time.perf_counter()
        engine.with_options(options)
        prepare_s.setdefault(options.backend, round(time.perf_counter() - t0, 3))
        ms = [engine.time_step("cycle", c, iters) for c in contexts]
        cand = {"backend": options.backend, "attention_splits": options.attention_splits,
                "cycle_ms": [round(m, 4) for m in ms], "options": options}
        candidates.append(cand)
        if log:
            log(f"autotune: {options.backend:8s} splits {options.attention_splits:2d}: cycle " + ", ".join(
                f"{m:.3f} ms @ {c}" for m, c in zip(ms, contexts)))
        return cand

    base = engine.options
    first = [measure(base.replace(backend=backends[0], attention_splits=n)) for n in splits]
    best_splits = min(first, key=lambda c: sum(c["cycle_ms"]))["attention_splits"]
    for backend in backends[1:]:
        measure(base.replace(backend=backend, attention_splits=best_splits))
    best = min(candidates, key=lambda c: sum(c["cycle_ms"]))
    if engine.options != best["options"]:
        engine.with_options(best["options"])
    record = {"metric": f"greedy cycle latency (CUDA-graph replay), median of {iters}, summed over the contexts",
              "contexts": contexts, "candidates": [{k: v for k, v in c.items() if k != "options"} for c in candidates],
              "backend": best["backend"], "attention_splits": best["attention_splits"],
              "prepare_seconds": prepare_s, "seconds": round(time.perf_counter() - t_all, 3),
              "note": f"splits timed on the {backends[0]} backend, other backends at the best split count"}
    return engine, record
