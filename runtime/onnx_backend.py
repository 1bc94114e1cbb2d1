"""The ``onnxruntime`` backend: an engine's exported ONNX graphs (``orthrus-export onnx``) run by ONNX Runtime on
the CPU, behind the same program interface as the traced programs, so the same cycle loop drives them.

The exported graphs are single-sequence (``tokens [T]``, ``[L, Hkv, C, D]`` caches); ``Batched`` runs one per row
behind the engine's batched program interface ``program(weights, tokens [b, T], start [b], slots [b], k_cache,
v_cache)`` (rows in order, so consecutive prefill chunks of one prompt see each other), returning float32 logits
``[b, T, V]``; programs that write the cache (verify, decode) write the updated layers back into the row's slot of
the engine's caches, which is what the traced programs do in place. The ``orthrus``-domain nodes run the plugins' reference
implementations through onnxruntime-extensions' Python custom ops (each op's ``orthrus_plugins.<op>.onnxruntime``);
the decomposed graphs need nothing beyond ONNX Runtime. onnxruntime-extensions registers Python ops in its own
domain (``ai.onnx.contrib``): :func:`to_extension_domain` maps a model's ``orthrus`` nodes onto it in memory when a
session is created, and the files keep the ``orthrus`` domain.
"""

from pathlib import Path

import numpy as np
import torch

from orthrus_runtime.errors import OrthrusError

VARIANTS = ("orthrus", "decomposed")
_REGISTERED = False


def custom_ops_library() -> str:
    """onnxruntime-extensions' library, the orthrus ops' Python implementations registered with it (once)."""
    global _REGISTERED
    from onnxruntime_extensions import get_library_path
    if not _REGISTERED:
        from orthrus_plugins.cached_attention import onnxruntime as cached_attention
        from orthrus_plugins.diffusion_attention import onnxruntime as diffusion_attention
        cached_attention.register()
        diffusion_attention.register()
        _REGISTERED = True
    return get_library_path()


def to_extension_domain(model) -> None:
    from onnx import helper
    from onnxruntime_extensions import default_opset_domain
    contrib = default_opset_domain()
    for node in model.graph.node:
        if node.domain == "orthrus":
            node.domain = contrib
    kept = [o for o in model.opset_import if o.domain not in ("orthrus", contrib)]
    del model.opset_import[:]
    model.opset_import.extend(kept + [helper.make_operatorsetid(contrib, 1)])


def session(path: Path, variant: str):
    """An ONNX Runtime CPU session of one exported graph (custom ops registered for the orthrus variant)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if variant == "decomposed":
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    import onnx

    so.register_custom_ops_library(custom_ops_library())
    model = onnx.load(str(path))  # external data (if any) is read into memory: the graph is rewritten below
    to_extension_domain(model)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


class OrtProgram:
    def __init__(self, path: Path, variant: str):
        self.session = session(path, variant)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.writes_cache = len(self.outputs) > 1
        self.inputs = {i.name for i in self.session.get_inputs()}

    def feed(self, tokens: torch.Tensor, start: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> dict:
        feed = {"tokens": tokens.cpu().numpy().astype(np.int64),
                "cache_len": np.asarray(int(start), dtype=np.int64)}
        for i in range(k_cache.shape[0]):
            feed[f"k_cache.{i}"] = np.ascontiguousarray(k_cache[i].numpy())
            feed[f"v_cache.{i}"] = np.ascontiguousarray(v_cache[i].numpy())
        return feed

    def __call__(self, weights, tokens, start, k_cache, v_cache) -> torch.Tensor:
        outs = self.session.run(None, self.feed(tokens, start, k_cache, v_cache))
        if self.writes_cache:
            for name, value in zip(self.outputs[1:], outs[1:]):
                kind, layer = name.split("_cache_out.")
                (k_cache if kind == "k" else v_cache)[int(layer)].copy_(torch.from_numpy(value))
        return torch.from_numpy(outs[0])


class Batched:
    """A single-sequence program behind the batched interface: one run per row, in row order."""

    def __init__(self, single: OrtProgram):
        self.single = single

    def __getattr__(self, name):  # the session, its outputs, whether it writes the cache
        return getattr(self.single, name)

    def __call__(self, weights, tokens, start, slots, k_cache, v_cache) -> torch.Tensor:
        return torch.stack([self.single(weights, tokens[i], start[i], k_cache[:, int(slot)], v_cache[:, int(slot)])
                            for i, slot in enumerate(slots.tolist())])


def load_programs(engine_dir: Path, manifest: dict, variant: str) -> dict:
    if variant not in VARIANTS:
        raise OrthrusError(f"unknown ONNX variant {variant!r}: choose {' or '.join(VARIANTS)}")
    precision = manifest["precision"]
    if precision == "fp8":
        raise OrthrusError("FP8 engines have no ONNX export yet (no conversion for orthrus::fp8_linear): use "
                           "--backend torch, or build an fp32 engine for the onnxruntime backend")
    if precision != "fp32":
        raise OrthrusError(f"the onnxruntime backend runs fp32 engines (ONNX Runtime's CPU provider lacks "
                           f"{precision} kernels for these graphs); this engine is {precision}: build one with "
                           "--precision fp32")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise OrthrusError("the onnxruntime backend needs ONNX Runtime: pip install 'orthrus-export[onnx]'") from None
    record = (manifest.get("onnx") or {}).get(variant)
    if record is None:
        flag = " --decompose" if variant == "decomposed" else ""
        raise OrthrusError(f"engine {engine_dir.name} has no {variant} ONNX export: run `orthrus-export onnx --engine "
                           f"{engine_dir}{flag}` first")
    return {name: Batched(OrtProgram(engine_dir / rel, variant)) for name, rel in record["graphs"].items()}
