"""Compiled artifacts stored in the engine: Inductor's compile-cache artifacts for the engine's own programs.

The build compiles every program it will run (on the build device), then stores what torch's compiler cached
(``torch.compiler.save_cache_artifacts``: the FX-graph/AOT-autograd cache entries with the generated code and, on
GPUs, the compiled Triton kernels) as ``compiled/inductor-cache.bin``, listed with its sha256 in the manifest
together with the stack it was compiled on. Loading on a matching device and software stack hands the artifacts to
``torch.compiler.load_cache_artifacts`` before the first call, so the compile is a cache hit; on a mismatch the
runtime says what differs and recompiles (saying so, and how long it took) or refuses (``strict``).

Why these artifacts and not an AOTInductor package: the runtime captures whole cycles as CUDA graphs around the
compiled passes, which works with ``torch.compile`` output.
"""

import platform
import time
from pathlib import Path

import torch

from orthrus_runtime.errors import OrthrusError

ARTIFACT = "compiled/inductor-cache.bin"


def stack_key(device: torch.device) -> dict:
    """What compiled code depends on: torch, triton, Python, and the device (name, compute capability)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        triton = version("triton")
    except PackageNotFoundError:
        triton = None
    key = {"torch": torch.__version__, "triton": triton, "python": platform.python_version(),
           "device_type": device.type}
    if device.type == "cuda":
        key["device_name"] = torch.cuda.get_device_name(device)
        key["compute_capability"] = list(torch.cuda.get_device_capability(device))
    else:
        key["machine"] = platform.machine()
    return key


def save(engine_dir: Path, device: torch.device) -> dict | None:
    """Write what torch's compiler cached in this process into the engine; the manifest record, or None when
    nothing was compiled."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return None
    data, info = saved
    path = Path(engine_dir) / ARTIFACT
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    counts = {k: len(v) for k, v in getattr(info, "artifacts", {}).items()}
    return {"file": ARTIFACT, "kind": "torch.compiler cache artifacts", "bytes": len(data), "entries": counts,
            "stack": stack_key(device)}


def differences(record: dict, device: torch.device) -> list[str]:
    here = stack_key(device)
    return [f"{k} {record['stack'].get(k)} (engine) vs {here.get(k)} (here)" for k in sorted(set(here) | set(
        record["stack"])) if record["stack"].get(k) != here.get(k)]


def prepare(engine_dir: Path, record: dict | None, device: torch.device, strict: bool, log) -> dict:
    """Before the first compiled call: load the engine's artifacts when they match this stack. Returns a status
    record ``{"artifacts": "loaded"|"mismatch"|"none", ...}``; with ``strict``, a mismatch or missing artifacts are an
    error."""
    if record is None:
        if strict:
            raise OrthrusError(f"engine {Path(engine_dir).name} holds no compiled artifacts and --strict forbids "
                               "compiling at load: rebuild it on this GPU")
        log("no compiled artifacts in the engine: compiling its programs now (once per process)")
        return {"artifacts": "none"}
    diff = differences(record, device)
    if diff:
        if strict:
            raise OrthrusError(f"the engine's compiled artifacts were made for another stack ({'; '.join(diff)}): "
                               "rebuild the engine here, or load without --strict to recompile")
        log(f"compiled artifacts do not match this stack ({'; '.join(diff)}): recompiling the programs")
        return {"artifacts": "mismatch", "differences": diff}
    t0 = time.perf_counter()
    torch.compiler.load_cache_artifacts((Path(engine_dir) / record["file"]).read_bytes())
    return {"artifacts": "loaded", "load_s": round(time.perf_counter() - t0, 3)}
