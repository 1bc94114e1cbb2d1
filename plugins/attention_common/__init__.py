"""What ``orthrus::cached_attention`` and ``orthrus::diffusion_attention`` share: the plain attention of their
reference implementations (here), one Triton kernel for both (``kernel.py``), the standard-ONNX spelling of the
attention (``onnx.py``) and the ONNX Runtime helpers (``onnxruntime.py``). Not an op itself."""

import torch


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
           mask: torch.Tensor | None) -> torch.Tensor:
    """Plain GQA attention in float32.

    q: [T, Hq, D]; keys, values: [Hkv, S, D]; mask: bool [T, S] (True = may attend) or None.
    Returns [T, Hq, D] in q's dtype.
    """
    t, hq, d = q.shape
    hkv = keys.shape[0]
    group = hq // hkv
    qf = q.float().reshape(t, hkv, group, d).permute(1, 2, 0, 3)  # [Hkv, G, T, D]
    scores = torch.matmul(qf, keys.float().transpose(-1, -2).unsqueeze(1)) * scale  # [Hkv, G, T, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, values.float().unsqueeze(1))  # [Hkv, G, T, D]
    return out.permute(2, 0, 1, 3).reshape(t, hq, d).to(q.dtype).contiguous()


def check_shapes(name: str, q, k, v, k_cache, v_cache, layer: int) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"{name}: q, k, v must be [B, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"{name}: k_cache and v_cache must both be [L, Hkv, C, D], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if q.shape[1] % k.shape[1] != 0 or k.shape[1] != k_cache.shape[1]:
        raise ValueError(f"{name}: {q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads "
                         f"(cache has {k_cache.shape[1]})")
    if not 0 <= layer < k_cache.shape[0]:
        raise ValueError(f"{name}: layer {layer} outside the cache's {k_cache.shape[0]} layers")
