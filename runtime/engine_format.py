"""The engine directory and its manifest: written once by the builder, read and verified by the runtime.

```
manifest.json            schema, model config, precision, GPU profile and device, library versions, build options,
                         the resolved kernel options, compiled artifacts, and every other file with its size and
                         sha256 (per 64 MiB chunk, so a full check can hash the chunks in parallel)
weights.safetensors      packed weights (plus the size and sha256 of its safetensors header)
programs/*.json          torch.export graphs (JSON)
compiled/                compiled artifacts (Inductor compile-cache artifacts), optional
tokenizer/               tokenizer files, optional
```

Checksums are computed at build. Loading verifies the manifest, the sha256 of every small file (programs, compiled
artifacts, tokenizer, ONNX graphs) and the weights file's size and safetensors header; the full weights hash runs in
``orthrus-export verify`` (or at load with ``verify_weights=True``). ``read_manifest`` alone reads one JSON file.
"""

import fcntl
import hashlib
import json
import os
import shutil
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from orthrus_runtime import __version__
from orthrus_runtime.errors import OrthrusError

SCHEMA = "orthrus-engine"
SCHEMA_VERSION = 3  # 3: batched programs (tokens [b, T], per-row start and slot), caches [L, S+1, Hkv, C, D]
MANIFEST = "manifest.json"
CHUNK = 64 << 20        # files are hashed in chunks of this size (one digest per chunk)
SMALL = 256 << 20       # files up to this size are fully hashed on every load


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None
    return {"orthrus_export": __version__, "torch": torch.__version__, "transformers": installed("transformers"),
            "triton": installed("triton")}


def _minor(v: str) -> str:
    return ".".join(v.split("+")[0].split(".")[:2])


# ---- hashing ----------------------------------------------------------------------------------------------------
def _chunk_digest(path: Path, index: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(index * CHUNK)
        left = CHUNK
        while left:
            buf = f.read(min(left, 8 << 20))
            if not buf:
                break
            h.update(buf)
            left -= len(buf)
    return h.hexdigest()


def file_digests(path: Path, workers: int | None = None) -> list[str]:
    """sha256 of each ``CHUNK``-byte chunk of ``path`` (one entry for a small or empty file), hashed in parallel
    threads (hashlib releases the GIL on large buffers)."""
    n = max(1, -(-path.stat().st_size // CHUNK))
    if n == 1:
        return [_chunk_digest(path, 0)]
    with ThreadPoolExecutor(max_workers=workers or min(16, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda i: _chunk_digest(path, i), range(n)))


def safetensors_header(path: Path) -> bytes:
    """The raw JSON header of a safetensors file (8-byte little-endian length, then the header)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise OrthrusError(f"{path.name} is too short to be a safetensors file: rebuild the engine")
        (n,) = struct.unpack("<Q", head)
        if n > 100 << 20:
            raise OrthrusError(f"{path.name} has an implausible safetensors header ({n} bytes): rebuild the engine")
        return f.read(n)


# ---- writing (the builder, ONNX export) ---------------------------------------------------------------------------
def file_record(path: Path) -> dict:
    rec = {"bytes": path.stat().st_size, "sha256": file_digests(path)}
    if path.suffix == ".safetensors":
        rec["header_sha256"] = hashlib.sha256(safetensors_header(path)).hexdigest()
    return rec


def write_manifest(engine_dir: Path, manifest: dict, reuse: dict | None = None) -> None:
    """Record every file of ``engine_dir`` (size, chunk digests) and write ``manifest.json``. The one manifest
    writer: the builder, the autotuner's record and the ONNX export all go through it. ``reuse`` maps file names to
    records already computed for unchanged files (the weights are hashed once per build)."""
    engine_dir = Path(engine_dir)
    reuse = reuse or {}
    files = sorted(p for p in engine_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    records = {}
    for p in files:
        rel = str(p.relative_to(engine_dir))
        old = reuse.get(rel)
        records[rel] = old if old and old["bytes"] == p.stat().st_size else file_record(p)
    manifest["files"] = records
    tmp = engine_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(engine_dir / MANIFEST)


@contextmanager
def atomic_directory(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to write into; rename it to ``out`` when the block completes (an existing
    ``out`` is replaced only with ``force`` and survives a failure); remove it on any failure. The one helper for
    every directory this project writes (engines, ONNX exports, model repositories)."""
    out = Path(out)
    if out.exists() and not force:
        raise OrthrusError(f"{out} already exists: pass --force to replace it, or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.parent / f".{out.name}.lock"
    lock = _lock(lock_path, out)
    remove_stale_temporaries(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
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
    finally:
        lock_path.unlink(missing_ok=True)  # before releasing: a later writer then locks a fresh file
        lock.close()


def _lock(path: Path, out: Path):
    """An exclusive lock on ``path`` (created if needed), held through the returned file object. A writer that finds
    it held fails at once, naming ``out``; the inode check makes a lock on a file that was just removed not count."""
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise OrthrusError(f"another process is writing {out} right now: wait for it to finish, or choose "
                               "another --out") from None
        try:
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                return f
        except FileNotFoundError:
            pass
        f.close()  # the holder removed the file between our open and our lock: lock the new one


def remove_stale_temporaries(out: Path) -> None:
    """Remove ``.<name>.tmp-PID`` / ``.old-PID`` siblings of ``out`` left by processes that no longer run."""
    for p in Path(out).parent.glob(f".{Path(out).name}.*-*"):
        kind, _, pid = p.name.rpartition("-")
        if not pid.isdigit() or not (kind.endswith(".tmp") or kind.endswith(".old")):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass


# ---- reading and verifying (the runtime) --------------------------------------------------------------------------
def read_manifest(engine: Path) -> dict:
    """The engine's manifest, schema-checked. Reads one small file: what ``info`` needs."""
    engine = Path(engine)
    if not engine.is_dir():
        raise OrthrusError(f"engine {engine} does not exist: build it with `orthrus-export build`")
    path = engine / MANIFEST
    if not path.exists():
        raise OrthrusError(f"{engine} has no {MANIFEST}: it is not an engine (or its build did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OrthrusError(f"{path} is corrupted ({e}): rebuild the engine") from None
    if manifest.get("schema") != SCHEMA:
        raise OrthrusError(f"{path} is not an orthrus engine manifest")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise OrthrusError(f"{engine} has engine schema version {manifest.get('schema_version')}, this orthrus-export "
                           f"reads version {SCHEMA_VERSION}: rebuild the engine")
    return manifest


def check_length(prompt_tokens: int | None, max_new_tokens: int, max_seq_len: int) -> None:
    """The error for a request the engine's cache cannot hold (``Engine.generate``). ``prompt_tokens`` None: the
    prompt is not tokenized yet (the CLI checks before loading the engine) and counts as one token."""
    if (1 if prompt_tokens is None else prompt_tokens) + max_new_tokens <= max_seq_len:
        return
    if prompt_tokens is None:
        raise OrthrusError(f"max_new_tokens {max_new_tokens} + a prompt of at least 1 token exceeds the engine's "
                           f"max_seq_len {max_seq_len}: ask for fewer tokens, or rebuild with a larger --max-seq-len")
    raise OrthrusError(f"prompt of {prompt_tokens} tokens + max_new_tokens {max_new_tokens} exceeds the engine's "
                       f"max_seq_len {max_seq_len}: shorten the prompt, ask for fewer tokens, or rebuild with a larger "
                       "--max-seq-len")


def _mismatch(rel: str) -> OrthrusError:
    return OrthrusError(f"engine file {rel} does not match its sha256 in the manifest (corrupted or modified): "
                        "rebuild the engine")


def verify_files(engine: Path, manifest: dict, full: bool = False) -> dict:
    """Check the engine's files against the manifest: every file's size; the sha256 of every file up to ``SMALL``
    bytes; the safetensors header of the weights. ``full``: every chunk of every file too. Returns
    ``{"bytes": hashed, "seconds": s}``."""
    engine = Path(engine)
    t0, hashed = time.perf_counter(), 0
    for rel, rec in manifest["files"].items():
        f = engine / rel
        if not f.exists():
            raise OrthrusError(f"engine file {rel} is missing from {engine}: rebuild the engine")
        size = f.stat().st_size
        if size != rec["bytes"]:
            raise OrthrusError(f"engine file {rel} has {size} bytes, the manifest says {rec['bytes']} (truncated or "
                               "modified): rebuild the engine")
        if "header_sha256" in rec and hashlib.sha256(safetensors_header(f)).hexdigest() != rec["header_sha256"]:
            raise _mismatch(rel)
        if full or size <= SMALL:
            if file_digests(f) != rec["sha256"]:
                raise _mismatch(rel)
            hashed += size
    return {"bytes": hashed, "seconds": time.perf_counter() - t0}


def check_versions(engine: Path, manifest: dict) -> None:
    """torch (major.minor: the traced graphs' serializer) and orthrus-export (major) must match. transformers is not
    used by the runtime and is not checked."""
    built, here = manifest["versions"], library_versions()
    name = Path(engine).name
    if _minor(built["torch"]) != _minor(here["torch"]):
        raise OrthrusError(f"engine {name} was built with torch {built['torch']}, this is torch "
                           f"{here['torch']}: rebuild the engine here (traced programs are tied to the torch version)")
    if built["orthrus_export"].split(".")[0] != here["orthrus_export"].split(".")[0]:
        raise OrthrusError(f"engine {name} was built by orthrus-export {built['orthrus_export']}, this is "
                           f"{here['orthrus_export']}: rebuild the engine")


def verify_engine(engine: Path, verify_weights: bool = False) -> dict:
    """Schema, files (small ones hashed, the weights' size and header; every byte with ``verify_weights``) and
    library versions; the device is checked by the runtime against the profile."""
    manifest = read_manifest(engine)
    verify_files(engine, manifest, full=verify_weights)
    check_versions(engine, manifest)
    return manifest
