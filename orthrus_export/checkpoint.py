"""Checkpoint resolution (local folder, zoo name from the offline Hugging Face cache, or ``tiny``) and validation.

Only ``config.json``, ``generation_config.json`` and safetensors files are read: remote code is never executed
and nothing is unpickled.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from orthrus_export.config import load_model_config, read_json
from orthrus_runtime.config import ModelConfig
from orthrus_runtime.errors import OrthrusError
from orthrus_export.weights import checkpoint_shapes, packing_plan, tolerated_extras

ZOO = {"1.7b": "chiennv/Orthrus-Qwen3-1.7B", "4b": "chiennv/Orthrus-Qwen3-4B", "8b": "chiennv/Orthrus-Qwen3-8B"}
REPOS = {repo.lower(): repo for repo in ZOO.values()}  # a zoo model's repo id is accepted in any case too
TINY_DIR = Path(__file__).resolve().parent / "assets" / "tiny"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "chat_template.jinja")


def resolve(spec: str) -> Path:
    """Turn ``--model`` into a checkpoint directory. Names (tiny, zoo names, the zoo's repo ids) in any case."""
    if spec.lower() == "tiny":
        if not (TINY_DIR / "config.json").exists():
            raise OrthrusError(f"the embedded tiny model is missing from {TINY_DIR}: reinstall orthrus-export")
        return TINY_DIR
    if spec.lower() in ZOO or spec.lower() in REPOS:
        repo = ZOO.get(spec.lower()) or REPOS[spec.lower()]
        try:
            from huggingface_hub import snapshot_download
            cache = os.environ.get("HF_HUB_CACHE") or None  # read now, not at import
            return Path(snapshot_download(repo, local_files_only=True, cache_dir=cache))
        except Exception:
            named = repo if spec == repo else f"{spec} ({repo})"
            raise OrthrusError(f"model {named} is not in the local Hugging Face cache: download it with "
                               f"`hf download {repo}` where there is internet, or pass --model /path/to/checkpoint"
                               ) from None
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise OrthrusError(f"--model {spec} is a file: pass the checkpoint directory that holds config.json")
    raise OrthrusError(f"--model {spec}: no such directory, and not one of tiny, {', '.join(ZOO)} (or their repo "
                       f"ids {', '.join(ZOO.values())})")


def _weight_files(ckpt: Path) -> dict[str, Path]:
    """Tensor name -> file, from model.safetensors.index.json or the single-file layout."""
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise OrthrusError(f"{index} has no weight_map: re-download the checkpoint")
        files = {name: ckpt / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.exists():
                raise OrthrusError(f"shard {f.name} named in {index.name} is missing from {ckpt}: re-download it")
        return files
    single = ckpt / "model.safetensors"
    if single.exists():
        return {name: single for name in _header(single)}
    if list(ckpt.glob("*.bin")) or list(ckpt.glob("*.pt")):
        raise OrthrusError(f"{ckpt} holds only pickle weights (.bin/.pt): convert them to safetensors; "
                           "pickles are never loaded")
    raise OrthrusError(f"{ckpt} has no model.safetensors or model.safetensors.index.json")


_HEADERS: dict[tuple, dict] = {}


def _header(path: Path) -> dict[str, tuple[list[int], str]]:
    """Name -> (shape, dtype) from a safetensors header, checking the file is complete."""
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key in _HEADERS:
        return _HEADERS[key]
    size = st.st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length past the end of the file")
            meta = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        raise OrthrusError(f"{path} is not a readable safetensors file ({e}): re-download it") from None
    out, end = {}, 0
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        out[name] = (list(info["shape"]), info["dtype"])
        end = max(end, int(info["data_offsets"][1]))
    if 8 + n + end > size:
        raise OrthrusError(f"{path} is truncated ({size} bytes, its header needs {8 + n + end}): re-download it")
    _HEADERS[key] = out
    return out


@dataclass
class Checkpoint:
    spec: str
    path: Path
    config: ModelConfig
    tensor_files: dict[str, Path] = field(repr=False)

    def tensor(self, name: str) -> torch.Tensor:
        with safe_open(str(self.tensor_files[name]), framework="pt") as f:
            return f.get_tensor(name)

    def tokenizer_files(self) -> list[Path]:
        return [self.path / n for n in TOKENIZER_FILES if (self.path / n).exists()]

    def packed_weights(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The engine's packed tensors (see weights.packing_plan), cast to ``dtype``; norms stay in ``dtype`` too."""
        by_file: dict[Path, list[str]] = {}
        for name, f in self.tensor_files.items():
            by_file.setdefault(f, []).append(name)
        raw: dict[str, torch.Tensor] = {}
        needed = set(checkpoint_shapes(self.config))
        for f, names in by_file.items():
            with safe_open(str(f), framework="pt") as sf:
                for name in names:
                    if name in needed:
                        raw[name] = sf.get_tensor(name)
        out = {}
        for pk in packing_plan(self.config):
            parts = [raw.pop(s).to(dtype) for s in pk.sources]
            out[pk.name] = parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=0)
        return out


def open_checkpoint(spec: str) -> Checkpoint:
    """Resolve and validate a checkpoint (config and every tensor's name, shape, dtype and file extent)."""
    path = resolve(str(spec))
    cfg = load_model_config(path)
    files = _weight_files(path)
    expected = checkpoint_shapes(cfg)
    if not any(name.endswith("_diff.weight") for name in files):
        raise OrthrusError(f"{path} has no *_diff tensors: it is a plain Qwen3 checkpoint, not Orthrus")
    for name, shape in expected.items():
        if name not in files:
            raise OrthrusError(f"{path} lacks tensor {name}: the checkpoint is incomplete; re-download or re-export it")
    headers = {f: _header(f) for f in sorted(set(files.values()))}
    for name, f in files.items():
        if name not in headers[f]:
            raise OrthrusError(f"{f.name} does not contain {name}, which the index says it holds: re-download it")
        shape, dtype = headers[f][name]
        if name not in expected:
            if name in tolerated_extras(cfg):
                continue
            raise OrthrusError(f"{path} has unexpected tensor {name} {shape}: this is not an Orthrus-Qwen3 layout")
        if tuple(shape) != expected[name]:
            raise OrthrusError(f"tensor {name} in {f.name} has shape {tuple(shape)} but config.json implies "
                               f"{expected[name]}: the checkpoint and its config disagree")
        if dtype not in ("F32", "BF16", "F16"):
            raise OrthrusError(f"tensor {name} in {f.name} has dtype {dtype}; expected F32, BF16 or F16")
    return Checkpoint(spec=str(spec), path=path, config=cfg, tensor_files=files)
