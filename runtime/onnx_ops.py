"""ONNX Runtime implementations of the ``orthrus`` ONNX domain (onnxruntime-extensions Python custom ops).

``CachedAttention(q, k, v, k_cache, v_cache, cache_len) -> (out, k_cache_out, v_cache_out)`` and
``DiffusionAttention(q, k, v, k_cache, v_cache, cache_len) -> out``, attributes ``layer`` (int) and ``scale``
(float); the caches are one layer's ``[Hkv, C, D]``. Both call the plugins' reference implementations, so the
ONNX graphs run the very arithmetic the CPU engine runs (float32).

onnxruntime-extensions registers Python ops in its own domain (``ai.onnx.contrib``); :func:`to_extension_domain`
maps a model's ``orthrus`` nodes onto it in memory when a session is created. The files keep the ``orthrus`` domain.
"""

import numpy as np
import torch

import orthrus_plugins  # noqa: F401  (the reference implementations)

_REGISTERED = False


def _layer_cache(cache: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(cache, dtype=np.float32, copy=True))[None]  # [1, Hkv, C, D], a private copy


def cached_attention(q, k, v, k_cache, v_cache, cache_len, layer=0, scale=1.0):
    kc, vc = _layer_cache(k_cache), _layer_cache(v_cache)
    out = torch.ops.orthrus.cached_attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), kc, vc,
                                             torch.tensor(int(cache_len)), 0, float(scale))
    return out.numpy(), kc[0].numpy(), vc[0].numpy()


def diffusion_attention(q, k, v, k_cache, v_cache, cache_len, layer=0, scale=1.0):
    kc, vc = _layer_cache(k_cache), _layer_cache(v_cache)
    out = torch.ops.orthrus.diffusion_attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), kc,
                                                vc, torch.tensor(int(cache_len)), 0, float(scale))
    return out.numpy()


def register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from onnxruntime_extensions import PyCustomOpDef, onnx_op
    f, i64 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64
    attrs = {"layer": i64, "scale": f}
    onnx_op(op_type="CachedAttention", inputs=[f, f, f, f, f, i64], outputs=[f, f, f], attrs=attrs)(cached_attention)
    onnx_op(op_type="DiffusionAttention", inputs=[f, f, f, f, f, i64], outputs=[f], attrs=attrs)(diffusion_attention)
    _REGISTERED = True


def library_path() -> str:
    register()
    from onnxruntime_extensions import get_library_path
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
