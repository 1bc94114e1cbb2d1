"""Build-time autotuning on the GPU the engine is built for.

The tuned quantity is what decoding spends its time on: the latency of one whole greedy cycle (draft, verify and
acceptance, one CUDA-graph replay), median of ``iters`` replays at each tuning context, summed over the contexts.
Candidates: the pass backend (the traced programs run as they are, or Inductor-compiled; both inside CUDA graphs)
times the number of key-range splits of the attention kernels. Every candidate is loaded, captured and timed on the
engine being built; the fastest is recorded in the manifest with every candidate's timings.
"""

import gc
import statistics
import time
from collections.abc import Callable

import torch

SPLIT_CANDIDATES = (8, 16, 32)


def tuning_contexts(max_seq_len: int, block_size: int) -> list[int]:
    """Cache lengths to tune at: every one of 512, 4k, 16k and 32k the engine can hold (the best attention split
    count grows with the context: tuning at short contexts only picks too few splits for long ones)."""
    fits = [c for c in (512, 4096, 16384, 32768) if c + 2 * block_size <= max_seq_len]
    return fits or [max(1, max_seq_len // 2)]


def cycle_ms(engine, context: int, iters: int) -> float:
    """Median milliseconds of one greedy-cycle graph replay at cache length ``context`` (CUDA events)."""
    g = engine.loop.graphs
    g.start(5, context, [])
    times = []
    with torch.inference_mode():
        for i in range(iters + 5):
            g.s.fill_(context)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.cycle.replay()
            end.record()
            end.synchronize()
            if i >= 5:
                times.append(start.elapsed_time(end))
    return statistics.median(times)


def autotune(load: Callable[[str], object], backends: list[str], contexts: list[int], iters: int = 20,
             splits: tuple[int, ...] = SPLIT_CANDIDATES, log: Callable[[str], None] | None = None):
    """Time every (backend, splits) candidate; return ``(engine with the chosen setting, record)``.

    ``load(backend)`` returns an engine whose passes use that backend (graphs captured). Engines of rejected
    backends are released before the next is loaded, so at most two engines' weights are resident at once."""
    t_all = time.perf_counter()
    candidates, load_s = [], {}
    best_engine, best = None, None
    for backend in backends:
        t0 = time.perf_counter()
        engine = load(backend)  # Inductor compiles during the first graph capture
        load_s[backend] = round(time.perf_counter() - t0, 3)
        for n in splits:
            engine.capture_graphs(n)
            ms = [cycle_ms(engine, c, iters) for c in contexts]
            cand = {"backend": backend, "attention_splits": n, "cycle_ms": [round(m, 4) for m in ms]}
            candidates.append(cand)
            if log:
                log(f"autotune: {backend:8s} splits {n:2d}: cycle " + ", ".join(
                    f"{m:.3f} ms @ {c}" for m, c in zip(ms, contexts)))
            if best is None or sum(ms) < sum(best["cycle_ms"]):
                best, best_engine = cand, engine
        if best_engine is not engine:
            del engine
        gc.collect()
        torch.cuda.empty_cache()
    best_engine.capture_graphs(best["attention_splits"])
    record = {"metric": f"greedy cycle latency (CUDA-graph replay), median of {iters}, summed over the contexts",
              "contexts": contexts, "candidates": candidates, "backend": best["backend"],
              "attention_splits": best["attention_splits"], "load_seconds": load_s,
              "seconds": round(time.perf_counter() - t_all, 3)}
    return best_engine, record
