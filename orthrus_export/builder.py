"""``orthrus-export build``: checkpoint -> validated, packed, traced, compiled, self-checked engine directory.

The engine is written to a temporary sibling directory and renamed into place only when complete
(``orthrus_runtime.engine_format.atomic_directory``). The build runs the programs exactly as the runtime will: it
deserialises the graphs it wrote and drives them through an ``orthrus_runtime.Engine`` (autotune, compile,
self-check), then stores the compiled artifacts.
"""

import math
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from safetensors.torch import save_file
from tqdm import tqdm

from orthrus_export.checkpoint import ZOO, open_checkpoint
from orthrus_export.config import generation_defaults
from orthrus_export.exporter import PROGRAMS, custom_op_nodes, export_program, program_tokens
from orthrus_export.verdict import self_check as run_self_check
from orthrus_runtime import compiled
from orthrus_runtime.cycle import buckets_for
from orthrus_runtime.engine import Engine
from orthrus_runtime.engine_format import SCHEMA, SCHEMA_VERSION, atomic_directory, library_versions, write_manifest
from orthrus_runtime.errors import OrthrusError
from orthrus_runtime.profiles import COMPUTE_DTYPES, DTYPES, check_device, device_description, load_profile
from orthrus_runtime.program import KernelOptions, deserialize_program, program_weights, serialize_program

WEIGHTS = "weights.safetensors"
DEFAULT_MAX_BATCH_SIZE = 8
DRAFT_SAMPLING_DEFAULT = "sample"  # sampled requests draw their drafts (README "Sampling acceptance": tiny accepts more)
MAX_BATCH_SIZE = 64  # 7 buckets (1 … 64): with the one-sequence shape tools use, within torch.compile's 8 recompiles


def engine_name(model: str, profile: str, precision: str) -> str:
    if model.lower() == "tiny" or model.lower() in ZOO:
        slug = model.lower()
    else:
        slug = Path(model).resolve().name.lower()
        for prefix in ("orthrus-qwen3-", "orthrus-"):
            slug = slug.removeprefix(prefix)
    return f"orthrus-qwen3-{slug}.{profile}.{precision}"


def build(model: str, gpu: str = "cpu", precision: str = "fp32", out: str | Path | None = None,
          max_seq_len: int = 2048, force: bool = False, progress: bool = True, self_check: bool = True,
          compile: str = "auto", autotune: bool = True, onnx: str | None = None, fp8_lm_head: bool = False,
          max_batch_size: int = DEFAULT_MAX_BATCH_SIZE) -> Path:
    profile = load_profile(gpu)
    precision = precision.lower()
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
    ckpt = open_checkpoint(model)
    cfg = ckpt.config
    if not cfg.block_size * 2 <= max_seq_len <= cfg.max_position_embeddings:
        raise OrthrusError(f"--max-seq-len {max_seq_len} must be between {cfg.block_size * 2} (two blocks) and the "
                           f"model's max_position_embeddings {cfg.max_position_embeddings}")
    if isinstance(max_batch_size, bool) or not 1 <= int(max_batch_size) <= MAX_BATCH_SIZE:
        raise OrthrusError(f"--max-batch-size {max_batch_size} must be between 1 and {MAX_BATCH_SIZE}")
    check_memory(cfg, profile, precision, max_seq_len, int(max_batch_size))
    device = check_device(profile, "build")
    out = Path(out) if out else Path("engines") / engine_name(model, profile.name, precision)
    with atomic_directory(out, force) as tmp:
        _build_into(tmp, out.name, ckpt, profile, precision, device, max_seq_len, progress, self_check, compile,
                    autotune, fp8_lm_head, int(max_batch_size))
        if onnx:
            from orthrus_export.onnx_export import export_engine
            for decompose in {"orthrus": [False], "decomposed": [True], "both": [False, True]}[onnx]:
                export_engine(tmp, decompose=decompose, progress=tqdm.write if progress else (lambda m: None))
    return out


def memory_budget(cfg, precision: str, max_seq_len: int, max_batch_size: int) -> dict:
    """Bytes an engine needs on its device: weights (both attention sets, the MLPs, the embedding and head), the KV
    cache (``max_batch_size`` + 1 slots — one scratch slot for padding rows — of ``max_seq_len`` + one block, in the
    compute dtype) and the step's largest transients (float32 logits of draft and verify and their sampling
    distributions at the largest bucket: about 6 × rows × B × V × 4 bytes, plus one layer's activations)."""
    from orthrus_export.weights import engine_shapes
    weight_elem = 1 if precision == "fp8" else COMPUTE_DTYPES[precision].itemsize
    cache_elem = COMPUTE_DTYPES[precision].itemsize
    weights = sum(math.prod(shape) * (weight_elem if len(shape) == 2 and precision == "fp8" and name != "embed"
                                      else cache_elem) for name, shape in engine_shapes(cfg).items())
    capacity = max_seq_len + cfg.block_size
    cache = 2 * cfg.num_layers * (max_batch_size + 1) * cfg.num_kv_heads * capacity * cfg.head_dim * cache_elem
    tokens = max_batch_size * cfg.block_size
    transients = 6 * tokens * cfg.vocab_size * 4 + 4 * tokens * cfg.intermediate_size * cache_elem
    return {"weights": weights, "kv_cache": cache, "transients": transients, "total": weights + cache + transients}


def check_memory(cfg, profile, precision: str, max_seq_len: int, max_batch_size: int) -> dict:
    """Refuse a build whose engine cannot fit on the profile's memory (90% of it: the CUDA context, allocator
    slack and CUDA graphs' pools need the rest), with the numbers."""
    need = memory_budget(cfg, precision, max_seq_len, max_batch_size)
    if profile.memory_gib:
        have = profile.memory_gib * 1024 ** 3 * 0.9
        if need["total"] > have:
            gib = {k: v / 1024 ** 3 for k, v in need.items()}
            raise OrthrusError(
                f"the engine needs {gib['total']:.1f} GiB (weights {gib['weights']:.1f}, KV cache {gib['kv_cache']:.1f} "
                f"for {max_batch_size} sequences of {max_seq_len} tokens, transients {gib['transients']:.1f}) but "
                f"{profile.name} has {have / 1024 ** 3:.1f} GiB usable (90% of {profile.memory_gib}): lower "
                "--max-batch-size or --max-seq-len")
    return need


def _compile_backends(device, precision, choice, autotune) -> list[str]:
    """The pass backends a build may choose from. auto on a GPU: both for bf16/fp16/fp8 (the autotuner times them;
    without autotune, Inductor); fp32 engines stay uncompiled (kept bit-for-bit in step with transformers' eager
    arithmetic, so that they stay token-exact), as do CPU engines."""
    if choice != "auto":
        return [choice]
    if device.type == "cuda" and precision != "fp32":
        return ["none", "inductor"] if autotune else ["inductor"]
    return ["none"]


def _kernels(device) -> str:
    import orthrus_plugins
    return orthrus_plugins.GPU_KERNELS if device.type == "cuda" and orthrus_plugins.GPU_KERNELS else "reference"


def _build_into(tmp: Path, name: str, ckpt, profile, precision, device, max_seq_len, progress, check, compile,
                autotune, fp8_lm_head=False, max_batch_size: int = 1) -> dict:
    cfg = ckpt.config
    dtype = COMPUTE_DTYPES[precision]
    capacity = max_seq_len + cfg.block_size  # a cycle at the last position writes a whole block
    backends = _compile_backends(device, precision, compile, autotune)
    tune = device.type == "cuda" and autotune
    steps = ["pack weights", *[f"trace {p}" for p in PROGRAMS], "compile and capture", *(["autotune"] if tune else []),
             "parity self-check", "write engine"]
    bar = tqdm(total=len(steps), desc="build", disable=not progress, unit="step", leave=False)
    timings = {}

    def step(what):
        bar.set_description(what)
        timings[what] = time.perf_counter()

    def done(what):
        timings[what] = round(time.perf_counter() - timings[what], 3)
        bar.update(1)

    step("pack weights")
    weights = ckpt.packed_weights(dtype)
    fp8 = None
    if precision == "fp8":
        from orthrus_export.fp8 import quantize_engine_weights
        weights, fp8 = quantize_engine_weights(cfg, weights, fp8_lm_head, device, max_batch_size=max_batch_size)
    save_file(weights, str(tmp / WEIGHTS), metadata={"format": "orthrus-engine"})
    weights = program_weights(cfg, {k: v.to(device) for k, v in weights.items()}, capacity)
    done("pack weights")

    programs, exported = {}, {}
    (tmp / "programs").mkdir()
    for prog in PROGRAMS:
        step(f"trace {prog}")
        ep = export_program(cfg, weights, prog, capacity, slots=max_batch_size + 1, max_rows=max_batch_size)
        rel = f"programs/{prog}.json"
        (tmp / rel).write_bytes(serialize_program(ep))
        # the runtime's programs are the deserialised files: build with exactly those graphs
        exported[prog] = deserialize_program((tmp / rel).read_bytes(), f"program {rel}")
        programs[prog] = {"file": rel, "view": PROGRAMS[prog], "tokens": program_tokens(prog, cfg),
                          "custom_op_nodes": custom_op_nodes(ep)}
        done(f"trace {prog}")

    tok_files = ckpt.tokenizer_files()
    if tok_files:
        (tmp / "tokenizer").mkdir()
        for f in tok_files:
            shutil.copy2(f, tmp / "tokenizer" / f.name)
    options = KernelOptions(backend=backends[-1], compute_dtype=str(dtype).removeprefix("torch."),
                            fp8_kernel=(fp8 or {}).get("kernel", {}).get("name", "auto")
                            if device.type == "cuda" else "auto")
    manifest = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "name": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"source": ckpt.spec, "checkpoint_path": str(ckpt.path), "config": cfg.to_dict()},
        "precision": precision,
        "gpu": {"profile": profile.name, **device_description(profile), "host": platform.node()},
        "versions": library_versions(),
        "build": {"max_seq_len": max_seq_len, "cache_capacity": capacity, "block_size": cfg.block_size,
                  "max_batch_size": max_batch_size, "batch_buckets": list(buckets_for(max_batch_size)),
                  "draft_sampling": DRAFT_SAMPLING_DEFAULT,
                  "memory_bytes": memory_budget(cfg, precision, max_seq_len, max_batch_size),
                  "kernels": _kernels(device), "cuda_graphs": device.type == "cuda",
                  "options": options.to_dict(), "tuning": None, "compiled": None, "timings_s": timings},
        "weights": WEIGHTS,
        "programs": programs,
        "tokenizer": "tokenizer" if tok_files else None,
        "generation": generation_defaults(ckpt.path),
        "fp8": fp8,
    }

    step("compile and capture")
    t0 = time.perf_counter()
    tokenizer = Engine.load_tokenizer(tmp, manifest)
    engine = Engine(tmp, manifest, device, weights, exported, tokenizer,
                    options.replace(backend=backends[0]) if tune else options)
    manifest["build"]["load_seconds"] = round(time.perf_counter() - t0, 3)
    done("compile and capture")

    if tune:
        step("autotune")
        from orthrus_export.autotune import autotune as run_autotune
        from orthrus_export.autotune import tuning_contexts
        engine, tuning = run_autotune(engine, backends, tuning_contexts(max_seq_len, cfg.block_size),
                                      log=(lambda m: tqdm.write(m)) if progress else None)
        manifest["build"]["tuning"] = tuning
        manifest["build"]["options"] = engine.options.to_dict()
        done("autotune")
    if engine.options.backend == "inductor":
        manifest["build"]["compiled"] = compiled.save(tmp, device)

    step("parity self-check")
    manifest["self_check"] = run_self_check(engine, ckpt) if check else None
    done("parity self-check")

    step("write engine")
    write_manifest(tmp, manifest)
    done("write engine")
    bar.close()
    write_manifest(tmp, manifest, reuse=manifest["files"])  # with the last step's time
    return manifest
