"""The engine's forward passes over packed weights: the AR view (verify/prefill/decode) and the diffusion view (draft).

Pure functions of ``(weights, tokens, start, k_cache, v_cache)`` so that ``torch.export`` traces them with the
weights as inputs (one copy in ``weights.safetensors`` serves every traced program) and the attention plugins
as single nodes. Shapes are static: ``tokens`` is ``[T]`` (T = block size, or 1 for decode), ``start`` an int64
scalar tensor (the cache length), caches ``[L, Hkv, C, D]``.
"""

import torch
import torch.nn.functional as F

import orthrus_plugins  # noqa: F401  (registers torch.ops.orthrus.*)
from orthrus_runtime.config import ModelConfig

VIEWS = ("ar", "diff")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def linear(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """``x @ w[name].T``; an FP8 engine's quantized weights (``name`` + ``.scale`` present) go through
    ``orthrus::fp8_linear``."""
    if name + ".scale" in w:
        return torch.ops.orthrus.fp8_linear(x, w[name], w[name + ".scale"])
    return F.linear(x, w[name])


def forward(cfg: ModelConfig, view: str, w: dict[str, torch.Tensor], tokens: torch.Tensor, start: torch.Tensor,
            k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """Logits [T, V] (float32) of one pass of ``view`` over ``tokens`` at positions ``start … start+T-1``.

    ``view == "ar"``: causal, writes the block's K/V into the caches at ``start`` (verify, prefill chunk, decode).
    ``view == "diff"``: the diffusion set; attends to cache ``[0, start)`` plus the block, writes nothing (draft).
    """
    t = tokens.shape[0]
    dtype = w["embed"].dtype
    pos = start + torch.arange(t, device=tokens.device)
    cos = w["rope.cos"].index_select(0, pos).to(dtype)[:, None, :]
    sin = w["rope.sin"].index_select(0, pos).to(dtype)[:, None, :]
    scale = cfg.head_dim ** -0.5
    x = F.embedding(tokens, w["embed"])
    for n in range(cfg.num_layers):
        p = f"layers.{n}."
        h = rms_norm(x, w[p + "attn_norm"], cfg.rms_norm_eps)
        qkv = linear(h, w, f"{p}{view}.qkv")
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = rms_norm(q.reshape(t, cfg.num_heads, cfg.head_dim), w[f"{p}{view}.q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k.reshape(t, cfg.num_kv_heads, cfg.head_dim), w[f"{p}{view}.k_norm"], cfg.rms_norm_eps)
        v = v.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if view == "ar":
            o = torch.ops.orthrus.cached_attention(q, k, v, k_cache, v_cache, start, n, scale)
        else:
            o = torch.ops.orthrus.diffusion_attention(q, k, v, k_cache, v_cache, start, n, scale)
        x = x + linear(o.reshape(t, cfg.q_size), w, f"{p}{view}.o")
        h = rms_norm(x, w[p + "mlp_norm"], cfg.rms_norm_eps)
        gate, up = linear(h, w, p + "gate_up").chunk(2, dim=-1)
        x = x + linear(F.silu(gate) * up, w, p + "down")
    x = rms_norm(x, w["norm"], cfg.rms_norm_eps)
    if "lm_head.scale" in w:  # FP8 head (a quantized copy of the tied embedding, or of lm_head)
        return linear(x, w, "lm_head").float()
    head = w["embed"] if cfg.tie_word_embeddings else w["lm_head"]
    return F.linear(x, head).float()


class Pass(torch.nn.Module):
    """One traced entry point: ``forward(weights, tokens, start, k_cache, v_cache) -> logits``."""

    def __init__(self, cfg: ModelConfig, view: str):
        super().__init__()
        assert view in VIEWS
        self.cfg, self.view = cfg, view

    def forward(self, weights, tokens, start, k_cache, v_cache):
        return forward(self.cfg, self.view, weights, tokens, start, k_cache, v_cache)
