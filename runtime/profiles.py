"""GPU build profiles (``runtime/gpu_profiles/<name>.json``, package data of ``orthrus_runtime``; ``engines/profiles``
links there) and matching them against the device at hand."""

import json
import platform
from dataclasses import dataclass
from importlib import resources

import torch

from orthrus_runtime.errors import OrthrusError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# the dtype activations, norms, embeddings and the cache use: FP8 engines quantize their linear weights only
COMPUTE_DTYPES = {**DTYPES, "fp8": torch.bfloat16}


@dataclass(frozen=True)
class Profile:
    name: str
    device: str                      # "cpu" or "cuda"
    precisions: tuple[str, ...]
    fp8: bool
    description: str = ""
    device_name_contains: str | None = None
    compute_capability: tuple[int, int] | None = None
    memory_gib: int | None = None


def _files() -> dict:
    folder = resources.files("orthrus_runtime") / "gpu_profiles"
    return {f.name[:-5]: f for f in folder.iterdir() if f.name.endswith(".json")}


def available() -> list[str]:
    return sorted(_files())


def load_profile(name: str) -> Profile:
    key = name.lower()
    if key == "auto":
        return detect()
    files = _files()
    if key not in files:
        raise OrthrusError(f"unknown --gpu {name!r}: choose one of {', '.join(sorted(files))} or auto")
    d = json.loads(files[key].read_text())
    cc = d.get("compute_capability")
    return Profile(name=d["name"], device=d["device"], precisions=tuple(d["precisions"]), fp8=bool(d["fp8"]),
                   description=d.get("description", ""), device_name_contains=d.get("device_name_contains"),
                   compute_capability=tuple(cc) if cc else None, memory_gib=d.get("memory_gib"))


def detect() -> Profile:
    """The profile of the device at hand: the first CUDA GPU if there is one, else the CPU."""
    if not torch.cuda.is_available():
        return load_profile("cpu")
    name = torch.cuda.get_device_name(0)
    for p in available():
        prof = load_profile(p)
        if prof.device_name_contains and prof.device_name_contains in name:
            return prof
    raise OrthrusError(f"no build profile matches GPU {name!r}: add a JSON profile for it to runtime/gpu_profiles "
                       "and reinstall, or pass --gpu with one of " + ", ".join(available()))


def device_description(profile: Profile) -> dict:
    if profile.device == "cpu":
        return {"device_name": platform.processor() or platform.machine(), "compute_capability": None}
    return {"device_name": torch.cuda.get_device_name(0),
            "compute_capability": list(torch.cuda.get_device_capability(0))}


def check_device(profile: Profile, action: str) -> torch.device:
    """The torch device for ``profile`` on this machine, or an error saying why it does not match."""
    if profile.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise OrthrusError(f"cannot {action} for GPU profile {profile.name}: this machine has no CUDA GPU "
                           "(engines are GPU-specific; use --gpu cpu here)")
    name = torch.cuda.get_device_name(0)
    cc = tuple(torch.cuda.get_device_capability(0))
    if profile.device_name_contains not in name or (profile.compute_capability and cc != profile.compute_capability):
        raise OrthrusError(f"cannot {action} for GPU profile {profile.name} on {name} (compute capability "
                           f"{cc[0]}.{cc[1]}): use --gpu auto or the profile of this GPU")
    return torch.device("cuda", 0)
