"""The engine directory: ``manifest.json`` + ``weights.safetensors`` + ``programs/*.json`` + tokenizer files.

The manifest records the schema version, model config, precision, GPU profile and device, library versions,
build options and the sha256 of every file. ``verify_engine`` checks all of it on load and says exactly what does
not match.
"""

import hashlib
import json
from pathlib import Path

import torch

from orthrus_export import __version__
from orthrus_export.errors import OrthrusError

SCHEMA = "orthrus-engine"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None
    return {"orthrus_export": __version__, "torch": torch.__version__, "transformers": installed("transformers"),
            "triton": installed("triton")}


def _minor(v: str) -> str:
    return ".".join(v.split("+")[0].split(".")[:2])


def read_manifest(engine: Path) -> dict:
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


def verify_engine(engine: Path, check_hashes: bool = True) -> dict:
    """Schema, checksums and library versions; the device is checked by the runtime against the profile."""
    engine = Path(engine)
    manifest = read_manifest(engine)
    for rel, digest in manifest["files"].items():
        f = engine / rel
        if not f.exists():
            raise OrthrusError(f"engine file {rel} is missing from {engine}: rebuild the engine")
        if check_hashes and sha256(f) != digest:
            raise OrthrusError(f"engine file {rel} does not match its sha256 in the manifest (corrupted or "
                               f"modified): rebuild the engine")
    built, here = manifest["versions"], library_versions()
    if _minor(built["torch"]) != _minor(here["torch"]):
        raise OrthrusError(f"engine {engine.name} was built with torch {built['torch']}, this is torch "
                           f"{here['torch']}: rebuild the engine here (traced programs are tied to the torch version)")
    if built["transformers"].split(".")[0] != here["transformers"].split(".")[0]:
        raise OrthrusError(f"engine {engine.name} was built with transformers {built['transformers']}, this is "
                           f"{here['transformers']}: rebuild the engine here (its tokenizer files follow that major)")
    if built["orthrus_export"].split(".")[0] != here["orthrus_export"].split(".")[0]:
        raise OrthrusError(f"engine {engine.name} was built by orthrus-export {built['orthrus_export']}, this is "
                           f"{here['orthrus_export']}: rebuild the engine")
    return manifest


def write_manifest(engine_dir: Path, manifest: dict) -> None:
    files = sorted(p for p in engine_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest["files"] = {str(p.relative_to(engine_dir)): sha256(p) for p in files}
    (engine_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
