"""``orthrus-export build``: checkpoint -> validated, packed, traced, self-checked engine directory.

The engine is written to a temporary sibling directory and renamed into place only when complete.
"""

import json
import os
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from orthrus_export.checkpoint import ZOO, open_checkpoint
from orthrus_export.engine_format import MANIFEST, SCHEMA, SCHEMA_VERSION, library_versions, write_manifest
from orthrus_export.errors import OrthrusError
from orthrus_export.exporter import PROGRAMS, custom_op_nodes, export_program, program_tokens, serialize_program
from orthrus_export.profiles import COMPUTE_DTYPES, DTYPES, check_device, device_description, load_profile

WEIGHTS = "weights.safetensors"


def engine_name(model: str, profile: str, precision: str) -> str:
    if model == "tiny" or model.lower() in ZOO:
        slug = model.lower()
    else:
        slug = Path(model).resolve().name.lower()
        for prefix in ("orthrus-qwen3-", "orthrus-"):
            slug = slug.removeprefix(prefix)
    return f"orthrus-qwen3-{slug}.{profile}.{precision}"


def build(model: str, gpu: str = "cpu", precision: str = "fp32", out: str | Path | None = None,
          max_seq_len: int = 2048, force: bool = False, progress: bool = True, self_check: bool = True,
          compile: str = "auto", autotune: bool = True, onnx: str | None = None, fp8_lm_head: bool = False) -> Path:
    profile = load_profile(gpu)
    if precision not in DTYPES and precision != "fp8":
        raise OrthrusError(f"unknown --precision {precision!r}: choose fp32, bf16, fp16 or fp8")
    if precision == "fp8" and precision not in profile.precisions:
        raise OrthrusError(f"profile {profile.name} has no FP8 support ({profile.description}): use --precision "
                           f"bf16, or build on an FP8 GPU (h100, h200, l40s; --gpu cpu builds an emulated one)")
    if precision not in profile.precisions:
        raise OrthrusError(f"profile {profile.name} does not support --precision {precision} "
                           f"(it supports {', '.join(profile.precisions)})")
    if onnx not in (None, "orthrus", "decomposed", "both"):
        raise OrthrusError(f"unknown --onnx {onnx!r}: choose orthrus, decomposed or both")
    if compile not in ("auto", "none", "inductor"):
        raise OrthrusError(f"unknown --compile {compile!r}: choose auto, none or inductor")
    device = check_device(profile, "build")
    ckpt = open_checkpoint(model)
    cfg = ckpt.config
    if not cfg.block_size * 2 <= max_seq_len <= cfg.max_position_embeddings:
        raise OrthrusError(f"--max-seq-len {max_seq_len} must be between {cfg.block_size * 2} (two blocks) and the "
                           f"model's max_position_embeddings {cfg.max_position_embeddings}")
    out = Path(out) if out else Path("engines") / engine_name(model, profile.name, precision)
    if out.exists() and not force:
        raise OrthrusError(f"{out} already exists: pass --force to replace it, or --out another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        manifest = _build_into(tmp, ckpt, profile, precision, device, max_seq_len, progress, self_check, compile,
                               autotune, fp8_lm_head)
        if onnx:
            from orthrus_export.onnx_export import export_engine
            for decompose in {"orthrus": [False], "decomposed": [True], "both": [False, True]}[onnx]:
                export_engine(tmp, decompose=decompose, progress=tqdm.write if progress else (lambda m: None))
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    del manifest
    return out


def _compile_backends(device, precision, choice) -> list[str]:
    """The pass backends a build may choose from. auto on a GPU: both, for bf16/fp16 (the autotuner times them);
    fp32 engines stay uncompiled (kept bit-for-bit in step with transformers' eager arithmetic, so that they stay
    token-exact), as do CPU engines."""
    if choice != "auto":
        return [choice]
    if device.type == "cuda" and precision != "fp32":
        return ["none", "inductor"]
    return ["none"]


def _compile_record(backend, device) -> dict:
    if backend == "inductor":
        return {"backend": "inductor", "note": "torch.compile(fullgraph) of the traced model code when the engine "
                                               "loads" + (", then CUDA-graph capture" if device.type == "cuda" else "")}
    return {"backend": "none", "note": "traced programs run by the PyTorch interpreter"
            + (" inside CUDA graphs" if device.type == "cuda" else "")}


def _kernels(device) -> str:
    import orthrus_plugins
    return orthrus_plugins.GPU_KERNELS if device.type == "cuda" and orthrus_plugins.GPU_KERNELS else "reference"


def _build_into(tmp: Path, ckpt, profile, precision, device, max_seq_len, progress, self_check, compile,
                autotune, fp8_lm_head=False) -> dict:
    cfg = ckpt.config
    dtype = COMPUTE_DTYPES[precision]
    capacity = max_seq_len + cfg.block_size  # a cycle at the last position writes a whole block
    backends = _compile_backends(device, precision, compile)
    tune = device.type == "cuda" and autotune
    steps = ["pack weights", *[f"trace {p}" for p in PROGRAMS], "write engine", *(["autotune"] if tune else []),
             "parity self-check"]
    bar = tqdm(total=len(steps), desc="build", disable=not progress, unit="step", leave=False)
    timings = {}

    def step(name):
        bar.set_description(name)
        timings[name] = time.perf_counter()

    def done(name):
        timings[name] = round(time.perf_counter() - timings[name], 3)
        bar.update(1)

    step("pack weights")
    weights = ckpt.packed_weights(dtype)
    fp8 = None
    if precision == "fp8":
        from orthrus_export.fp8 import quantize_engine_weights
        weights, fp8 = quantize_engine_weights(cfg, weights, fp8_lm_head, device)
    save_file(weights, str(tmp / WEIGHTS), metadata={"format": "orthrus-engine"})
    weights = {k: v.to(device) for k, v in weights.items()}
    from orthrus_export.model import program_weights
    weights = program_weights(cfg, weights, capacity)
    done("pack weights")

    programs, nodes = {}, {}
    (tmp / "programs").mkdir()
    for name in PROGRAMS:
        step(f"trace {name}")
        ep = export_program(cfg, weights, name, capacity)
        nodes[name] = custom_op_nodes(ep)
        rel = f"programs/{name}.json"
        (tmp / rel).write_bytes(serialize_program(ep))
        programs[name] = {"file": rel, "view": PROGRAMS[name], "tokens": program_tokens(name, cfg),
                          "custom_op_nodes": nodes[name]}
        done(f"trace {name}")

    step("write engine")
    tok_files = ckpt.tokenizer_files()
    if tok_files:
        (tmp / "tokenizer").mkdir()
        for f in tok_files:
            shutil.copy2(f, tmp / "tokenizer" / f.name)
    manifest = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "name": tmp.name.split(".tmp-")[0].lstrip("."),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"source": ckpt.spec, "checkpoint_path": str(ckpt.path), "config": cfg.to_dict()},
        "precision": precision,
        "gpu": {"profile": profile.name, **device_description(profile), "host": platform.node()},
        "versions": library_versions(),
        "build": {"max_seq_len": max_seq_len, "cache_capacity": capacity, "block_size": cfg.block_size,
                  "kernels": _kernels(device), "cuda_graphs": device.type == "cuda",
                  "compile": _compile_record(backends[-1], device), "tuning": None,
                  "timings_s": timings},
        "weights": WEIGHTS,
        "programs": programs,
        "tokenizer": "tokenizer" if tok_files else None,
        "fp8": fp8,
    }
    write_manifest(tmp, manifest)
    done("write engine")

    engine = None
    if tune:
        step("autotune")
        from orthrus_export.autotune import autotune as run_autotune
        from orthrus_export.autotune import tuning_contexts
        from orthrus_runtime.engine import Engine

        def load(backend):
            return Engine.load(tmp, check_hashes=False, build_overrides={"compile": _compile_record(backend, device)})
        engine, tuning = run_autotune(load, backends, tuning_contexts(max_seq_len, cfg.block_size),
                                      log=(lambda m: tqdm.write(m)) if progress else None)
        manifest["build"]["compile"] = _compile_record(tuning.pop("backend"), device)
        manifest["build"]["tuning"] = tuning
        manifest["build"]["load_seconds"] = tuning["load_seconds"][manifest["build"]["compile"]["backend"]]
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        done("autotune")

    step("parity self-check")
    if self_check:
        from orthrus_export.parity import pass_parity
        from orthrus_export.reference import Reference
        from orthrus_runtime.engine import Engine
        if engine is None:
            t_load = time.perf_counter()
            engine = Engine.load(tmp)  # compiles (--compile inductor) and captures CUDA graphs on GPUs
            manifest["build"]["load_seconds"] = round(time.perf_counter() - t_load, 3)
        if precision == "fp8":  # lossless relative to the quantized base: the engine against its own AR
            from orthrus_export.parity import ar_consistency
            results = ar_consistency(engine, seed=0)
        else:
            results = pass_parity(engine, Reference(ckpt, torch.float32), seed=0)
        failed = [k for k, r in results.items() if not r["ok"]]
        if failed:
            worst = max(results.values(), key=lambda r: r["budget_used"])
            raise OrthrusError(f"parity self-check failed for {', '.join(failed)} (max |Δlogits| "
                               f"{worst['max_abs_diff']:.3g}, {worst['budget_used']:.1f}x the tolerance): "
                               "the engine was not written")
        manifest["self_check"] = {"reference": "the engine's own AR decode steps" if precision == "fp8"
                                  else "transformers fp32", "passes": results}
    else:
        manifest["self_check"] = None
    done("parity self-check")
    bar.close()
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
