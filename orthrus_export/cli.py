"""The ``orthrus-export`` command line: build, run, check, info.

Every user error is one line on stderr and exit code 2; ``check`` exits 1 when parity fails.
"""

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from orthrus_runtime import __version__
from orthrus_runtime.errors import OrthrusError


def _engine_arg(p):
    p.add_argument("--engine", required=True, help="engine directory (from `orthrus-export build`)")


def _backend_args(p):
    p.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"],
                   help="torch: the traced programs (default); onnxruntime: the engine's exported ONNX graphs")
    p.add_argument("--onnx-variant", default="orthrus", choices=["orthrus", "decomposed"],
                   help="which ONNX export the onnxruntime backend runs")


def _load_args(p):
    p.add_argument("--strict", action="store_true",
                   help="refuse to load when the engine's compiled artifacts do not match this GPU and software stack "
                        "(default: recompile, saying so)")
    p.add_argument("--verify-weights", action="store_true",
                   help="hash every byte of the weights at load (default: size and safetensors header; the full check "
                        "is `orthrus-export verify`)")


def _threads_arg(p):
    p.add_argument("--threads", type=int,
                   help="CPU threads for torch (default: 1 for engines under 100 M parameters, else min(CPUs, 8))")


BYTES_PER_PARAM = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


def _set_threads(a, manifest: dict) -> int:
    """Set torch's CPU thread count for this process (the user's: the runtime library never does): --threads, or a
    count for the engine's size. Small engines gain nothing from more threads and lose much to contention (one
    competing process on a 2-core machine made torch's default 40x slower)."""
    n = a.threads
    if n is not None and n < 1:
        raise OrthrusError(f"--threads must be an integer >= 1, got {n}")
    if n is None:
        params = manifest["files"][manifest["weights"]]["bytes"] / BYTES_PER_PARAM.get(manifest["precision"], 2)
        n = 1 if params < 100e6 else min(os.cpu_count() or 1, 8)
    import torch
    torch.set_num_threads(n)
    return n


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanups (``atomic_directory``) run; exit code 143."""


_TERMINATED = threading.Event()  # a SIGTERM arrived: native code it interrupts may turn Terminated into another error


def _raise_terminated(signum, frame):
    _TERMINATED.set()
    raise Terminated()


def _progress(msg: str) -> None:
    print(f"orthrus-export: {msg}", file=sys.stderr, flush=True)


def _load(a):
    from orthrus_runtime import Engine
    return Engine.load(a.engine, backend=getattr(a, "backend", "torch"), onnx_variant=getattr(a, "onnx_variant",
                       "orthrus"), strict=a.strict, verify_weights=a.verify_weights, log=_progress)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="orthrus-export", description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=f"orthrus-export {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="trace, pack and self-check an engine")
    b.add_argument("--model", required=True,
                   help="checkpoint directory, zoo name (1.7b, 4b, 8b) or its Hugging Face repo id, or tiny")
    b.add_argument("--gpu", default="cpu", help="build profile from engines/profiles (cpu, h100, h200, ..., auto)")
    b.add_argument("--precision", default="fp32",
                   help="fp32 | bf16 | fp16 (GPU profiles) | fp8 (h100/h200/l40s; emulated with --gpu cpu)")
    b.add_argument("--fp8-lm-head", action="store_true", help="fp8 engines: quantize the head too (default BF16)")
    b.add_argument("--out", help="engine directory (default engines/orthrus-qwen3-<model>.<gpu>.<precision>)")
    b.add_argument("--max-seq-len", type=int, default=2048,
                   help="prompt + generated tokens the cache holds, per sequence")
    b.add_argument("--max-batch-size", type=int, default=8,
                   help="sequences that share every pass (cache slots; batch buckets 1, 2, 4, … up to it)")
    b.add_argument("--force", action="store_true", help="replace an existing engine")
    b.add_argument("--compile", default="auto",
                   help="auto | none | inductor (auto on a GPU: the autotuner times both for bf16/fp16)")
    b.add_argument("--no-autotune", action="store_true",
                   help="skip the GPU autotuner (default attention splits; --compile auto then means inductor "
                        "for bf16/fp16)")
    b.add_argument("--onnx", nargs="?", const="orthrus", choices=["orthrus", "decomposed", "both"],
                   help="also export ONNX graphs into the engine (orthrus-domain ops, decomposed, or both)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")

    r = sub.add_parser("run", help="generate from a prompt")
    _engine_arg(r)
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (raw; --chat applies the chat template)")
    src.add_argument("--prompt-ids", help="comma-separated token ids instead of text")
    r.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: the checkpoint's generation_config.json; greedy when it does not sample)")
    r.add_argument("--top-k", type=int, default=None, help="0 = off (default: generation_config.json, else off)")
    r.add_argument("--top-p", type=float, default=None, help="default: generation_config.json, else 1.0")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--stop", action="append", metavar="TEXT",
                   help="a stop string (repeatable): the text ends before it")
    r.add_argument("--no-drafts", action="store_true", help="plain AR decoding, one token per pass (baseline)")
    r.add_argument("--stream", action="store_true", help="print text as it is generated")
    r.add_argument("--json", action="store_true", help="print prompt_ids, output_ids, text and stats as JSON")
    _threads_arg(r)
    _backend_args(r)
    _load_args(r)

    c = sub.add_parser("check", help="parity against the Hugging Face reference (exit 1 on failure)")
    _engine_arg(c)
    c.add_argument("--model", help="checkpoint to compare with (default: the one the engine was built from)")
    c.add_argument("--prompts", type=int, default=4, help="number of random prompts for token parity")
    c.add_argument("--max-new-tokens", type=int, default=48)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--json", action="store_true")
    c.add_argument("--against", choices=["bf16"],
                   help="also report quality against the BF16 base: teacher-forced top-1 agreement, perplexity delta")
    _threads_arg(c)
    _backend_args(c)
    _load_args(c)

    ox = sub.add_parser("onnx", help="export an engine's programs as ONNX graphs (into the engine)")
    _engine_arg(ox)
    ox.add_argument("--decompose", action="store_true", help="standard ONNX ops only (no orthrus-domain nodes)")
    ox.add_argument("--external-data", action="store_true",
                    help="weights in one external weights.bin (automatic above 2 GB)")
    ox.add_argument("--check", action="store_true", help="then compare with the engine through Polygraphy")

    oc = sub.add_parser("onnx-check", help="Polygraphy comparison of the ONNX graphs (ONNX Runtime) with the "
                                           "engine, per pass (exit 1 on failure)")
    _engine_arg(oc)
    oc.add_argument("--variant", default="both", choices=["orthrus", "decomposed", "both"])
    oc.add_argument("--save", help="directory for the saved inputs/outputs (default: inside the engine)")
    oc.add_argument("--seed", type=int, default=0)
    oc.add_argument("--json", action="store_true")

    be = sub.add_parser("bench", help="per-pass and per-cycle latency vs the memory-bandwidth floor")
    _engine_arg(be)
    be.add_argument("--contexts", default="512,1024", help="comma-separated cache lengths to time at")
    be.add_argument("--iters", type=int, default=20, help="timed repetitions per measurement (median reported)")
    be.add_argument("--acceptance", default="9.6,11.7", help="acceptance lengths to state tokens/s at")
    be.add_argument("--no-sampled", action="store_true", help="skip the sampled-cycle timing")
    be.add_argument("--batch", help="comma-separated batch sizes: time the cycle over that many sequences (each at "
                                    "every context) instead of the per-pass table, e.g. 1,2,4,8")
    be.add_argument("--profile", action="store_true",
                    help="where each step's time goes instead: GEMM, attention, other and time between kernels, each "
                         "against its own floor (verify, draft and cycle; at every context and --batch size)")
    be.add_argument("--json", action="store_true")
    _threads_arg(be)
    _load_args(be)

    vf = sub.add_parser("verify", help="hash every byte of an engine against its manifest (parallel)")
    _engine_arg(vf)
    vf.add_argument("--json", action="store_true")

    t = sub.add_parser("triton", help="write a Triton Inference Server model repository for an engine")
    _engine_arg(t)
    t.add_argument("--out", required=True, help="model repository directory to create")
    t.add_argument("--instances", type=int, default=1,
                   help="model instances per device (each owns an engine, its cache and its scheduler)")
    t.add_argument("--gpus", help="GPU engines: comma-separated GPU indices, instances on each (default 0)")
    t.add_argument("--env", help="Python environment the model runs in (default .triton/venv)")
    _max_active_arg(t)

    sv = sub.add_parser("serve", help="write a model repository and run tritonserver on 127.0.0.1")
    _engine_arg(sv)
    sv.add_argument("--instances", type=int, default=1)
    sv.add_argument("--gpus", help="GPU engines: comma-separated GPU indices, instances on each (default 0)")
    sv.add_argument("--openai-port", type=int,
                    help="also serve an OpenAI-compatible endpoint (/v1/completions, /v1/chat/completions) here")
    sv.add_argument("--http-port", type=int, default=8000)
    sv.add_argument("--grpc-port", type=int, default=8001)
    sv.add_argument("--metrics-port", type=int, default=8002)
    sv.add_argument("--home", help="tritonserver installation (default: .triton in the checkout, or "
                    "~/.cache/orthrus-export/triton for an installed package)")
    sv.add_argument("--env", help="Python environment the model runs in (default: <home>/venv)")
    sv.add_argument("--log-file", help="tritonserver's log (default: a file in the temporary directory, printed)")
    _max_active_arg(sv)
    sv.add_argument("--no-supervise", action="store_true",
                    help="do not watch the model's process (by default a model process that dies is reported "
                         "not ready and reloaded)")

    i = sub.add_parser("info", help="show an engine's manifest summary (reads the manifest only)")
    _engine_arg(i)
    i.add_argument("--json", action="store_true", help="print the whole manifest")
    return ap


def cmd_build(a) -> int:
    from orthrus_export.builder import build
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None  # SIGTERM cleans up too
    try:
        out = build(a.model, gpu=a.gpu, precision=a.precision, out=a.out, max_seq_len=a.max_seq_len, force=a.force,
                    progress=not a.no_progress, compile=a.compile, autotune=not a.no_autotune, onnx=a.onnx,
                    fp8_lm_head=a.fp8_lm_head, max_batch_size=a.max_batch_size)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    manifest = json.loads((out / "manifest.json").read_text())
    checks = manifest["self_check"]["passes"]
    worst = max(r["budget_used"] for r in checks.values())
    print(f"engine written to {out} (self-check: {', '.join(checks)} within tolerance, "
          f"worst {worst:.0%} of budget)")
    tuning = manifest["build"].get("tuning")
    if tuning:
        best = min(tuning["candidates"], key=lambda c: sum(c["cycle_ms"]))
        print(f"autotuned: backend {manifest['build']['options']['backend']}, {_attention_options(tuning)} (cycle "
              f"{', '.join(f'{m:.3f} ms' for m in best['cycle_ms'])} at {_tuning_points(tuning)}; "
              f"{len(tuning['candidates'])} candidates, {tuning['seconds']:.0f} s)")
    return 0


def _attention_options(d: dict) -> str:
    """The attention kernel settings of a manifest's options or tuning record, in words (older engines lack some:
    they ran all of a row's query rows in one program and 64-key tiles; no plugin import, which would load torch)."""
    return (f"attention splits {d['attention_splits']}, query block {d.get('attention_query_block', 0) or 'all'}, "
            f"key tile {d.get('attention_block_n', 64)}, launch {d.get('attention_launch') or 'default'}")


def _tuning_points(tuning: dict) -> str:
    """Where the autotuner timed the cycle: "context 512, 4096" or, for batched engines, "context 4096 ×1, ×8"."""
    points = tuning.get("points") or [[c, 1] for c in tuning["contexts"]]
    return "context " + ", ".join(f"{c}" + (f" x{b}" if len(tuning.get("batches", [1])) > 1 else "")
                                  for c, b in points)


def _prompt_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise OrthrusError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def cmd_run(a) -> int:
    from orthrus_runtime.engine_format import check_length, read_manifest
    manifest = read_manifest(Path(a.engine))  # validate before loading (one small file)
    prompt = a.prompt if a.prompt is not None else _prompt_ids(a.prompt_ids)
    check_length(None if a.prompt is not None else len(prompt), a.max_new_tokens, manifest["build"]["max_seq_len"])
    _set_threads(a, manifest)
    engine = _load(a)
    kwargs = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                  seed=a.seed, use_drafts=not a.no_drafts, chat=a.chat, stop=a.stop)
    if a.stream and not a.json:
        stream = engine.generate(prompt, stream=True, **kwargs)
        for piece in stream:
            print(piece if isinstance(piece, str) else " ".join(map(str, piece)), end="", flush=True)
        print()
        result = stream.result
    else:
        result = engine.generate(prompt, **kwargs)
        if a.json:
            print(json.dumps(result.to_dict(), indent=2))
            return 0
        print(result.text if result.text is not None else " ".join(map(str, result.output_ids)))
    print(result.stats.summary(), file=sys.stderr)
    return 0


def cmd_check(a) -> int:
    import torch

    from orthrus_export.checkpoint import open_checkpoint
    from orthrus_export.parity import near_tie_bound, random_prompts, token_parity
    from orthrus_export.reference import Reference
    from orthrus_export.verdict import pass_checks, passes_ok, tokens_ok
    from orthrus_runtime.engine_format import read_manifest
    _set_threads(a, read_manifest(Path(a.engine)))
    _progress(f"loading {a.engine} …")
    engine = _load(a)
    source = a.model or engine.manifest["model"]["checkpoint_path"]
    if not Path(source).is_dir() and source != "tiny" and not a.model:
        raise OrthrusError(f"the engine's checkpoint {source} is gone: pass --model with its new location")
    ckpt = open_checkpoint(source)
    if ckpt.config.to_dict() != engine.config.to_dict():
        raise OrthrusError(f"checkpoint {ckpt.path} has a different config from engine {engine.path.name}")
    ref = Reference(ckpt, torch.float32)
    precision = engine.manifest["precision"]
    fp8 = precision == "fp8"
    passes = pass_checks(engine, ckpt, seed=a.seed, ref=ref)
    b = engine.block_size
    prompts = random_prompts(engine.config.vocab_size, a.prompts, a.seed,
                             lengths=tuple(n for n in (1, 7, b + 1, 3 * b + 5) if n + a.max_new_tokens
                                           <= engine.max_seq_len))
    _progress(f"per-pass logits checked; greedy tokens on {len(prompts)} prompts (engine Orthrus, engine AR, "
              "transformers generate) …")
    rows = token_parity(engine, ref, prompts, a.max_new_tokens, near_tie=0.0 if fp8 else near_tie_bound(passes),
                        log=lambda i, r: _progress(f"  prompt {i + 1}/{len(prompts)} done"))
    ok = passes_ok(passes) and tokens_ok(precision, rows)
    identical = sum(r["orthrus_equals_transformers"] for r in rows)
    report = {"engine": str(engine.path), "precision": engine.manifest["precision"], "ok": ok, "passes": passes,
              "prompts": rows, "identical_to_transformers": f"{identical}/{len(rows)}"}
    if a.against == "bf16":
        from orthrus_export.quality import default_sequences, quality_vs_bf16
        seqs, what = default_sequences(engine, seed=a.seed)
        report["quality_vs_bf16"] = {"text": what, **quality_vs_bf16(engine, ckpt, seqs)}
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        for name, r in passes.items():
            print(f"{name:8s} max|Δlogits| {r['max_abs_diff']:.3g}  {r['budget_used']:.0%} of tolerance  "
                  f"{'ok' if r['ok'] else 'FAIL'}")
        for r in rows:
            line = (f"prompt {r['prompt_tokens']:4d} tokens: orthrus==transformers {r['orthrus_equals_transformers']}, "
                    f"orthrus==engine AR {r['orthrus_equals_engine_ar']}, acceptance {r['acceptance_length']:.2f}")
            if r["divergence"] and not fp8:  # fp8: differences from transformers are the quantization's
                d = r["divergence"]
                line += (f"; diverges at token {r['first_divergence']}: fp32 top-2 margin {d['fp32_top2_margin']:.3g} "
                         f"{'<=' if d['near_tie'] else '>'} near-tie bound {d['near_tie_bound']:.3g}")
            print(line)
        if "quality_vs_bf16" in report:
            q = report["quality_vs_bf16"]
            print(f"against bf16 ({q['text']}, {q['positions']} positions, teacher-forced): top-1 agreement "
                  f"{q['top1_agreement']:.2%}, perplexity {q['perplexity_engine']:.3f} vs {q['perplexity_bf16']:.3f} "
                  f"({q['perplexity_delta_relative']:+.2%})")
        same_ar = sum(r["orthrus_equals_engine_ar"] for r in rows)
        print(f"orthrus == engine AR: {same_ar}/{len(rows)}; identical to transformers: {identical}/{len(rows)}"
              f"{' (fp8: informational)' if fp8 else ''} — {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def cmd_bench(a) -> int:
    from orthrus_export.bench import bench_engine, copy_bandwidth
    from orthrus_runtime.engine_format import read_manifest
    try:
        contexts = [int(c) for c in a.contexts.split(",")]
        acceptance = [float(x) for x in a.acceptance.split(",")]
    except ValueError:
        raise OrthrusError("--contexts and --acceptance take comma-separated numbers") from None
    manifest = read_manifest(Path(a.engine))  # validate before loading
    max_seq_len = manifest["build"]["max_seq_len"]
    too_long = [c for c in contexts if not 0 <= c <= max_seq_len]
    if too_long:
        raise OrthrusError(f"context {too_long[0]} is outside 0..{max_seq_len} (the engine's max_seq_len)")
    if a.iters < 1:
        raise OrthrusError("--iters must be >= 1")
    batches = None
    if a.batch:
        try:
            batches = [int(b) for b in a.batch.split(",")]
        except ValueError:
            raise OrthrusError("--batch takes comma-separated batch sizes, e.g. 1,2,4,8") from None
        top = manifest["build"]["max_batch_size"]
        if not all(1 <= b <= top for b in batches):
            raise OrthrusError(f"--batch {a.batch}: every size must be in 1..{top} (the engine's max batch size): "
                               "rebuild with a larger --max-batch-size")
    _set_threads(a, manifest)
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if a.json else (lambda m: print(m, flush=True))
    log(f"loading {a.engine} …")
    engine = _load(a)
    bandwidth = copy_bandwidth(engine.device)
    log(f"{engine.path.name} on {engine.manifest['gpu']['device_name']}: copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    rate = None
    if a.profile or batches:  # floors over many tokens: the GEMMs' compute bound needs the matmul rates
        from orthrus_export.bench import matmul_rates, rates_tflops
        rate = matmul_rates(engine.device, engine.config, engine.weights)  # per operand size: FP8 layers, head
        tflops = rates_tflops(engine.config, engine.weights, rate)
        log("matmul rate " + ", ".join(f"({d}) {r:.2f} TFLOP/s" for d, r in tflops.items()))
    if a.profile:
        from orthrus_export.profile import profile_engine
        result = {"profile": profile_engine(engine, contexts, batches or [1], ["verify", "draft", "cycle"], a.iters,
                                            bandwidth, log=log, matmul_rate=rate)}
    elif batches:
        from orthrus_export.bench import bench_batches
        result = bench_batches(engine, contexts, batches, a.iters, acceptance, log=log, sampled=not a.no_sampled,
                               bandwidth=bandwidth, matmul_rate=rate)
    else:
        result = bench_engine(engine, engine.config, contexts, a.iters, bandwidth, acceptance, log=log,
                              sampled=not a.no_sampled)
    result.update(engine=str(engine.path), device=engine.manifest["gpu"]["device_name"],
                  copy_bandwidth_GBps=bandwidth / 1e9, iters=a.iters, load_stats=engine.load_stats)
    if rate is not None:  # by operand dtype, e.g. {"bfloat16": …, "float8_e4m3fn": …}
        result["matmul_TFLOPs"] = tflops
    if a.json:
        print(json.dumps(result, indent=2))
    return 0


def cmd_verify(a) -> int:
    from orthrus_runtime.engine_format import read_manifest, verify_files
    manifest = read_manifest(Path(a.engine))
    r = verify_files(Path(a.engine), manifest, full=True)
    gbps = r["bytes"] / r["seconds"] / 1e9 if r["seconds"] > 0 else float("inf")
    report = {"engine": a.engine, "ok": True, "files": len(manifest["files"]), "bytes": r["bytes"],
              "seconds": round(r["seconds"], 3), "GBps": round(gbps, 2)}
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{a.engine}: all {report['files']} files match the manifest ({r['bytes'] / 1e9:.2f} GB hashed in "
              f"{r['seconds']:.2f} s, {gbps:.2f} GB/s)")
    return 0


def _gpus(a) -> list[int] | None:
    if not a.gpus:
        return None
    try:
        return [int(g) for g in a.gpus.split(",")]
    except ValueError:
        raise OrthrusError(f"--gpus {a.gpus!r}: give comma-separated GPU indices, e.g. 0,1") from None


def _max_active_arg(p) -> None:
    p.add_argument("--max-active", type=int,
                   help="requests sharing the engine's passes at once (default: the engine's --max-batch-size; "
                        "1 turns in-flight batching off)")


def cmd_triton(a) -> int:
    from orthrus_export.tritonserver import write_repository
    out = write_repository(Path(a.engine), Path(a.out), a.instances, Path(a.env) if a.env else None,
                           gpus=_gpus(a), max_active=a.max_active)
    print(f"model repository written to {out} (model 'orthrus'); start it with `orthrus-export serve` or "
          f"tritonserver --model-repository {out}")
    return 0


def cmd_serve(a) -> int:
    import signal
    import tempfile
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so that the server below is stopped too

    from orthrus_export.tritonserver import HOME, Server, write_repository
    log_file = Path(a.log_file) if a.log_file else Path(tempfile.mkdtemp(prefix="orthrus-serve-")) / "tritonserver.log"
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(a.home) if a.home else HOME
        repo = write_repository(Path(a.engine), Path(tmp) / "repo", a.instances, Path(a.env) if a.env else None,
                                gpus=_gpus(a), home=home, max_active=a.max_active)
        server = Server(repo, a.http_port, a.grpc_port, a.metrics_port, home=home, log=log_file,
                        supervise=not a.no_supervise,
                        on_event=lambda m: print(f"orthrus-export serve: {m}", file=sys.stderr, flush=True))
        print(f"tritonserver log: {log_file}", file=sys.stderr, flush=True)
        try:
            server.wait_ready()
            print(f"serving {a.engine} as model 'orthrus': HTTP 127.0.0.1:{a.http_port}, gRPC 127.0.0.1:"
                  f"{a.grpc_port}, metrics 127.0.0.1:{a.metrics_port}/metrics (Ctrl-C stops)", flush=True)
            if a.openai_port:
                _openai_frontend(a, server)
            if server.proc.wait() != 0:  # it stopped by itself (SIGTERM to serve stops it through `finally`)
                raise server.failure()
        finally:
            server.stop()
    return 0


def _openai_frontend(a, server) -> None:
    """Start the OpenAI-compatible endpoint in front of the running Triton server (a daemon thread)."""
    try:
        from orthrus_runtime.openai_frontend import server as openai_server
        frontend = openai_server(a.engine, f"127.0.0.1:{a.grpc_port}", a.openai_port)
    except ImportError as e:
        raise OrthrusError(f"--openai-port needs FastAPI and uvicorn ({e.name} is missing): pip install "
                           "'orthrus-export[serve]'") from None
    threading.Thread(target=frontend.run, daemon=True, name="openai-frontend").start()
    for _ in range(100):
        if frontend.started:
            break
        time.sleep(0.1)
    else:
        raise OrthrusError(f"the OpenAI endpoint did not start on 127.0.0.1:{a.openai_port} (port in use?)")
    print(f"OpenAI-compatible endpoint: http://127.0.0.1:{a.openai_port}/v1", flush=True)


def cmd_onnx(a) -> int:
    from orthrus_export.onnx_export import export_engine
    variant = "decomposed" if a.decompose else "orthrus"
    rec = export_engine(a.engine, decompose=a.decompose, external_data=True if a.external_data else None)
    print(f"{variant} ONNX graphs written to {Path(a.engine) / rec['directory']} (opset {rec['opset']}, "
          f"{'external' if rec['external_data'] else 'embedded'} weights, {rec['seconds']:.1f} s); the manifest "
          f"lists them with their sha256")
    if a.check:
        return _onnx_check(a.engine, [variant], None, 0, False)
    return 0


def _onnx_check(engine, variants, save, seed, as_json) -> int:
    from orthrus_export.onnx_parity import compare_engine
    reports = {}
    for v in variants:
        _progress(f"onnx-check {v}: loading the engine and the ONNX Runtime sessions …")
        reports[v] = compare_engine(engine, v, save_dir=Path(save) / v if save else None, seed=seed,
                                    log=_progress if as_json else print)
    if as_json:
        print(json.dumps(reports, indent=2))
    return 0 if all(r["ok"] for rep in reports.values() for r in rep.values()) else 1


def cmd_onnx_check(a) -> int:
    variants = ["orthrus", "decomposed"] if a.variant == "both" else [a.variant]
    return _onnx_check(a.engine, variants, a.save, a.seed, a.json)


def cmd_info(a) -> int:
    from orthrus_runtime.engine_format import read_manifest
    m = read_manifest(Path(a.engine))
    if a.json:
        print(json.dumps(m, indent=2))
        return 0
    c = m["model"]["config"]
    print(f"{m['name']}: {m['precision']} for {m['gpu']['profile']} ({m['gpu']['device_name']}), built {m['created']}")
    print(f"model {m['model']['source']}: {c['num_layers']} layers, hidden {c['hidden_size']}, heads "
          f"{c['num_heads']}/{c['num_kv_heads']}, vocab {c['vocab_size']}, block {c['block_size']}")
    o = m["build"]["options"]
    print(f"max_seq_len {m['build']['max_seq_len']}, kernels {m['build']['kernels']}, backend {o['backend']}, "
          f"{_attention_options(o)}; "
          f"programs {', '.join(m['programs'])}")
    print(f"max batch size {m['build']['max_batch_size']} (buckets "
          f"{', '.join(map(str, m['build']['batch_buckets']))}), {m['build']['draft_sampling']} drafts when sampling")
    comp = m["build"].get("compiled")
    if comp:
        print(f"compiled artifacts {comp['file']} ({comp['bytes'] / 1e6:.1f} MB) for {comp['stack'].get('device_name') or comp['stack'].get('machine')}, torch {comp['stack']['torch']}")
    if m.get("fp8"):
        f = m["fp8"]
        print(f"fp8: linear layers e4m3 with per-channel scales, activations per token, lm_head {f['lm_head']}, "
              f"kernel {f['kernel']['name']}")
    tuning = m["build"].get("tuning")
    if tuning:
        print(f"autotuned on the build GPU: {_attention_options(tuning)}, {len(tuning['candidates'])} candidates "
              f"timed at {_tuning_points(tuning)} in {tuning['seconds']:.0f} s; prepare {tuning['prepare_seconds']}")
    print("versions " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v))
    if m.get("self_check"):
        print("self-check " + ", ".join(f"{k} {r['budget_used']:.0%}" for k, r in m["self_check"]["passes"].items()))
    return 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    _TERMINATED.clear()
    try:
        commands = {"build": cmd_build, "run": cmd_run, "check": cmd_check, "bench": cmd_bench, "info": cmd_info,
                    "verify": cmd_verify,
                    "onnx": cmd_onnx, "onnx-check": cmd_onnx_check,
                    "triton": cmd_triton, "serve": cmd_serve}
        rc = commands[args.command](args)
        sys.stdout.flush()  # a reader that left (`| head -1`) shows here, not in the interpreter's flush at exit
        return rc
    except Terminated:
        return 143
    except Exception as e:
        if _TERMINATED.is_set():  # e.g. safetensors reports the Terminated raised inside it as a ValueError
            return 143
        if isinstance(e, OrthrusError):
            print(f"orthrus-export: error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, BrokenPipeError):
            _discard_stdout()
            return 141  # as if killed by SIGPIPE, without a traceback
        raise
    except KeyboardInterrupt:
        return 130


def _discard_stdout() -> None:
    """Point stdout at /dev/null so that flushing what is still buffered at exit does not fail again (the Python
    docs' recipe for SIGPIPE)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (tests capture stdout in memory)
        pass


if __name__ == "__main__":
    sys.exit(main())
