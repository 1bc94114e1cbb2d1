"""Serving benchmark, in the manner of vLLM's ``benchmark_serving`` and ``trtllm-bench``: many clients against one
engine's scheduler (in-flight batching), compared in the same run with the same requests served one at a time.

    python scripts/bench_serving.py --engine engines/orthrus-qwen3-tiny.cpu.fp32 \\
        --concurrency 1,4,8,16,32 --rate 4 --requests 32 --max-new-tokens 64 --out benchmarks/cpu-serving.json

Workloads (each over the same ``--requests`` prompts, the trained ``tiny``'s held-out code prompts by default, so
acceptance is real):

- ``serial``: one request at a time (the engine as it was before batching: batch 1);
- ``concurrency C``: C client threads, each sending its next request when the previous one ends;
- ``rate R``: requests arrive as a Poisson process of R requests/s (seeded), each from its own thread.

Per workload: output tokens/s and requests/s over the wall time; time to first token, inter-token latency (the
gap between successive streamed chunks, spread over the chunk's tokens, per token) and end-to-end latency
percentiles (p50/p90/p99); mean acceptance length; the scheduler's mean rows per step. Every request's tokens are
checked against the serial run (greedy): a batched result that differs is reported, not hidden.

``--through-server``: the same workloads through a real Triton server (``orthrus_export.tritonserver``, started
here on free 127.0.0.1 ports) and the OpenAI-compatible endpoint in front of it, each client a real one (gRPC
streams through ``orthrus_runtime.openai_frontend.TritonStream``; the ``openai`` package's streaming completions),
twice: the server as deployed (in-flight batching) and the same server with batching off (``--max-active 1``:
requests run one after another). Per workload: output tokens/s, TTFT and TPOT (time per output token after the
first, per request) percentiles; each text compared with the batching-off server's concurrency-1 text; the model
load time each server logged.

    python scripts/bench_serving.py --engine E --through-server --concurrency 1,4,8,16,32 --requests 24 \
        --out benchmarks/cpu-serving-server-tiny.json
"""

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {}
    xs = sorted(xs)

    def q(p):
        k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
        return xs[k]
    return {"p50": q(50), "p90": q(90), "p99": q(99), "mean": statistics.fmean(xs)}


def one_request(engine, prompt: list[int], max_new: int) -> dict:
    t0 = time.perf_counter()
    handle = engine.submit(prompt, max_new_tokens=max_new, temperature=0.0)
    times, ids = [], []
    for chunk in handle:
        times.append((time.perf_counter(), len(chunk)))
        ids += chunk
    end = time.perf_counter()
    itl = []
    for (t_prev, _), (t, n) in zip(times, times[1:]):
        itl += [(t - t_prev) / n] * n
    st = handle.stats
    return {"ids": ids, "ttft_s": times[0][0] - t0 if times else None, "e2e_s": end - t0, "itl_s": itl,
            "start": t0, "end": end, "cycles": st.cycles, "cycle_tokens": st.cycle_tokens}


def summarize(name: str, results: list[dict], wall: float, reference: list[list[int]] | None, stats0, stats1):
    tokens = sum(len(r["ids"]) for r in results)
    cycles = sum(r["cycles"] for r in results)
    out = {"workload": name, "requests": len(results), "wall_s": wall, "output_tokens": tokens,
           "output_tokens_per_s": tokens / wall, "requests_per_s": len(results) / wall,
           "ttft_s": percentiles([r["ttft_s"] for r in results if r["ttft_s"] is not None]),
           "itl_s": percentiles([x for r in results for x in r["itl_s"]]),
           "e2e_s": percentiles([r["e2e_s"] for r in results]),
           "acceptance_length": sum(r["cycle_tokens"] for r in results) / cycles if cycles else 0.0}
    steps = stats1["steps"] - stats0["steps"]
    out["mean_rows_per_step"] = (stats1["rows"] - stats0["rows"]) / steps if steps else 0.0
    if reference is not None:
        out["differ_from_serial"] = sum(r["ids"] != ref for r, ref in zip(results, reference))
    return out


def run_serial(engine, prompts, max_new):
    s0 = engine.scheduler_stats()
    t0 = time.perf_counter()
    results = [one_request(engine, p, max_new) for p in prompts]
    return results, time.perf_counter() - t0, s0, engine.scheduler_stats()


def run_concurrency(engine, prompts, max_new, c):
    s0 = engine.scheduler_stats()
    results: list = [None] * len(prompts)
    nxt = iter(range(len(prompts)))
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            results[i] = one_request(engine, prompts[i], max_new)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0, s0, engine.scheduler_stats()


def run_rate(engine, prompts, max_new, rate, seed=0):
    s0 = engine.scheduler_stats()
    rng = random.Random(seed)
    results: list = [None] * len(prompts)

    def client(i):
        results[i] = one_request(engine, prompts[i], max_new)

    t0 = time.perf_counter()
    threads, at = [], 0.0
    for i in range(len(prompts)):
        at += rng.expovariate(rate)
        time.sleep(max(0.0, t0 + at - time.perf_counter()))
        th = threading.Thread(target=client, args=(i,))
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    return results, time.perf_counter() - t0, s0, engine.scheduler_stats()


def client_request(kind: str, url: str, prompt: str, max_new: int) -> dict:
    """One streamed greedy request through the server: ``kind`` "grpc" (url host:port) or "openai" (url …/v1)."""
    t0 = time.perf_counter()
    times, pieces, tokens = [], [], 0
    if kind == "grpc":
        from orthrus_runtime.openai_frontend import TritonStream
        stream = TritonStream(url, prompt, {"max_tokens": max_new, "temperature": 0.0})
        try:
            for text, final in stream:
                if text:
                    times.append(time.perf_counter())
                    pieces.append(text)
                if final is not None:
                    tokens = final["output_tokens"]
        finally:
            stream.close()
    else:
        import openai
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        for chunk in client.completions.create(model="orthrus", prompt=prompt, max_tokens=max_new, temperature=0,
                                               stream=True, stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].text:
                times.append(time.perf_counter())
                pieces.append(chunk.choices[0].text)
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        client.close()
    end = time.perf_counter()
    ttft = times[0] - t0 if times else None
    return {"text": "".join(pieces), "tokens": tokens, "ttft_s": ttft, "e2e_s": end - t0,
            "tpot_s": (times[-1] - times[0]) / (tokens - 1) if times and tokens > 1 else None}


def run_clients(fn, prompts: list, c: int) -> tuple[list, float]:
    """``fn(prompt)`` for every prompt from ``c`` client threads (each sends its next request when one ends)."""
    results: list = [None] * len(prompts)
    nxt = iter(range(len(prompts)))
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            results[i] = fn(prompts[i])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def through_server(a) -> int:
    import tempfile

    from orthrus_export.checkpoint import TINY_DIR
    from orthrus_export.tritonserver import Server, install, write_repository
    from orthrus_runtime.engine_format import read_manifest
    from orthrus_runtime.openai_frontend import server as openai_server

    def port():
        import socket
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    manifest = read_manifest(Path(a.engine))
    heldout = json.loads((TINY_DIR / "heldout_prompts.json").read_text())
    prompts = [heldout[i % len(heldout)]["text"] for i in range(a.requests)]
    concurrency = [int(x) for x in a.concurrency.split(",") if x]
    install()
    report = {"engine": Path(a.engine).name, "device": manifest["gpu"]["device_name"],
              "max_batch_size": manifest["build"]["max_batch_size"], "requests": a.requests,
              "max_new_tokens": a.max_new_tokens, "through": "tritonserver (gRPC) and the OpenAI endpoint",
              "servers": {}}
    reference = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, max_active in (("batching off (--max-active 1)", 1), ("in-flight batching", None)):
            d = Path(tmp) / f"repo{max_active}"
            repo = write_repository(Path(a.engine), d, max_active=max_active)
            server = Server(repo, port(), port(), port(), log=Path(tmp) / f"server{max_active}.log")
            frontend = openai_server(a.engine, f"127.0.0.1:{server.grpc}", port())
            try:
                t0 = time.perf_counter()
                server.wait_ready(timeout=600)
                ready_s = time.perf_counter() - t0
                threading.Thread(target=frontend.run, daemon=True).start()
                while not frontend.started:
                    time.sleep(0.05)
                urls = {"grpc": f"127.0.0.1:{server.grpc}",
                        "openai": f"http://127.0.0.1:{frontend.config.port}/v1"}
                rows = []
                for kind, url in urls.items():
                    client_request(kind, url, prompts[0], 4)  # warm-up
                    for c in concurrency:
                        res, wall = run_clients(lambda p: client_request(kind, url, p, a.max_new_tokens), prompts, c)
                        texts = [r["text"] for r in res]
                        if max_active == 1 and c == concurrency[0]:
                            reference[kind] = texts
                        tokens = sum(r["tokens"] for r in res)
                        rows.append({"endpoint": kind, "concurrency": c, "wall_s": wall, "output_tokens": tokens,
                                     "output_tokens_per_s": tokens / wall,
                                     "ttft_s": percentiles([r["ttft_s"] for r in res if r["ttft_s"] is not None]),
                                     "tpot_s": percentiles([r["tpot_s"] for r in res if r["tpot_s"] is not None]),
                                     "e2e_s": percentiles([r["e2e_s"] for r in res]),
                                     "differ_from_reference": sum(t != ref for t, ref in zip(texts, reference[kind]))})
                        r = rows[-1]
                        print(f"{label:>30} {kind:>6} c={c:<3} {r['output_tokens_per_s']:8.1f} tok/s  TTFT p50/p90/p99 "
                              f"{r['ttft_s']['p50'] * 1e3:.0f}/{r['ttft_s']['p90'] * 1e3:.0f}/"
                              f"{r['ttft_s']['p99'] * 1e3:.0f} ms  TPOT p50/p90/p99 {r['tpot_s']['p50'] * 1e3:.1f}/"
                              f"{r['tpot_s']['p90'] * 1e3:.1f}/{r['tpot_s']['p99'] * 1e3:.1f} ms  differ "
                              f"{r['differ_from_reference']}", flush=True)
                report["servers"][label] = {"max_active": max_active or report["max_batch_size"],
                                            "ready_s": ready_s, "model_load_s": server.model_load_seconds(),
                                            "workloads": rows}
                print(f"{label}: server ready in {ready_s:.1f} s; model load time in its log: "
                      f"{server.model_load_seconds()} s", flush=True)
            finally:
                frontend.should_exit = True
                server.stop()
    off, on = (report["servers"][k]["workloads"] for k in report["servers"])
    for r_on, r_off in zip(on, off):
        r_on["throughput_vs_batching_off"] = r_on["output_tokens_per_s"] / r_off["output_tokens_per_s"]
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", required=True)
    ap.add_argument("--concurrency", default="1,4,8,16,32")
    ap.add_argument("--rate", type=float, default=0.0, help="Poisson arrival rate (requests/s); 0 = skip")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=0, help="cut prompts to this many tokens (0: as they are)")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--through-server", action="store_true",
                    help="through a Triton server (gRPC) and the OpenAI endpoint, batching on vs off")
    a = ap.parse_args()
    if a.through_server:
        return through_server(a)
    import torch

    from orthrus_export.checkpoint import TINY_DIR
    from orthrus_runtime import Engine
    torch.set_num_threads(max(1, torch.get_num_threads()))
    engine = Engine.load(a.engine, max_queue=max(256, a.requests))
    heldout = json.loads((TINY_DIR / "heldout_prompts.json").read_text())
    prompts = [engine.encode(heldout[i % len(heldout)]["text"]) for i in range(a.requests)]
    if a.prompt_tokens:
        prompts = [p[:a.prompt_tokens] for p in prompts]
    device = engine.manifest["gpu"]["device_name"]
    print(f"{engine.path.name} on {device}: max batch {engine.max_batch_size}, buckets {engine.buckets}; "
          f"{a.requests} requests of {a.max_new_tokens} new tokens", flush=True)
    engine.generate(prompts[0], max_new_tokens=4)  # warm-up
    rows = []
    res, wall, s0, s1 = run_serial(engine, prompts, a.max_new_tokens)
    reference = [r["ids"] for r in res]
    rows.append(summarize("serial (batch 1)", res, wall, None, s0, s1))
    for c in [int(x) for x in a.concurrency.split(",") if x]:
        res, wall, s0, s1 = run_concurrency(engine, prompts, a.max_new_tokens, c)
        rows.append(summarize(f"concurrency {c}", res, wall, reference, s0, s1))
    if a.rate > 0:
        res, wall, s0, s1 = run_rate(engine, prompts, a.max_new_tokens, a.rate)
        rows.append(summarize(f"poisson {a.rate:g}/s", res, wall, reference, s0, s1))
    base = rows[0]["output_tokens_per_s"]
    for r in rows:
        r["throughput_vs_serial"] = r["output_tokens_per_s"] / base
        print(f"{r['workload']:>18}: {r['output_tokens_per_s']:8.1f} tok/s ({r['throughput_vs_serial']:.2f}x serial)"
              f"  TTFT p50/p90/p99 {r['ttft_s']['p50'] * 1e3:.0f}/{r['ttft_s']['p90'] * 1e3:.0f}/"
              f"{r['ttft_s']['p99'] * 1e3:.0f} ms  ITL p50/p90/p99 {r['itl_s']['p50'] * 1e3:.1f}/"
              f"{r['itl_s']['p90'] * 1e3:.1f}/{r['itl_s']['p99'] * 1e3:.1f} ms  rows/step "
              f"{r['mean_rows_per_step']:.2f}  acceptance {r['acceptance_length']:.2f}"
              + (f"  differ {r['differ_from_serial']}" if "differ_from_serial" in r else ""), flush=True)
    report = {"engine": engine.path.name, "device": device, "max_batch_size": engine.max_batch_size,
              "buckets": list(engine.buckets), "requests": a.requests, "max_new_tokens": a.max_new_tokens,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "workloads": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
